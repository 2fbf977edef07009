"""`shortft bench`: seconds per step, peak memory, FLOPs and utilisation of each method on one config.

    shortft bench --config toy --segments 2,4,8 --batch 4 --json bench.json
    shortft bench --config sd15 --random-weights --methods shortft,full,draft,alignprop --batch 1,2

Every arm (method x segments x batch) builds its models afresh (with `--random-weights`, random weights
of the config's real architecture, nothing downloaded), runs warm-up steps and then timed training
steps of the loop's own step (chain -> decode -> reward -> backward -> clip -> AdamW). FLOPs per step
are counted once per arm with `FlopCounterMode` on one such step of random weights (on meta tensors
for the real architectures on a CPU: no memory), together with a memory estimate (weights + LoRA with
grads and AdamW state + tensors saved for backward). `full` always runs, with per-call checkpointing,
as the reference every ratio is taken against. On a CPU, peak memory is the process's resident high-
water mark, so it only grows from arm to arm; compare the estimates there.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import statistics
import time
from collections.abc import Callable

import torch

from shortft.bench_count import build_pipeline, count, count_device, draws, make_trainable, step_inputs
from shortft.bench_report import describe
from shortft.checks import check
from shortft.config import Config, ConfigError, METHODS
from shortft.denoiser import CallCount
from shortft.loop import autocast_for, micro_batch_loss
from shortft.machine import device_name, host_cpu, library_versions
from shortft.memory import peak_memory_mb, report
from shortft.models import DTYPES, pick_device, prepare_models
from shortft.rewards import Rewards

# Dense bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s (SXM parts for H100/H200/A100).
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}


@dataclasses.dataclass
class Arm:
    method: str
    segments: int | None  # None: the method does not depend on k
    batch: int
    checkpointing: bool | None = None  # per-call checkpointing; None: the config's (full: always on)

    @property
    def label(self) -> str:
        return (f"{self.method}" + (f" k={self.segments}" if self.segments else "")
                + (" ckpt" if self.checkpointing and self.method != "full" else "") + f" b={self.batch}")


# Methods with a single call with gradient: per-call checkpointing changes nothing there (draft: at last_k 1).
ONE_GRAD_CALL = ("draft", "refl")


def arms(methods: list[str], segments: list[int], batches: list[int],
         checkpointing: list[bool | None] = (None,), last_k: int = 1) -> list[Arm]:
    """Every method at every batch and checkpointing choice; ShortFT at every k too. `full` (checkpointed)
    is always included, once per batch. `last_k`: draft's calls with gradient (`chain.last_k`)."""
    one = [m for m in ONE_GRAD_CALL if m != "draft" or last_k == 1]
    out = []
    for batch in batches:
        for method in dict.fromkeys(["full", *methods]):
            choices = [True] if method == "full" else [None] if method in one else checkpointing
            for ckpt in dict.fromkeys(choices):
                out += [Arm(method, k, batch, ckpt) for k in (segments if method == "shortft" else [None])]
    return out


def arm_config(cfg: Config, arm: Arm) -> Config:
    ckpt = True if arm.method == "full" else cfg.chain.checkpointing if arm.checkpointing is None else arm.checkpointing
    chain = dataclasses.replace(cfg.chain, method=arm.method, segments=arm.segments or cfg.chain.segments,
                                checkpointing=ckpt)
    train = dataclasses.replace(cfg.train, batch_size=arm.batch, grad_accum=1)
    return dataclasses.replace(cfg, chain=chain, train=train)


def time_steps(cfg: Config, random_weights: bool, steps: int, warmup: int, rewards: Rewards | None = None,
               profile: bool = False) -> dict:
    """Median seconds per training step (and spread), peak memory, calls per step, on the config's device.
    `profile` (CUDA): one more step under the profiler, for the GPU's busy share of it and its kernel count."""
    device = pick_device(cfg.model.device)
    torch.manual_seed(cfg.train.seed)
    models = prepare_models(cfg, build_pipeline(cfg, random_weights, device, DTYPES[cfg.model.dtype]), device=device)
    rewards = rewards or Rewards(cfg.reward.weights, cfg.reward.options, device=device, random_weights=random_weights)
    trainable = make_trainable(models)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr)
    autocast = autocast_for(cfg, device)[0]

    def step() -> float:
        prompts, noise = step_inputs(models, cfg.train.batch_size)
        models.denoiser.count = CallCount()
        t0 = time.perf_counter()
        loss, _, _ = micro_batch_loss(models, rewards, cfg, prompts, noise, 1, draws(), autocast)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    seconds = [step() for _ in range(warmup + steps)][warmup:]
    out = {"seconds_per_step": statistics.median(seconds), "seconds_min": min(seconds), "seconds_max": max(seconds),
           "peak_memory_mb": peak_memory_mb(device), "timed_steps": steps,
           "measured_calls": models.denoiser.count.calls, "measured_grad_calls": models.denoiser.count.grad_calls}
    if profile and device.type == "cuda":
        out.update(gpu_busy(step))
    return out


def gpu_busy(step) -> dict:
    """Run `step` once under the CUDA profiler: kernels launched, their summed time, and that time's share
    of the step's wall time (near 1: the GPU sets the pace; far below: the host does, launching kernels)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        wall = step()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]  # and copies
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
    return {"kernels_per_step": len(kernels), "gpu_seconds_per_step": busy, "gpu_busy_share": busy / wall,
            "profiled_step_seconds": wall}


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def run_bench(cfg: Config, methods: list[str], segments: list[int], batches: list[int], steps: int = 3,
              warmup: int = 1, random_weights: bool = False, time_it: bool = True, progress=print,
              counts_from: dict | None = None, checkpointing: list[bool | None] = (None,),
              profile: bool = False, on_arm: Callable[[dict], None] | None = None, header: str | None = None) -> dict:
    """Bench every arm; returns {"rows": [...], "device": ..., ...} (see the module docstring).
    `counts_from`: an earlier result (e.g. a `--count-only` run on a CPU) whose FLOP counts and memory
    estimates are reused for the same arms, since they do not depend on the machine. `on_arm(result)`
    after each arm, with the rows so far (the CLI writes its JSON there: a run stopped by a time limit
    keeps the arms it finished). An arm that runs out of GPU memory gets an `error` and no timings; the
    others go on. `header`: printed (through `progress`) once every input is checked."""
    if counts_from and (counts_from.get("pretrained"), counts_from.get("steps")) != (cfg.model.pretrained,
                                                                                     cfg.chain.steps):
        raise ConfigError(f"--counts-from: its counts are of {counts_from.get('pretrained')} at N="
                          f"{counts_from.get('steps')}, this bench's of {cfg.model.pretrained} at N={cfg.chain.steps} "
                          "(another config's were reused); give a --json of the same config and chain.steps")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ConfigError(f"--methods {','.join(bad)}: unknown; choose from {','.join(METHODS)}")
    for flag, values in (("--segments", segments), ("--batch", batches)):
        if not values or any(v < 1 for v in values):
            raise ConfigError(f"{flag} {values}: give positive integers, e.g. {flag} 2,4")
    if any(k > cfg.chain.steps for k in segments):
        raise ConfigError(f"--segments {segments}: each must be <= chain.steps={cfg.chain.steps}")
    if steps < 1:
        raise ConfigError(f"--steps {steps}: must be >= 1")
    if random_weights and cfg.model.shortcut != "none":
        # A shortcut LoRA cannot be random-initialised meaningfully; the base model's own jump costs the same calls.
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, shortcut="none"))
    # each arm's config checked now (e.g. a k with no shortcut), not as the arms before it have run
    for arm in arms(methods, segments, batches, checkpointing, cfg.chain.last_k):
        check(arm_config(cfg, arm))
    device = pick_device(cfg.model.device)
    peak = device_peak_tflops(device)
    if header:
        progress(header)
    # The reward models are frozen and the same in every arm: built once per device they are counted
    # and timed (with random weights, the counting step's are the timed ones).
    shared: dict[str, Rewards] = {}

    def rewards_on(where: torch.device, random: bool = True) -> Rewards:
        key = f"{where}/{random}"
        if key not in shared:
            shared[key] = Rewards(cfg.reward.weights, cfg.reward.options, device=where, random_weights=random)
        return shared[key]

    rows = []
    result = {"config": cfg.name, "pretrained": cfg.model.pretrained, "random_weights": random_weights,
              "steps": cfg.chain.steps, "timed_steps": steps if time_it else 0, "warmup_steps": warmup if time_it else 0,
              "dtype": cfg.model.dtype, "mixed_precision": autocast_for(cfg, device)[1],
              "device": device_name(device), "host_cpu": host_cpu(), "libraries": library_versions(),
              "threads": torch.get_num_threads(), "peak_bf16_tflops": peak, "date": datetime.date.today().isoformat(),
              "rows": rows}
    for arm in arms(methods, segments, batches, checkpointing, cfg.chain.last_k):
        arm_cfg = arm_config(cfg, arm)
        t0 = time.perf_counter()
        counted = _earlier_count(counts_from, arm) if counts_from else None
        if counted is None:
            counted = count(arm_cfg, device, rewards_on(count_device(arm_cfg, device)))
        row = {"method": arm.method, "segments": arm.segments, "batch": arm.batch,
               "checkpointing": arm_cfg.chain.checkpointing, **counted}
        gc.collect()  # the counting step's models before the timed ones load
        if time_it:
            try:
                row.update(time_steps(arm_cfg, random_weights, steps, warmup, rewards_on(device, random_weights),
                                      profile))
                row["achieved_tflops"] = row["flops"] / row["seconds_per_step"] / 1e12
                row["peak_share"] = row["achieved_tflops"] / peak if peak else None
            except torch.OutOfMemoryError as e:  # this arm does not fit the card; the next may
                row["error"] = f"out of GPU memory ({report(e)})"
        rows.append(row)
        gc.collect()  # the arm's models (peft and diffusers hold reference cycles) before the next arm's
        if device.type == "cuda":
            torch.cuda.empty_cache()
        progress(f"  {arm.label:22s} {describe(row)}  ({time.perf_counter() - t0:.0f} s)")
        _ratios(rows)
        if on_arm:
            on_arm(result)
    return result


def _ratios(rows: list[dict]) -> None:
    """Each row's figures over those of `full` at its batch, where both have them."""
    for row in rows:
        ref = next((r for r in rows if r["method"] == "full" and r["batch"] == row["batch"]), {})
        for key in ("seconds_per_step", "peak_memory_mb", "flops", "ops", "memory_estimate_mb"):
            if key in row:
                row[f"{key}_vs_full"] = row[key] / ref[key] if ref.get(key) else None


def _earlier_count(result: dict, arm: Arm) -> dict | None:
    for row in result["rows"]:
        same_ckpt = arm.checkpointing is None or row.get("checkpointing") == arm.checkpointing
        if (row["method"], row["segments"], row["batch"]) == (arm.method, arm.segments, arm.batch) and same_ckpt:
            return {k: row[k] for k in ("flops", "ops", "memory_estimate_mb", "calls", "grad_calls") if k in row}
    return None
