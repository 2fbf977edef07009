"""Differentiable rewards and their registry.

A reward takes images in [0, 1] as a [B, 3, H, W] tensor plus their prompts and returns [B] rewards,
differentiable with respect to the images. Rewards are registered by name with a factory that takes
the term's options (`reward.options.<name>`, e.g. a local path or hub id for model-based rewards) and
returns a callable (an `nn.Module` for model-based ones: it is frozen and moved to the device).

    @register("my_reward")
    def my_reward(path: str = "org/model") -> RewardFn: ...
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
from torch import nn

from shortft.config import ConfigError


class RewardFn(Protocol):
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor: ...


_REGISTRY: dict[str, Callable[..., RewardFn]] = {}


def register(name: str) -> Callable:
    def wrap(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        _REGISTRY[name] = factory
        return factory

    return wrap


def names() -> list[str]:
    return sorted(_REGISTRY)


def check_name(key: str, name: str) -> None:
    if name not in _REGISTRY:
        raise ConfigError(f"{key}: unknown reward {name!r}; registered: {', '.join(names())}")


def build(name: str, options: dict | None = None, device: torch.device | str = "cpu") -> RewardFn:
    try:
        fn = _REGISTRY[name](**(options or {}))
    except TypeError as e:
        raise ConfigError(f"reward.options.{name}: {e}") from None
    if isinstance(fn, nn.Module):
        fn = fn.to(device).eval().requires_grad_(False)
    return fn


class Rewards:
    """The named terms of a run: `terms(images, prompts)` -> {name: [B]}; `weighted` sums the weights."""

    def __init__(self, weights: dict[str, float], options: dict, extra: list[str] = (), device="cpu"):
        self.weights = {k: float(v) for k, v in weights.items()}
        wanted = list(dict.fromkeys([*self.weights, *extra]))
        self.fns = {n: build(n, options.get(n), device) for n in wanted}

    def terms(self, images: torch.Tensor, prompts: list[str], only: list[str] | None = None) -> dict[str, torch.Tensor]:
        return {n: self.fns[n](images, prompts).float() for n in (only or self.fns)}

    def weighted(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(w * terms[n] for n, w in self.weights.items())


# ---------------------------------------------------------------------------------------------
# Hand-written rewards: no weights, exact gradients.


@register("symmetry")
def symmetry() -> RewardFn:
    """Left-right mirror symmetry: minus the mean absolute difference to the mirrored image (0 = perfect)."""
    return lambda images, prompts: -(images - images.flip(-1)).abs().mean(dim=(1, 2, 3))


@register("brightness")
def brightness() -> RewardFn:
    """Mean luma (Rec. 601) in [0, 1]."""
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return lambda images, prompts: (images * weights.to(images)).sum(1).mean(dim=(1, 2))


@register("saturation")
def saturation() -> RewardFn:
    """Mean HSV-style chroma: max(R, G, B) - min(R, G, B), in [0, 1]."""
    return lambda images, prompts: (images.amax(1) - images.amin(1)).mean(dim=(1, 2))


def _dct_matrix(n: int = 8) -> torch.Tensor:
    k = torch.arange(n).view(-1, 1).double()
    i = torch.arange(n).view(1, -1).double()
    m = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m.float()


@register("compressibility")
def compressibility(block: int = 8) -> RewardFn:
    """Differentiable JPEG-size proxy: minus the mean absolute AC coefficient of the 8x8 block DCT of
    luma (in 0..255 units). JPEG spends its bits on those coefficients, so fewer/smaller ones compress
    better; unlike real JPEG size this has a gradient."""
    dct = _dct_matrix(block)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)

    def fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        y = (images * luma.to(images)).sum(1) * 255  # [B, H, W]
        b, h, w = y.shape
        y = y[:, : h - h % block, : w - w % block]
        tiles = y.unfold(1, block, block).unfold(2, block, block)  # [B, H/8, W/8, 8, 8]
        d = dct.to(y)
        coeffs = d @ tiles @ d.T
        ac = coeffs.abs().flatten(-2)[..., 1:]  # drop DC
        return -ac.mean(dim=(1, 2, 3))

    return fn


# Model-based rewards of the toy world register themselves on import (toy_alignment, toy_judge, ...).
from shortft.toy import judges as _toy_judges  # noqa: E402,F401
