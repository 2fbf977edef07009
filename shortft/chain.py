"""The denoising chains that carry gradient: ShortFT and the baselines, over one step primitive.

Every method is a call plan (which call at which timestep, from the run's `TrainingPlan`) plus a
gradient mode per call:

    "none"           the whole step under no_grad (the latent arrives detached)
    "grad"           gradient through the network call and the update
    "detach_output"  network output detached, x_t not (AlignProp's early steps; DRTune's frozen steps)
    "detach_input"   network input detached, output not (DRTune's trained steps)

and `run_calls` is the one loop that executes them (see `denoiser.py` for the call and the update).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from shortft.denoiser import Condition, Denoiser
from shortft.plan import Call, TrainingPlan

GRAD_MODES = ("grad", "detach_input")  # the modes whose network call gradient flows through


def run_calls(denoiser: Denoiser, x: torch.Tensor, calls: Sequence[Call], modes: Sequence[str],
              condition: Condition, on_call: Callable[[int, Call, torch.Tensor], None] | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The chain loop. x: [B, 4, h, w] latents at calls[0].t. Returns (latents after the last call, its x0)."""
    x0 = x
    for n, (call, mode) in enumerate(zip(calls, modes)):
        if mode not in ("none", "detach_output", *GRAD_MODES):
            raise ValueError(f"unknown gradient mode {mode!r}")
        with torch.no_grad() if mode in ("none", "detach_output") else nullcontext():
            out = denoiser.predict(x.detach() if mode == "detach_input" else x, call, condition)
        with torch.no_grad() if mode == "none" else nullcontext():
            x, x0 = denoiser.ddim(x, out, call.t, call.t_next)
        denoiser.count.calls += 1
        # backward passes through this call: not a frozen call on a latent made without gradient (the
        # jump that opens a later progressive stage), which its mode alone would count
        denoiser.count.grad_calls += int(out.requires_grad)
        if on_call is not None:
            on_call(n, call, x)
    return x, x0


# ---------------------------------------------------------------------------------------------
# Methods. Each returns the latents that go to the VAE and the reward: [B', 4, h, w], B' a multiple of B.


@dataclass
class ChainInput:
    latents: torch.Tensor  # [B, 4, h, w] initial noise x_T
    condition: Condition
    stage: int = 1  # progressive stage (ShortFT)
    generator: torch.Generator | None = None  # random cuts/copies, seeded per step for exact resume
    on_call: Callable | None = None  # test/inspection hook: (n, call, latents)
    # One per sample, going on from where its noise was drawn (`draws.draw_batch`): a sample's own randomness
    # (draft_lv's re-noise) is then the same whichever rank draws it and in whatever batch.
    sample_generators: Sequence[torch.Generator] | None = None


def _randint(lo: int, hi: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(lo, max(hi, lo + 1), (1,), generator=generator).item())


def _step_at(fraction: float, steps: int, to_int: Callable[[float], int] = math.floor) -> int:
    """The step a fraction of the chain names, rounded first: floor(0.58 * 50) is floor(28.999999999999996),
    one step short of what was written (and ceil(0.07 * 100) one past)."""
    return to_int(round(fraction * steps, 9))


def _truncate(calls: Sequence[Call], modes: list[str], plan: TrainingPlan) -> list[str]:
    cut = _step_at(plan.chain.truncate_at, plan.chain.steps)
    return ["none" if c.index < cut else m for c, m in zip(calls, modes)]


def _calls(denoiser: Denoiser, plan: TrainingPlan, stage: int = 1) -> list[Call]:
    return plan.calls(denoiser.timesteps(plan.chain.steps), stage)


def shortft(denoiser: Denoiser, inputs: ChainInput, plan: TrainingPlan) -> torch.Tensor:
    calls = _calls(denoiser, plan, inputs.stage)
    first = plan.first_grad_segment(inputs.stage)
    modes = ["none" if c.segment < first else "grad" for c in calls]
    return run_calls(denoiser, inputs.latents, calls, _truncate(calls, modes, plan), inputs.condition,
                     inputs.on_call)[0]


def full(denoiser: Denoiser, inputs: ChainInput, plan: TrainingPlan) -> torch.Tensor:
    calls = _calls(denoiser, plan)
    modes = _truncate(calls, ["grad"] * len(calls), plan)
    return run_calls(denoiser, inputs.latents, calls, modes, inputs.condition, inputs.on_call)[0]


def draft(denoiser: Denoiser, inputs: ChainInput, plan: TrainingPlan) -> torch.Tensor:
    calls = _calls(denoiser, plan)
    modes = ["grad" if c.index >= plan.chain.steps - plan.chain.last_k else "none" for c in calls]
    return run_calls(denoiser, inputs.latents, calls, _truncate(calls, modes, plan), inputs.condition,
                     inputs.on_call)[0]


def draft_lv(denoiser: Denoiser, inputs: ChainInput, plan: TrainingPlan) -> torch.Tensor:
    """DRaFT-LV: K=1, and the last step repeated on `lv_copies` re-noised copies of the final latent."""
    *head, last = _calls(denoiser, plan)
    x, _ = run_calls(denoiser, inputs.latents, head, ["none"] * len(head), inputs.condition, inputs.on_call)
    outs = [run_calls(denoiser, x, [last], ["grad"], inputs.condition)[0]]
    clean = outs[0].detach()
    for _ in range(plan.chain.lv_copies):
        if inputs.sample_generators:  # per sample: rank 1's copies were rank 0's noise again
            noise = torch.cat([torch.randn((1, *clean.shape[1:]), generator=g, dtype=clean.dtype)
                               for g in inputs.sample_generators]).to(clean.device)
        else:
            noise = torch.randn(clean.shape, generator=inputs.generator, dtype=clean.dtype).to(clean.device)
        outs.append(run_calls(denoiser, denoiser.renoise(clean, last.t, noise), [last], ["grad"], inputs.condition)[0])
    return torch.cat(outs)  # [(1 + n) * B, ...]


def alignprop_modes(calls: Sequence[Call], plan: TrainingPlan, generator: torch.Generator | None) -> list[str]:
    """AlignProp's cut over `chain.alignprop_range` (as step indices lo..hi). `per_step`, as its authors'
    code and TRL run it: at each step i a fresh u ~ U{lo..hi} is drawn and the UNet output is detached
    when i < u, so step i trains with probability (i - lo + 1) / (hi - lo + 1), (i + 1) / (N + 1) over the
    whole chain. `contiguous`: one cut drawn per chain, every step from it on trains."""
    lo, hi = (_step_at(f, plan.chain.steps) for f in plan.chain.alignprop_range)
    if plan.chain.alignprop_cut == "per_step":
        cuts = torch.randint(lo, hi + 1, (len(calls),), generator=generator).tolist()
        return ["detach_output" if c.index < u else "grad" for c, u in zip(calls, cuts)]
    cut = _randint(lo, hi, generator)
    return ["detach_output" if c.index < cut else "grad" for c in calls]


def alignprop(denoiser: Denoiser, inputs: ChainInput, plan: TrainingPlan) -> torch.Tensor:
    """AlignProp: UNet outputs detached before the random cut (x_t keeps its gradient path)."""
    calls = _calls(denoiser, plan)
    modes = alignprop_modes(calls, plan, inputs.generator)
    return run_calls(denoiser, inputs.latents, calls, _truncate(calls, modes, plan), inputs.condition,
                     inputs.on_call)[0]


def refl(denoiser: Denoiser, inputs: ChainInput, plan: TrainingPlan) -> torch.Tensor:
    """ReFL: no gradient until a random step in the late window; that step's predicted x0 is the output."""
    calls = _calls(denoiser, plan)
    lo, hi = (_step_at(f, plan.chain.steps) for f in plan.chain.refl_window)
    stop = min(_randint(lo, hi, inputs.generator), plan.chain.steps - 1)
    calls = calls[: stop + 1]
    modes = ["none"] * stop + ["grad"]
    return run_calls(denoiser, inputs.latents, calls, modes, inputs.condition, inputs.on_call)[1]


def drtune_plan(steps: int, plan: TrainingPlan, generator: torch.Generator | None) -> tuple[int, list[int]]:
    """DRTune's draw for one iteration: the early stop (how many calls run; uniform over
    `chain.drtune_stop_range` as fractions of the chain) and the at most K = `chain.drtune_train_steps`
    trained steps among them, evenly spaced from a random offset."""
    chain = plan.chain
    lo, hi = (max(1, _step_at(f, steps, math.ceil)) for f in chain.drtune_stop_range)
    stop = _randint(lo, hi + 1, generator)
    spacing = math.ceil(stop / chain.drtune_train_steps)  # so that no draw trains more than K
    offset = _randint(0, spacing, generator)
    return stop, list(range(offset, stop, spacing))


def drtune(denoiser: Denoiser, inputs: ChainInput, plan: TrainingPlan) -> torch.Tensor:
    """DRTune: denoiser input detached at every step (x_t keeps its path through the update), gradient
    through the network on K evenly spaced steps, the chain stopped early at a step drawn per iteration
    and that step's predicted x0 scored."""
    stop, trained = drtune_plan(plan.chain.steps, plan, inputs.generator)
    calls = _calls(denoiser, plan)[:stop]
    modes = ["detach_input" if c.index in trained else "detach_output" for c in calls]
    x, x0 = run_calls(denoiser, inputs.latents, calls, _truncate(calls, modes, plan), inputs.condition,
                      inputs.on_call)
    return x if stop == plan.chain.steps else x0


METHODS: dict[str, Callable[[Denoiser, ChainInput, TrainingPlan], torch.Tensor]] = {
    "shortft": shortft, "full": full, "draft": draft, "draft_lv": draft_lv,
    "alignprop": alignprop, "refl": refl, "drtune": drtune,
}


def sample(denoiser: Denoiser, inputs: ChainInput, plan: TrainingPlan) -> torch.Tensor:
    """Latents for the reward, with the gradient pattern of the plan's method."""
    return METHODS[plan.chain.method](denoiser, inputs, plan)


@torch.no_grad()
def original_sampler(denoiser: Denoiser, latents: torch.Tensor, condition: Condition, calls: Sequence[Call],
                     ) -> torch.Tensor:
    """The ORIGINAL N-step sampler (`TrainingPlan.inference_calls`): inference and evaluation, no shortcut."""
    return run_calls(denoiser, latents, calls, ["none"] * len(calls), condition)[0]


__all__ = ["ChainInput", "Condition", "Denoiser", "METHODS", "sample", "original_sampler", "run_calls"]
