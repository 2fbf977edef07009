"""The denoising chains that carry gradient: ShortFT and the baselines, over one step primitive.

Every method is a plan (which call at which timestep, see `plan.py`) plus a gradient mode per call:

    "none"           the whole step under no_grad (the latent arrives detached)
    "grad"           gradient through the network call and the update
    "detach_output"  network output detached, x_t not (AlignProp's early steps; DRTune's frozen steps)
    "detach_input"   network input detached, output not (DRTune's trained steps)

and `run_calls` is the one loop that executes them. The update is deterministic DDIM (eta = 0) between
any two timesteps, which is both the original sampler's step and the shortcut's jump.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from shortft.config import ChainConfig
from shortft.lora import AdapterSwitch
from shortft.plan import FINAL, Call, sampler_plan, segment_bounds, shortft_plan, stacked


@dataclass
class Condition:
    """Text condition of one batch. cond/uncond: [B, L, D] text-encoder states."""

    cond: torch.Tensor
    uncond: torch.Tensor | None
    guidance_scale: float
    shortcut_guidance_scale: float


class Denoiser:
    """The networks and scheduler constants a step needs. The shortcut is either a LoRA on the same
    UNet (`shortcut_adapter`), a separate frozen UNet (`shortcut_unet`), or neither: then the frozen
    base model itself jumps across a segment in one DDIM step (a naive shortcut)."""

    def __init__(self, unet, scheduler, switch: AdapterSwitch, shortcut_unet=None, shortcut_adapter: str | None = None,
                 checkpointing: bool = False):
        self.unet = unet
        self.switch = switch
        self.shortcut_unet = shortcut_unet
        self.shortcut_adapter = shortcut_adapter
        self.checkpointing = checkpointing
        self.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
        self.final_alpha_cumprod = float(scheduler.final_alpha_cumprod)
        self.prediction_type = scheduler.config.prediction_type
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.scheduler = scheduler
        self._timesteps: dict[int, list[int]] = {}

    def timesteps(self, steps: int) -> list[int]:
        if steps not in self._timesteps:
            self.scheduler.set_timesteps(steps)
            self._timesteps[steps] = [int(t) for t in self.scheduler.timesteps]
        return self._timesteps[steps]

    def alpha(self, t: int) -> float:
        return self.final_alpha_cumprod if t == FINAL else float(self.alphas_cumprod[t])

    # -- the network call -----------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, call: Call, emb: torch.Tensor) -> torch.Tensor:
        # Adapters are switched inside the (possibly checkpointed) function so that the recompute in
        # backward runs with the same LoRAs as the forward did.
        if call.shortcut and self.shortcut_unet is not None:
            net = self.shortcut_unet
        else:
            net = self.unet
            self.switch.activate((self.shortcut_adapter,) if call.shortcut and self.shortcut_adapter else call.adapters)
        t = torch.tensor(call.t, device=x.device)
        return net(x, t, encoder_hidden_states=emb).sample

    def predict(self, x: torch.Tensor, call: Call, c: Condition) -> torch.Tensor:
        """Model output at x_t ([B, C, h, w]), with classifier-free guidance as the SD pipeline does it."""
        scale = c.shortcut_guidance_scale if call.shortcut else c.guidance_scale
        guided = scale > 1.0 and c.uncond is not None
        x_in = torch.cat([x, x]) if guided else x
        emb = torch.cat([c.uncond, c.cond]) if guided else c.cond
        if self.checkpointing and torch.is_grad_enabled():
            out = checkpoint(self._forward, x_in, call, emb, use_reentrant=False)
        else:
            out = self._forward(x_in, call, emb)
        if guided:
            uncond, cond = out.chunk(2)
            out = uncond + scale * (cond - uncond)
        return out

    # -- the update -----------------------------------------------------------------------------
    def x0_and_eps(self, x: torch.Tensor, out: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alpha(t)
        if self.prediction_type == "epsilon":
            return (x - math.sqrt(1 - a) * out) / math.sqrt(a), out
        if self.prediction_type == "v_prediction":
            return math.sqrt(a) * x - math.sqrt(1 - a) * out, math.sqrt(a) * out + math.sqrt(1 - a) * x
        if self.prediction_type == "sample":
            return out, (x - math.sqrt(a) * out) / math.sqrt(1 - a)
        raise ValueError(f"scheduler prediction_type {self.prediction_type!r} is not supported")

    def ddim(self, x: torch.Tensor, out: torch.Tensor, t: int, t_next: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Deterministic DDIM from t to t_next (any later timestep): returns (x_{t_next}, predicted x0)."""
        x0, eps = self.x0_and_eps(x, out, t)
        a_next = self.alpha(t_next)
        return math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps, x0

    def renoise(self, x0: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        a = self.alpha(t)
        return math.sqrt(a) * x0 + math.sqrt(1 - a) * noise


def run_calls(dn: Denoiser, x: torch.Tensor, calls: Sequence[Call], modes: Sequence[str], c: Condition,
              on_call: Callable[[int, Call, torch.Tensor], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The chain loop. x: [B, 4, h, w] latents at calls[0].t. Returns (latents after the last call, its x0)."""
    x0 = x
    for n, (call, mode) in enumerate(zip(calls, modes)):
        if mode == "none":
            with torch.no_grad():
                x, x0 = dn.ddim(x, dn.predict(x, call, c), call.t, call.t_next)
        elif mode == "grad":
            x, x0 = dn.ddim(x, dn.predict(x, call, c), call.t, call.t_next)
        elif mode == "detach_output":
            with torch.no_grad():
                out = dn.predict(x, call, c)
            x, x0 = dn.ddim(x, out, call.t, call.t_next)
        elif mode == "detach_input":
            x, x0 = dn.ddim(x, dn.predict(x.detach(), call, c), call.t, call.t_next)
        else:
            raise ValueError(f"unknown gradient mode {mode!r}")
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
    adapters: tuple[str, ...] = ("default",)
    stage_segment_grad: bool = True
    on_call: Callable | None = None  # test/inspection hook: (n, call, latents)


def _randint(lo: int, hi: int, g: torch.Generator | None) -> int:
    return int(torch.randint(lo, max(hi, lo + 1), (1,), generator=g).item())


def _truncate(calls: Sequence[Call], modes: list[str], cfg: ChainConfig) -> list[str]:
    cut = math.floor(cfg.truncate_at * cfg.steps)
    return ["none" if c.index < cut else m for c, m in zip(calls, modes)]


def interior(cfg: ChainConfig) -> str:
    """LoRAs on segment interiors: a ShortFT setting (its LoRAs never trained there); the baselines
    train one LoRA on every step, so it is always on for them."""
    return cfg.interior_adapters if cfg.method == "shortft" else "segment"


def plan_for(timesteps: Sequence[int], cfg: ChainConfig, adapters: Sequence[str], stage: int = 1) -> list[Call]:
    """The calls a method makes (for ShortFT: the short chain of `stage`; else the N-step sampler)."""
    adapters_for = stacked(adapters)
    if cfg.method == "shortft":
        return shortft_plan(timesteps, cfg.segments, adapters_for, stage, interior(cfg))
    return sampler_plan(timesteps, cfg.segments, adapters_for, interior(cfg))


def shortft(dn: Denoiser, inp: ChainInput, cfg: ChainConfig) -> torch.Tensor:
    calls = plan_for(dn.timesteps(cfg.steps), cfg, inp.adapters, inp.stage)
    first_grad_segment = inp.stage if inp.stage_segment_grad else inp.stage + 1
    modes = ["none" if c.segment < first_grad_segment else "grad" for c in calls]
    return run_calls(dn, inp.latents, calls, _truncate(calls, modes, cfg), inp.condition, inp.on_call)[0]


def full(dn: Denoiser, inp: ChainInput, cfg: ChainConfig) -> torch.Tensor:
    calls = plan_for(dn.timesteps(cfg.steps), cfg, inp.adapters)
    modes = _truncate(calls, ["grad"] * len(calls), cfg)
    return run_calls(dn, inp.latents, calls, modes, inp.condition, inp.on_call)[0]


def draft(dn: Denoiser, inp: ChainInput, cfg: ChainConfig) -> torch.Tensor:
    calls = plan_for(dn.timesteps(cfg.steps), cfg, inp.adapters)
    modes = ["grad" if c.index >= cfg.steps - cfg.last_k else "none" for c in calls]
    return run_calls(dn, inp.latents, calls, _truncate(calls, modes, cfg), inp.condition, inp.on_call)[0]


def draft_lv(dn: Denoiser, inp: ChainInput, cfg: ChainConfig) -> torch.Tensor:
    """DRaFT-LV: K=1, and the last step repeated on `lv_copies` re-noised copies of the final latent."""
    calls = plan_for(dn.timesteps(cfg.steps), cfg, inp.adapters)
    *head, last = calls
    x, _ = run_calls(dn, inp.latents, head, ["none"] * len(head), inp.condition, inp.on_call)
    outs = [run_calls(dn, x, [last], ["grad"], inp.condition)[0]]
    clean = outs[0].detach()
    for _ in range(cfg.lv_copies):
        noise = torch.randn(clean.shape, generator=inp.generator, dtype=clean.dtype).to(clean.device)
        outs.append(run_calls(dn, dn.renoise(clean, last.t, noise), [last], ["grad"], inp.condition)[0])
    return torch.cat(outs)  # [(1 + n) * B, ...]


def alignprop(dn: Denoiser, inp: ChainInput, cfg: ChainConfig) -> torch.Tensor:
    """AlignProp: UNet outputs detached before a random cut (x_t keeps its gradient path)."""
    calls = plan_for(dn.timesteps(cfg.steps), cfg, inp.adapters)
    lo, hi = (math.floor(f * cfg.steps) for f in cfg.alignprop_range)
    cut = _randint(lo, hi, inp.generator)
    modes = ["detach_output" if c.index < cut else "grad" for c in calls]
    return run_calls(dn, inp.latents, calls, _truncate(calls, modes, cfg), inp.condition, inp.on_call)[0]


def refl(dn: Denoiser, inp: ChainInput, cfg: ChainConfig) -> torch.Tensor:
    """ReFL: no gradient until a random step in the late window; that step's predicted x0 is the output."""
    calls = plan_for(dn.timesteps(cfg.steps), cfg, inp.adapters)
    lo, hi = (math.floor(f * cfg.steps) for f in cfg.refl_window)
    stop = min(_randint(lo, hi, inp.generator), cfg.steps - 1)
    calls = calls[: stop + 1]
    modes = ["none"] * stop + ["grad"]
    return run_calls(dn, inp.latents, calls, modes, inp.condition, inp.on_call)[1]


def drtune(dn: Denoiser, inp: ChainInput, cfg: ChainConfig) -> torch.Tensor:
    """DRTune: denoiser input detached at every step; gradient kept on K evenly spaced steps (random
    offset); optionally stop early and use that step's predicted x0."""
    calls = plan_for(dn.timesteps(cfg.steps), cfg, inp.adapters)
    stop = max(1, math.ceil(cfg.drtune_stop_at * cfg.steps))
    calls = calls[:stop]
    spacing = max(1, stop // cfg.drtune_train_steps)
    offset = _randint(0, spacing, inp.generator)
    trained = set(range(offset, stop, spacing))
    modes = ["detach_input" if c.index in trained else "detach_output" for c in calls]
    x, x0 = run_calls(dn, inp.latents, calls, _truncate(calls, modes, cfg), inp.condition, inp.on_call)
    return x if stop == cfg.steps else x0


METHODS: dict[str, Callable[[Denoiser, ChainInput, ChainConfig], torch.Tensor]] = {
    "shortft": shortft, "full": full, "draft": draft, "draft_lv": draft_lv,
    "alignprop": alignprop, "refl": refl, "drtune": drtune,
}


def sample(dn: Denoiser, inp: ChainInput, cfg: ChainConfig) -> torch.Tensor:
    """Latents for the reward, with the gradient pattern of `cfg.method`."""
    return METHODS[cfg.method](dn, inp, cfg)


@torch.no_grad()
def original_sampler(dn: Denoiser, latents: torch.Tensor, c: Condition, steps: int, segments: int,
                     adapters: Sequence[str], interior: str = "segment") -> torch.Tensor:
    """The ORIGINAL N-step sampler with the learned LoRAs (inference and evaluation; no shortcut)."""
    calls = sampler_plan(dn.timesteps(steps), segments, stacked(adapters), interior)
    return run_calls(dn, latents, calls, ["none"] * len(calls), c)[0]


def stage_of(step: int, total_steps: int, stages: int) -> int:
    """Progressive training: the optimizer steps are split evenly over the k stages (1-based)."""
    return min(stages, step * stages // total_steps + 1)


__all__ = ["Condition", "Denoiser", "ChainInput", "METHODS", "sample", "original_sampler", "run_calls",
           "plan_for", "stage_of", "segment_bounds"]
