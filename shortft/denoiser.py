"""One network call and one deterministic DDIM update: the step primitive every chain is built from.

The update is deterministic DDIM (eta = 0) between any two timesteps, which is both the original
sampler's step and the shortcut's jump. Classifier-free guidance is applied as the Stable Diffusion
pipelines do it (one batched call on [uncond, cond]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from shortft.lora import AdapterSwitch, lora_params
from shortft.plan import FINAL, Call, Schedule, schedule


@dataclass
class Condition:
    """Text condition of one batch. cond/uncond: [B, L, D] text-encoder states. SDXL-class models also
    take `added` / `uncond_added`: {"text_embeds": [B, 1280] pooled states, "time_ids": [B, 6]}."""

    cond: torch.Tensor
    uncond: torch.Tensor | None
    guidance_scale: float
    shortcut_guidance_scale: float
    added: dict[str, torch.Tensor] | None = None
    uncond_added: dict[str, torch.Tensor] | None = None


@dataclass
class CallCount:
    """Network calls made (a guided call on [uncond, cond] counts once) and those gradient flows through."""

    calls: int = 0
    grad_calls: int = 0


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
        self.count = CallCount()
        self._timesteps: dict[int, Schedule] = {}
        self._probe: dict[str, torch.nn.Parameter] = {}  # one LoRA parameter per adapter (see `_trains`)

    def timesteps(self, steps: int) -> Schedule:
        if steps not in self._timesteps:
            self._timesteps[steps] = schedule(self.scheduler, steps)
        return self._timesteps[steps]

    def alpha(self, t: int) -> float:
        return self.final_alpha_cumprod if t == FINAL else float(self.alphas_cumprod[t])

    # -- the network call -----------------------------------------------------------------------
    def _adapters(self, call: Call) -> tuple[str, ...] | None:
        """The LoRAs of the training UNet that the call runs with; None where it runs the shortcut UNet."""
        if call.shortcut and self.shortcut_unet is not None:
            return None
        return (self.shortcut_adapter,) if call.shortcut and self.shortcut_adapter else tuple(call.adapters)

    def _trains(self, call: Call) -> bool:
        """Whether a LoRA the call runs has trainable parameters. The loop sets requires_grad adapter by
        adapter (per progressive stage), so one parameter of each tells."""
        names = self._adapters(call)
        for name in names or ():
            if name not in self._probe:
                self._probe[name] = next(iter(lora_params(self.unet, name).values()))
            if self._probe[name].requires_grad:
                return True
        return False

    def _forward(self, x: torch.Tensor, call: Call, states: torch.Tensor, added: dict | None,
                 w_cond: torch.Tensor | None = None) -> torch.Tensor:
        # Adapters are switched inside the (possibly checkpointed) function so that the recompute in
        # backward runs with the same LoRAs as the forward did.
        adapters = self._adapters(call)
        if adapters is None:
            net = self.shortcut_unet
        else:
            net = self.unet
            self.switch.activate(adapters)
        t = torch.tensor(call.t, device=x.device)
        extra = {"added_cond_kwargs": added} if added is not None else {}
        if w_cond is not None:
            extra["timestep_cond"] = w_cond
        return net(x, t, encoder_hidden_states=states, **extra).sample

    def _recomputed(self, grad_pass: torch.Tensor, x: torch.Tensor, call: Call, states: torch.Tensor,
                    added: dict | None, w_cond: torch.Tensor | None) -> torch.Tensor:
        return self._forward(x, call, states, added, w_cond)  # grad_pass: see `predict`

    def _guidance_embedding(self, call: Call, guidance_scale: float, x: torch.Tensor) -> torch.Tensor | None:
        """An LCM-distilled shortcut UNet (`time_cond_proj_dim`) takes its guidance as an embedding of w =
        scale - 1, as diffusers' LatentConsistencyModelPipeline gives it; without it diffusers skips the
        projection silently and the jump is not the one distilled."""
        dim = getattr(self.shortcut_unet.config, "time_cond_proj_dim", None) if self.shortcut_unet is not None else None
        if not (call.shortcut and dim):
            return None
        half = dim // 2
        freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
        emb = (guidance_scale - 1) * 1000.0 * freqs
        emb = torch.nn.functional.pad(torch.cat([emb.sin(), emb.cos()]), (0, dim % 2))
        return emb.to(x.device, x.dtype).expand(x.shape[0], -1)

    def predict(self, x: torch.Tensor, call: Call, condition: Condition) -> torch.Tensor:
        """Model output at x_t ([B, C, h, w]), with classifier-free guidance as the SD pipeline does it."""
        scale = condition.shortcut_guidance_scale if call.shortcut else condition.guidance_scale
        guided = scale > 1.0 and condition.uncond is not None
        x_in = torch.cat([x, x]) if guided else x
        states = torch.cat([condition.uncond, condition.cond]) if guided else condition.cond
        added = condition.added
        if guided and added is not None:
            added = {k: torch.cat([condition.uncond_added[k], v]) for k, v in added.items()}
        w_cond = self._guidance_embedding(call, condition.guidance_scale, x_in)
        # A call whose output needs no gradient (a frozen jump from a latent made without gradient, as a
        # progressive stage's first jump is) is not checkpointed: nothing would flow back through it, and
        # the reentrant recompute in backward fails on an output that needs none.
        if self.checkpointing and torch.is_grad_enabled() and (x.requires_grad or self._trains(call)):
            # Reentrant: the forward keeps nothing, backward recomputes the call and backpropagates it in
            # one go. The non-reentrant kind runs a Python hook for every tensor the call saves (about
            # 650 per toy UNet call) in the forward, again in the recompute and once more in backward:
            # the toy's full-chain step took 1.6-2x the plain step with it, 1.1-1.2x this way (BENCHMARKS.md).
            # A reentrant call's output needs grad only if an input does, and the chain's first input
            # (the noise) does not: `grad_pass` is that input, so the LoRAs of every call get gradients.
            grad_pass = torch.ones((), device=x.device, requires_grad=True)
            out = checkpoint(self._recomputed, grad_pass, x_in, call, states, added, w_cond, use_reentrant=True)
        else:
            out = self._forward(x_in, call, states, added, w_cond)
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
