"""Timestep plans: which network call runs at which timestep, with which model and which LoRAs.

A plan is a plain list of `Call`s. The original N-step sampler is one call per timestep. The ShortFT
chain (DESIGN.md section 2) splits the N steps into k segments; segment 1 (the head) runs its original
steps with LoRA_1; every later segment j runs one frozen-shortcut jump across its interior and then ONE
original step at its last timestep with LoRA_1..j. For N=50, k=4 on SD's leading timesteps:

    head 981..761 (12 steps), jump 741->501, step 501, jump 481->261, step 261, jump 241->1, step 1

i.e. 12 + 2*3 = 18 calls instead of 50.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

FINAL = -1  # t_next of the last step: the clean sample


@dataclass(frozen=True)
class Call:
    index: int  # position of the starting timestep in the N-step schedule
    t: int
    t_next: int  # where the call lands; FINAL for the clean sample
    shortcut: bool  # True: the frozen few-step model jumps t -> t_next
    adapters: tuple[str, ...]  # LoRAs active for this call (empty for the shortcut)
    segment: int  # 1-based

    def describe(self) -> str:
        to = "x0" if self.t_next == FINAL else str(self.t_next)
        what = "shortcut jump" if self.shortcut else "original step"
        loras = "+".join(self.adapters) if self.adapters else "no LoRA"
        return f"seg {self.segment}  {what:13s} {self.t:4d} -> {to:>4s}  [{loras}]"


def segment_bounds(steps: int, segments: int) -> list[int]:
    """Start indices of the k segments plus N: floor(N*j/k), e.g. [0, 12, 25, 37, 50] for 50/4."""
    return [steps * j // segments for j in range(segments + 1)]


def segment_of(index: int, bounds: Sequence[int]) -> int:
    return max(j for j in range(1, len(bounds)) if bounds[j - 1] <= index)


def _next_t(timesteps: Sequence[int], i: int) -> int:
    return int(timesteps[i + 1]) if i + 1 < len(timesteps) else FINAL


def stacked(names: Sequence[str]) -> Callable[[int], tuple[str, ...]]:
    """Timestep-aware LoRAs: segment j uses LoRA_1..j; a single name is shared by every segment."""
    if not names:
        return lambda segment: ()
    if len(names) == 1:
        return lambda segment: (names[0],)
    return lambda segment: tuple(names[:segment])


def sampler_plan(
    timesteps: Sequence[int],
    segments: int,
    adapters_for: Callable[[int], tuple[str, ...]],
    interior: str = "segment",
) -> list[Call]:
    """The original N-step sampler with the learned LoRAs (inference, evaluation, progressive warm-up).

    interior="none" runs the steps a ShortFT chain skips (the interiors of segments 2..k) without LoRA.
    """
    bounds = segment_bounds(len(timesteps), segments)
    calls = []
    for i, t in enumerate(timesteps):
        seg = segment_of(i, bounds)
        skipped = seg > 1 and i < bounds[seg] - 1
        adapters = () if interior == "none" and skipped else adapters_for(seg)
        calls.append(Call(i, int(t), _next_t(timesteps, i), False, adapters, seg))
    return calls


def shortft_plan(
    timesteps: Sequence[int],
    segments: int,
    adapters_for: Callable[[int], tuple[str, ...]],
    stage: int = 1,
    interior: str = "segment",
) -> list[Call]:
    """The ShortFT training chain for progressive stage `stage` (1 = the whole short chain).

    Segments before `stage` run the original steps (the caller runs them without gradient), so that
    the LoRAs being trained see inputs from the true trajectory.
    """
    bounds = segment_bounds(len(timesteps), segments)
    calls = [c for c in sampler_plan(timesteps, segments, adapters_for, interior) if c.segment < stage]
    for seg in range(stage, segments + 1):
        start, end = bounds[seg - 1], bounds[seg]
        last = end - 1
        if seg == 1:
            calls += [Call(i, int(timesteps[i]), _next_t(timesteps, i), False, adapters_for(1), 1) for i in range(end)]
            continue
        if last > start:  # a one-step segment has no interior to jump across
            calls.append(Call(start, int(timesteps[start]), int(timesteps[last]), True, (), seg))
        calls.append(Call(last, int(timesteps[last]), _next_t(timesteps, last), False, adapters_for(seg), seg))
    return calls


def format_plan(calls: Sequence[Call]) -> str:
    lines = [f"{n:3d}  {c.describe()}" for n, c in enumerate(calls, 1)]
    return "\n".join(lines + [f"{len(calls)} network calls"])
