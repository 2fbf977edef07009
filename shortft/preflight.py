"""What a run needs before it starts, told without downloading or loading anything (`train --dry-run`).

- `downloads(cfg)`: every hub repo or file the run would fetch (base model, shortcut, reward models;
  `shortft.hub.sources`) and whether the local hub cache already has it.
- `SavedBytes`: the bytes autograd keeps for backward, counted while a step runs (`shortft bench`).
- `print_plan(cfg)`: the timestep plan of every stage (`shortft plan`), from the scheduler config alone.
- `memory(cfg)`: the weights' and the LoRAs' share of device memory, from parameter counts of the real
  architecture built on the meta device (no memory, no time). Activations depend on the chain and are
  measured by `shortft bench --count-only` (docs/models.md has the table for SD 1.5 and SDXL).
"""

from __future__ import annotations

import torch

from shortft.config import Config, ConfigError
from shortft.hub import in_folders, is_hub, sources, weight_file, weightless
from shortft.models import DTYPES


class SavedBytes:
    """Bytes of the tensors autograd saves for backward (parameters excluded), by storage."""

    def __init__(self, parameters):
        self.params = {p.untyped_storage()._cdata for p in parameters}
        self.saved: dict[int, int] = {}
        self.marked = 0  # the total at the first `mark()`

    def mark(self) -> None:
        """Remember what was saved up to now (the chain's share of a step: `marked`)."""
        self.marked = self.marked or self.total

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in self.params:
            self.saved[storage._cdata] = storage.nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def counting(self, checkpoint_fn):
        """diffusers' gradient-checkpointing function `checkpoint_fn`, counting each block's inputs."""
        def run(module, *args):
            if torch.is_grad_enabled():
                for a in args:
                    if isinstance(a, torch.Tensor):
                        self.pack(a)
            return checkpoint_fn(module, *args)

        return run

    @property
    def total(self) -> int:
        return sum(self.saved.values())


def downloads(cfg: Config) -> list[str]:
    """One line per hub source: what it is, repo (and file), and whether the hub cache has it."""
    merged: dict[tuple, list] = {}
    for src in sources(cfg):  # one line per source, whoever needs it
        merged.setdefault((src.repo, src.file, src.revision), []).append(src)
    lines = []
    for (repo, file, revision), same in merged.items():
        found = [weightless(src) for src in same]  # a repo may be one reward's processor, another's model
        empty = None if None in found else sorted({f for e in found for f in e})
        state = ("to download" if empty is None else f"to download: no weights {in_folders(empty)}" if empty
                 else "in the hub cache")
        shown = f"{repo}/{file}" if (file := weight_file(same[0])) else repo
        lines.append(f"  [{state}] {shown}{'@' + revision if revision else ''}  {'; '.join(s.what for s in same)}")
    return lines or ["  nothing: every model is local"]


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _reward_params(cfg: Config) -> tuple[int, list[str]]:
    """Parameters of the reward models (training and evaluation terms), built on the meta device, and the
    terms left uncounted: a factory of the user's without `random_weights` (built, it might load or download:
    the dry run loads nothing)."""
    from shortft.rewards.registry import build, loads_nothing_random

    total, uncounted = 0, []
    for name in dict.fromkeys([*cfg.reward.trained(), cfg.eval.objective, *cfg.eval.terms]):
        if not loads_nothing_random(name):
            uncounted.append(name)
            continue
        with torch.device("meta"):
            fn = build(name, cfg.reward.options.get(name), device="meta", random_weights=True)
        if isinstance(fn, torch.nn.Module):
            total += sum(p.numel() for p in fn.parameters())
    return total, uncounted


def memory(cfg: Config) -> tuple[str, int | None]:
    """Frozen weights in model.dtype plus the LoRAs with their gradients and AdamW state (fp32), and the
    reward models (bf16 on a GPU), from parameter counts; and their bytes (None: unknown)."""
    from shortft.architectures import HUB_IDS, random_pipeline
    from shortft.lora import add_loras, check_targets
    from shortft.models import frozen_parts, model_resolution
    from shortft.plan import training_plan

    if cfg.model.pretrained not in HUB_IDS and is_hub(cfg.model.pretrained):
        return ("memory: unknown architecture (not a local dir or one of the published ones in "
                "shortft/architectures.py)"), None
    pipe = random_pipeline(cfg.model.pretrained, device="meta")
    model_resolution(cfg, pipe)  # refused by the run once the model has loaded: said by the dry run too
    frozen = sum(p.numel() for part in frozen_parts(pipe) for p in part.parameters())
    check_targets(pipe.unet, cfg.lora.targets)  # as the run does, in one line (peft's error was a traceback)
    with torch.device("meta"):
        add_loras(pipe.unet, training_plan(cfg).adapters, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
    lora = sum(p.numel() for n, p in pipe.unet.named_parameters() if "lora_" in n)
    rewards, uncounted = _reward_params(cfg)
    note = "bf16 on a GPU" + (f"; not counted: {', '.join(uncounted)}, whose factory takes no random_weights"
                              if uncounted else "")
    text, need = _summary(frozen * DTYPES[cfg.model.dtype].itemsize, frozen, cfg.model.dtype, lora,
                          rewards * 2, note)  # reward dtype auto
    return text + "\n" + disk(cfg, lora), need


def disk(cfg: Config, lora: int) -> str:
    """What a run writes, from the LoRAs' parameter count: a checkpoint holds them in fp32 and AdamW's two
    moments of those still training (up to 12 bytes a parameter; SD 1.5's rank-128 timestep-aware LoRAs: 1.2 GB,
    0.6 GB in the last of 4 progressive stages)."""
    each, keep = lora * 12, cfg.train.keep_checkpoints
    return (f"disk: a checkpoint up to {_size(each)} (the LoRAs in fp32 and AdamW's two moments of those still "
            f"training); the run folder keeps {keep} (train.keep_checkpoints), {_size(each * (keep + 1))} while the "
            f"next is written, and the final LoRAs {_size(lora * 4)} (again in MLflow's artifacts, with tracking on); "
            f"a --workers run keeps {keep} more in its storage path, a sweep trial its best and latest (and, once "
            "ended, no longer those in its run folder); a sample grid per evaluation")


def memory_of(models, rewards, cfg: Config) -> str:
    """The same estimate from the loaded models (printed before the first training step)."""
    from shortft.models import frozen_parts

    trained = set(models.adapters)
    parts = [*frozen_parts(models.pipe), *([models.denoiser.shortcut_unet] if models.denoiser.shortcut_unet else [])]
    frozen = [p for part in parts for n, p in part.named_parameters() if not any(f".{a}." in n for a in trained)]
    lora = sum(p.numel() for n, p in models.unet.named_parameters() if any(f".{a}." in n for a in trained))
    reward_bytes = sum(p.numel() * p.element_size() for m in rewards.fns.values() if isinstance(m, torch.nn.Module)
                       for p in m.parameters())
    dtype = str(next(models.unet.parameters()).dtype).replace("torch.", "")
    text, _ = _summary(sum(p.numel() * p.element_size() for p in frozen), sum(p.numel() for p in frozen), dtype,
                       lora, reward_bytes, "as loaded")
    return text + "\n" + disk(cfg, lora)


def _summary(weights: int, frozen: int, dtype: str, lora: int, rewards: int, reward_note: str) -> tuple[str, int]:
    trained = lora * 4 * 4  # fp32 param, grad, AdamW's two moments
    need = weights + trained + rewards
    return (f"memory before activations: {_size(need)} = frozen model {_size(weights)} "
            f"({frozen / 1e6:.0f} M params, {dtype}) + LoRAs {_size(trained)} ({lora / 1e6:.2f} M params with "
            f"grads and AdamW state, fp32) + reward models {_size(rewards)} ({reward_note}); the chain's "
            "activations: shortft bench --random-weights --count-only (docs/models.md)"), need


def room(device_name: str) -> tuple[str, int] | None:
    """The memory a run on model.device=`device_name` has on this machine: (what it is, bytes); None where
    this machine has no such device (a dry run for another machine)."""
    import os

    from shortft.models import pick_device

    try:
        device = pick_device(device_name)
    except ConfigError:
        return None
    if device.type == "cuda":
        card = torch.cuda.get_device_properties(device)
        return f"{device} ({card.name}) has {_size(card.total_memory)}", card.total_memory
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"this machine has {_size(total)} of CPU memory", total


def too_big(cfg: Config, need: int | None) -> tuple[str, bool] | None:
    """Where what the run needs before activations is more than its device here holds: the line it would stop
    with, and whether that is certain (a GPU here, or model.device=cpu) or only a note (model.device=auto on a
    machine without a GPU: a dry run that plans a GPU run elsewhere). None where it may fit."""
    here = room(cfg.model.device) if need else None
    if here is None or need <= here[1]:
        return None
    planning = cfg.model.device == "auto" and not torch.cuda.is_available()
    line = (f"the run needs {_size(need)} before activations (above); {here[0]} (model.device={cfg.model.device}"
            f"{', no GPU here' if planning else ''}); lower lora.rank or take a larger machine")
    return line, not planning


def print_plan(cfg) -> None:
    from diffusers import DDIMScheduler

    from shortft import builtin
    from shortft.budget import Budget
    from shortft.plan import format_plan, schedule, training_plan

    from shortft.architectures import HUB_IDS
    from shortft.hub import is_hub

    path = builtin.resolve(cfg.model.pretrained)
    try:  # the plan never downloads: a hub model is read from the hub cache
        scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler", revision=cfg.model.revision,
                                                  local_files_only=True)
    except OSError as e:
        if not is_hub(cfg.model.pretrained):  # a local folder without one is not a diffusers model
            raise ConfigError(f"model.pretrained={cfg.model.pretrained!r}: no scheduler config here "
                              f"({str(e).splitlines()[0]}); download the model first") from None
        # the dry run lists what to download: it never stopped there for a model not yet downloaded (SD 2.x)
        print("(the model is not in the hub cache yet: the plan uses " + (
            "its published DDIM settings)" if cfg.model.pretrained in HUB_IDS else
            "SD 1.x/2.x/XL's DDIM settings, 1000 steps of scaled_linear betas 0.00085-0.012 with steps_offset 1, "
            "which this model's scheduler config may not share)"))
        scheduler = DDIMScheduler(**builtin.SD_SCHEDULER)
    if cfg.model.timestep_spacing:
        scheduler = DDIMScheduler.from_config(scheduler.config, timestep_spacing=cfg.model.timestep_spacing)
    timesteps = schedule(scheduler, cfg.chain.steps)
    plan = training_plan(cfg)
    print(f"method {cfg.chain.method}: N={cfg.chain.steps} original steps, k={cfg.chain.segments} segments, "
          f"{plan.stages} stage(s), LoRAs: {', '.join(plan.adapters)}")
    # the stages train.steps reaches: every one where there are as many steps; with fewer, the run skips some
    budget, stages = Budget.of(cfg.train), plan.stages
    reached = (set(range(1, stages + 1)) if cfg.train.steps >= stages
               else {budget.stage(step, stages) for step in range(cfg.train.steps)})
    if stages > 1 and (cfg.train.call_budget or cfg.train.time_budget_s):
        print("(the stages below split train.steps; with a budget they split it too, whichever is further along: a "
              "budget of fewer steps than there are stages skips some; docs/method.md)")
    for stage in range(1, plan.stages + 1):
        calls = plan.calls(timesteps, stage)
        skipped = f"; never run: train.steps={cfg.train.steps} < {plan.stages} stages" if stage not in reached else ""
        print(f"\nstage {stage}/{plan.stages}" + (f" (segments < {stage} run the original steps without gradient"
                                                  f"{skipped})" if stage > 1 else ""))
        print(format_plan(calls))


def report(cfg: Config) -> tuple[str, int | None]:
    """What the dry run prints after the plan, and the bytes the run needs before activations (None: unknown)."""
    text, need = memory(cfg)
    return "\n".join([text, "hub sources:", *downloads(cfg)]), need
