"""The loop's guard against non-finite steps: which steps are skipped, when the run stops, and its line.

    guard = Guard(cfg, scaler, amp, bad_in_row)   # bad_in_row: from the checkpoint a run resumes
    skipped = guard.check(loss, grad_norm)       # None: step; else why the update is skipped
    guard.stop_if_diverged(step)                 # NonFiniteError after train.max_bad_steps bad steps in a row

Under fp16 autocast a step whose loss is finite and whose gradient is not is the loss scale overflowing:
GradScaler skips the update and halves the scale, by design, and early in a run that happens several
times in a row (the scale starts at 2**16). Counting those as bad steps stopped fp16 runs that the scaler
was about to recover. They count once the scale is below 1, where the gradient overflows unscaled.
"""

from __future__ import annotations

import math

import torch

from shortft.config import Config


class NonFiniteError(RuntimeError):
    """Too many non-finite losses or gradients in a row."""


class Guard:
    def __init__(self, cfg: Config, scaler: torch.amp.GradScaler, amp: str, bad_in_row: int = 0):
        self.cfg, self.scaler, self.amp, self.bad_in_row = cfg, scaler, amp, bad_in_row

    def check(self, loss: float, grad_norm: float) -> str | None:
        """None where the step updates the LoRAs; else why it does not (the progress line's SKIPPED)."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.bad_in_row = 0
            return None
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 0.0
        if math.isfinite(loss) and scale >= 1:
            return f"fp16 overflow, loss scale {scale:g} -> {scale * self.scaler.get_backoff_factor():g}"
        self.bad_in_row += 1
        return "non-finite"

    def stop_if_diverged(self, step: int) -> None:
        """Raise NonFiniteError once train.max_bad_steps steps in a row were bad; `step` counts from 1."""
        bad, train = self.bad_in_row, self.cfg.train
        if bad < train.max_bad_steps:
            return
        what = f"step {step} had" if bad == 1 else f"{bad} steps in a row had"
        fixes = [f"lower train.lr (now {train.lr:g})"]
        if train.grad_clip == 0:
            fixes.append("set train.grad_clip (0: no clipping)")
        if self.amp == "fp16":
            fixes.append("use train.mixed_precision=bf16 or no (fp16 overflows)")
        where = "" if bad == 1 else f" (last at step {step})"
        raise NonFiniteError(f"{what} a non-finite loss or gradient{where}; {' or '.join(fixes)}")
