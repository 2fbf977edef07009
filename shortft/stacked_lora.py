"""peft's LoRA Linear in fewer ops: the active adapters summed in one product, added in one fused op.

On a GPU the chain's step is host-bound (BENCHMARKS.md): each aten op costs about the same launch time
whatever its size, so ops, not FLOPs, set the step's time. peft's LoRA layer spends about 8 ops per
active adapter on top of the frozen layer (a cast of the input to the LoRA's fp32, two linears, a
scale, an add, a cast back): rank-128 LoRAs on SD 1.5's 128 attention projections take one guided
UNet call from 824 to 1,853 kernel-reaching ops (counted on meta tensors, `shortft.counting`), and
timestep-aware ShortFT runs segment j with `segment_1..j` active at once, 8 more per adapter. Here

    base(x) + s [B_1 .. B_n] ([A_1; ..; A_n] x)      (torch.add(..., alpha=s): scale and add in one op)

is the same sum (up to float rounding) in 3 ops whatever n, plus the two concatenations when n > 1;
under autocast the input is not cast to fp32 first (autocast casts it back to bf16 for the linear:
bf16 -> fp32 -> bf16 is exact, so nothing changes). Gradients reach each adapter through the
concatenation. The cost: a multi-adapter call keeps its concatenated factors for backward (about 770 MB
over a ShortFT step of SD 1.5, BENCHMARKS.md), where peft's loop keeps references to the parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear


def _autocast_on(x: torch.Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(x.device.type)
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


class StackedLinear(Linear):
    """A peft `lora.Linear` whose forward takes plain LoRAs the short way; anything else (merged or
    disabled adapters, dropout, DoRA and other variants, different scalings, peft's per-sample
    `adapter_names`) goes through peft's own forward."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = self._plain_adapters(kwargs)
        if names is None:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if not names:
            return result
        if len(names) == 1:
            a, b = self.lora_A[names[0]].weight, self.lora_B[names[0]].weight
        else:
            a = torch.cat([self.lora_A[n].weight for n in names])  # [sum of ranks, in]
            b = torch.cat([self.lora_B[n].weight for n in names], dim=1)  # [out, sum of ranks]
        if not _autocast_on(x):
            x = self._cast_input_dtype(x, a.dtype)
        delta = F.linear(F.linear(x, a), b)
        return torch.add(result, delta, alpha=self.scaling[names[0]]).to(result.dtype)

    def _plain_adapters(self, kwargs: dict) -> list[str] | None:
        if self.disable_adapters or self.merged or kwargs:
            return None
        names = [n for n in self.active_adapters if n in self.lora_A]
        if not names:
            return names
        scaling = self.scaling[names[0]]
        dtype = self.lora_A[names[0]].weight.dtype
        # DoRA and other variants: `lora_variant` (peft 0.15+), the `use_dora` flags before it
        variants = set(getattr(self, "lora_variant", {})) | {n for n, on in getattr(self, "use_dora", {}).items() if on}
        if not isinstance(scaling, (int, float)):
            return None
        for n in names:
            if (n in variants or not isinstance(self.lora_dropout[n], torch.nn.Identity)
                    or self.scaling[n] != scaling or self.lora_A[n].weight.dtype != dtype
                    or self.lora_B[n].weight.dtype != dtype or self.lora_B[n].bias is not None):
                return None
        return names


def stack_adapters(layers) -> None:
    """Makes every plain peft `lora.Linear` among `layers` a `StackedLinear` (in place: same object,
    parameters and state dict; peft's `isinstance` checks, saving and unloading see a `lora.Linear`)."""
    for layer in layers:
        if type(layer) is Linear:
            layer.__class__ = StackedLinear
