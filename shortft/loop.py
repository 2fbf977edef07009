"""The training loop: prompts -> embeddings -> chain -> VAE decode -> reward -> loss -> backward -> clip -> step.

`train(cfg)` runs one fine-tuning in this process (CPU or one GPU). It reports through `Callback`s, the
seam where the Ray and MLflow layers plug in; the loop itself imports neither.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from shortft import checkpoint, new_run, run_lock
from shortft.budget import Budget
from shortft.chain import ChainInput, sample
from shortft.checks import check, checked_callbacks
from shortft.config import Config, ConfigError, flatten, to_dict
from shortft.data import run_prompts
from shortft.denoiser import CallCount
from shortft.draws import CHAIN_STREAM, draw_batch, seeded
from shortft.evaluate import evaluate, scalars
from shortft.guard import Guard
from shortft.interrupt import StopRequest, stop_requests
from shortft.lora import lora_params
from shortft.lora_save import save_loras_whole
from shortft.models import Models, load_models
from shortft.memory import explained, peak_memory_mb
from shortft.metrics_file import last_evaluation, read_metrics
from shortft.preflight import memory_of
from shortft.out_paths import output_folder, write_whole
from shortft.progress import bar, say, warn
from shortft.ranks import all_reduce_grads, all_reduce_mean, same_on_all
from shortft.resume_settings import check_workers
from shortft.rewards import Rewards


class Callback:
    """Override what you need. Called on every rank under torch.distributed (files are written by
    rank 0 only, so `artifacts` is empty elsewhere); a callback that should act once checks its rank."""

    def on_start(self, models: Models, start_step: int) -> None: ...

    def on_step(self, step: int, metrics: dict[str, float], artifacts: dict[str, Path]) -> None:
        """After each optimizer step. metrics include `eval/*` on evaluation steps; artifacts may hold
        `checkpoint` (a checkpoint dir written this step) and `grid` (the eval sample grid PNG)."""

    def on_end(self, result: "TrainResult") -> None:
        """After the final LoRA is saved."""


@dataclass
class TrainResult:
    output_dir: Path
    lora_dir: Path
    steps: int
    eval: dict[str, Any] = field(default_factory=dict)  # scalars, and `eval/objective_samples` (a list per prompt)
    history: list[dict] = field(default_factory=list)


# What every step logs (metrics.jsonl, MLflow, Ray Train), besides "reward" and "reward/<term>".
STEP_METRICS = ("step", "stage", "loss", "grad_norm", "skipped", "network_calls", "grad_calls", "train_seconds",
                "calls_total", "lr", "seconds_per_step", "images_per_second", "peak_memory_mb")


def micro_batch_loss(models: Models, rewards: Rewards, cfg: Config, prompts: list[str], noise: torch.Tensor,
                     stage: int, generator: torch.Generator, autocast=nullcontext(), sample_generators=None,
                     ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """prompts -> text states -> chain -> VAE decode -> reward terms -> loss (scaled for grad_accum).
    noise: [B, 4, h, w]. Returns (loss, weighted reward [B'], terms {name: [B']}), B' = B * copies."""
    chain = cfg.chain
    refl = chain.method == "refl"
    guidance = chain.refl_guidance if refl and chain.refl_guidance is not None else chain.guidance_scale
    condition = models.condition(prompts, guidance, cfg.model.shortcut_guidance_scale)
    with autocast:
        inputs = ChainInput(noise, condition, stage, generator, sample_generators=sample_generators)
        latents = sample(models.denoiser, inputs, models.plan)
        images = models.decode(latents)  # [B', 3, H, W], B' = B * copies (draft_lv)
        batch_prompts = prompts * (images.shape[0] // len(prompts))
        terms = rewards.terms(images, batch_prompts, list(rewards.weights))
        reward = rewards.weighted(terms)  # [B']
        objective = torch.relu(chain.refl_margin - reward) if refl and chain.refl_margin is not None else -reward
        return objective.mean() / cfg.train.grad_accum, reward, terms


def autocast_for(cfg: Config, device: torch.device):
    mode = cfg.train.mixed_precision
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "no"
    if mode == "no":
        return nullcontext(), mode
    return torch.autocast(device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16), mode


def train(cfg: Config, callbacks: list[Callback] = (), resume: bool | str | Path | checkpoint.Fallback = False,
          rank: int = 0, world_size: int = 1, asked: Callable[[], int] | None = None,
          new_run_checked: bool = False) -> TrainResult:
    """One fine-tuning run. Under torch.distributed (rank/world_size > 1): each rank draws its own share of
    every batch, LoRA gradients and metrics are averaged over ranks, and only rank 0 writes files. Ctrl-C
    or SIGTERM (in the main thread), or a stop `asked` from outside (its signal number, 0 for none; rank 0's
    reaches every rank), ends the step in progress with a checkpoint and raises `Interrupted`. Rank 0 keeps
    the run folder locked (`run_lock`): another process training there is waited for, then refused. A new run (no
    `resume`) is refused where `cfg.output_dir` holds checkpoints, unless `new_run_checked`: Ray Train's
    driver checked the folder, and its restart of workers that failed before the first checkpoint it
    recorded starts again at step 0 over what they wrote."""
    check(cfg)
    callbacks = checked_callbacks(callbacks)
    checkpoint.check_resume_path(resume)
    with run_lock.held(cfg.output_dir) if rank == 0 else nullcontext(), stop_requests(asked) as stop:
        return _train(cfg, callbacks, resume, rank, world_size, stop, new_run_checked)


def _train(cfg: Config, callbacks, resume, rank: int, world_size: int, stop: StopRequest,
           new_run_checked: bool = False) -> TrainResult:
    out, is_main = cfg.output_dir, rank == 0
    fork = new_run.is_fork(resume, out)
    if (not resume or fork) and not new_run_checked:  # a fork from another run's checkpoint is a new run here
        new_run.check_new_run(out, cfg.train.output_dir, cfg.train.steps, Path(resume) if fork else None)
    if is_main:
        output_folder("train.output_dir", out).mkdir(parents=True, exist_ok=True)

    # 1. The prompts (both sets read now); load and freeze; add the LoRAs (zero-initialised) and the rewards.
    prompts = run_prompts(cfg)
    with explained(cfg, "loading the models", "loading"):
        models = load_models(cfg)
        rewards = Rewards(cfg.reward.weights, cfg.reward.options, [cfg.eval.objective, *cfg.eval.terms], models.device)
    unet, plan, adapters = models.unet, models.plan, models.adapters

    # 2. One optimizer over every LoRA; frozen stages simply get no gradient.
    params = {name: list(lora_params(unet, name).values()) for name in adapters}
    optimizer = torch.optim.AdamW([p for name in adapters for p in params[name]], lr=cfg.train.lr,
                                  weight_decay=cfg.train.weight_decay)
    autocast, amp = autocast_for(cfg, models.device)
    scaler = torch.amp.GradScaler(models.device.type, enabled=amp == "fp16")
    lora_json = plan.lora_json(models.denoiser.timesteps(cfg.chain.steps))
    if is_main:
        say(memory_of(models, rewards, cfg))

    # 3. Resume: LoRA, optimizer, RNG, step and the budget spent from the latest (or given) checkpoint.
    start, history, state, path = 0, [], {}, None
    metrics_file = out / "metrics.jsonl"
    if resume:
        path, state, changed = checkpoint.restore(resume, out / "checkpoints", unet, adapters, optimizer, scaler,
                                                  flatten(to_dict(cfg)))
        if path is None:
            if is_main:
                warn(f"no checkpoint under {out / 'checkpoints'}; starting from step 0")
        else:
            if changed and is_main:
                warn("resume: settings changed since the checkpoint: " + ", ".join(changed))
            if is_main and path.parent.resolve() == (out / "checkpoints").resolve():
                for left in checkpoint.set_aside_newer(path.parent, state["step"]):
                    warn(f"resume: {left.name[left.name.index('step_'):]} was after {path.name}: renamed {left}")
            check_workers(path, state, world_size)
            start = state["step"]
            if is_main:  # ranks that resumed elsewhere stop below, each naming its own
                warn(f"resumed from {path} at step {start}" + (f"; this run writes to {out}, not to the folder of "
                                                              "that checkpoint's run" if fork else ""))
    if not same_on_all(start, models.device, world_size):  # a worker went back a checkpoint the others did not
        raise ConfigError(f"resume: the workers found different checkpoints (this one {path} at step {start}); "
                          "check the storage path every worker reads, then --resume again")
    budget, guard = Budget.of(cfg.train, state), Guard(cfg, scaler, amp, state.get("bad_in_row", 0))
    if is_main:
        # written once a resume is accepted: a refused one leaves the run's own settings
        write_whole(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        # keep the rows up to the resumed step, so no step is logged twice
        history = [r for r in read_metrics(metrics_file) if r.get("step", 0) <= start]
        with checkpoint.written(f"{metrics_file} not written again", out / "checkpoints"):
            write_whole(metrics_file, "".join(json.dumps(r) + "\n" for r in history))
    for cb in callbacks:
        cb.on_start(models, start)
    total, done = cfg.train.steps, start
    evaluated, eval_metrics = last_evaluation(history)  # a resumed run that spent its budget keeps its last one
    remaining = range(start, start if budget.done(start) else total)
    if is_main and resume and not remaining:  # one killed after a checkpoint past its last evaluation: evaluated now
        again = "" if evaluated == start else (f"; its last evaluation was of step {evaluated}: evaluating step "
                                               f"{start}'s LoRAs")
        warn(f"resume: step {start} of train.steps={total} (or the budget) reached; nothing left to train{again}")
        if again:
            eval_metrics = evaluate(models, cfg, rewards, out / "samples" / f"step_{start:06d}.png", grid_optional=True)
    steps = bar(initial=start, total=total, desc="train", unit="step", show=is_main)  # ends at the last step
    for step in remaining:
        t0 = time.perf_counter()
        stage = budget.stage(step, plan.stages)
        training = set(plan.trainable(stage))
        models.denoiser.count = CallCount()  # network calls of this step, logged with it
        for name in adapters:
            for p in params[name]:
                p.requires_grad_(name in training)
                if name not in training:  # frozen for the rest of the run: AdamW's moments would only fill checkpoints
                    optimizer.state.pop(p, None)

        # 4. Micro-batches: chain -> decode -> reward -> loss -> backward.
        with explained(cfg, f"in step {step + 1}", "step"):  # AdamW's state is made in the first step's update
            sums: dict[str, float] = {}
            for micro in range(cfg.train.grad_accum):
                batch, noise, gens = draw_batch(models, prompts, cfg.train.seed, step, micro,
                                                rank * cfg.train.batch_size, cfg.train.batch_size)
                generator = seeded(cfg.train.seed, step, micro, CHAIN_STREAM)
                loss, reward, terms = micro_batch_loss(models, rewards, cfg, batch, noise, stage, generator, autocast, gens)
                scaler.scale(loss).backward()
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                sums["reward"] = sums.get("reward", 0.0) + float(reward.detach().mean()) / cfg.train.grad_accum
                for n, v in terms.items():
                    sums[f"reward/{n}"] = sums.get(f"reward/{n}", 0.0) + float(v.detach().mean()) / cfg.train.grad_accum
                del terms, reward, loss  # free the graph before the next micro-batch

            # 5. Average over ranks, clip, guard against non-finite values, step.
            trainable = [p for name in adapters if name in training for p in params[name]]  # same order on every rank
            all_reduce_grads(trainable, world_size)  # before unscale_: every rank finds the same fp16 overflow
            scaler.unscale_(optimizer)
            keys = sorted(sums)  # and a stop request, so that every rank stops after the same step
            *values, asked_by = all_reduce_mean([*(sums[k] for k in keys), stop.pending()], models.device, world_size)
            sums = dict(zip(keys, values))
            stop.agree(round(asked_by * world_size))
            grads = [p.grad for p in trainable if p.grad is not None]
            grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            if cfg.train.grad_clip > 0 and grads:
                torch.nn.utils.clip_grads_with_norm_(trainable, cfg.train.grad_clip, torch.tensor(grad_norm))
            skipped = guard.check(sums["loss"], grad_norm)
            if skipped is None:
                scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)

        # 6. Evaluate, write the row, checkpoint, then report the step (with what was written) in one call. The
        # last step is train.steps or the one that used up a budget (ranks agree: they spend the mean time).
        seconds = time.perf_counter() - t0
        budget.spend(all_reduce_mean([seconds], models.device, world_size)[0] if budget.seconds else seconds,
                     models.denoiser.count.calls)
        done, last = step + 1, budget.done(step + 1)
        images_seen = cfg.train.batch_size * cfg.train.grad_accum * world_size
        metrics = {"step": step + 1, "stage": stage, **sums, "grad_norm": grad_norm, "skipped": int(skipped is not None),
                   "network_calls": models.denoiser.count.calls, "grad_calls": models.denoiser.count.grad_calls,
                   "lr": optimizer.param_groups[0]["lr"], "seconds_per_step": seconds,
                   "images_per_second": images_seen / seconds, "peak_memory_mb": peak_memory_mb(models.device),
                   "train_seconds": budget.spent_seconds, "calls_total": budget.spent_calls}
        if is_main and ((step + 1) % cfg.train.log_every == 0 or last):
            say(f"step {step + 1}/{total}  stage {stage}/{plan.stages}  loss {sums['loss']:+.4f}  "
                f"grad {grad_norm:.3g}  {seconds:.2f} s/step" + (f"  SKIPPED ({skipped})" if skipped else ""))
        artifacts: dict[str, Path] = {}
        if is_main and ((cfg.eval.every and (step + 1) % cfg.eval.every == 0) or last):
            artifacts["grid"] = out / "samples" / f"step_{step + 1:06d}.png"
            t_eval = time.perf_counter()
            with explained(cfg, f"in the evaluation at step {step + 1}", "evaluation"):
                eval_metrics = evaluate(models, cfg, rewards, artifacts["grid"], grid_optional=True)
            metrics.update(eval_metrics, eval_seconds=time.perf_counter() - t_eval)
            artifacts = {k: path for k, path in artifacts.items() if path.is_file()}  # a grid not written: warned
            say("eval  " + "  ".join(f"{k[5:]} {v:+.4f}" for k, v in scalars(eval_metrics).items()))
        stopping = stop.signal is not None and not last  # read once; under Ray, ranks agreed in the all-reduce
        if stopping:
            metrics["interrupted"] = 1  # the step a stop request ended the run at (Ray Train is told it)
        history.append(metrics)
        if is_main:
            with checkpoint.written(f"step {step + 1}'s row not written to {metrics_file}", out / "checkpoints"):
                with metrics_file.open("a") as f:
                    f.write(json.dumps(metrics) + "\n")
        # The row first: a run resumed from this checkpoint finds the step's evaluation (a trial resumed at its
        # last step has nothing else to give Tune); one that died in between redoes the step.
        every = cfg.train.checkpoint_every
        if is_main and ((every and (step + 1) % every == 0) or last or stopping):
            state = {"bad_in_row": guard.bad_in_row, "world_size": world_size, **budget.state(),
                     "config": flatten(to_dict(cfg))}  # what a resume compares its settings with
            artifacts["checkpoint"] = checkpoint.save(out / "checkpoints", step + 1, unet, adapters, optimizer, state,
                                                      lora_json, cfg.train.keep_checkpoints, scaler)
        for cb in callbacks:
            cb.on_step(step + 1, metrics, artifacts)
        guard.stop_if_diverged(step + 1)
        steps.update()
        if last:
            break
        if stopping:
            stop.stop(step + 1, artifacts.get("checkpoint"))
    steps.close()

    lora_dir = out / "lora"
    if is_main:
        with checkpoint.written(f"the final LoRAs not written to {lora_dir}", out / "checkpoints"):
            save_loras_whole(unet, adapters, lora_dir, lora_json)
            write_whole(out / "result.json", json.dumps({"steps": done, "lora_dir": str(lora_dir), "eval": eval_metrics,
                                                        **budget.state()}))
    result = TrainResult(out, lora_dir, done, eval_metrics, history)
    for cb in callbacks:
        cb.on_end(result)
    return result
