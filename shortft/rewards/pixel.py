"""Hand-written pixel rewards: no weights, exact gradients. [B, 3, H, W] in [0, 1] -> [B].

`jpeg_size`, the real JPEG size the `compressibility` proxy stands for, is here too, as an evaluation term.
"""

from __future__ import annotations

import io
import math

import torch
from PIL import Image

from shortft.config import ConfigError
from shortft.rewards.registry import RewardFn, register, without_autocast


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
    luma (in 0..255 units).

    JPEG spends its bits on those coefficients, so fewer/smaller ones compress
    better; unlike real JPEG size this has a gradient."""
    dct = _dct_matrix(block)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)

    def fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        with without_autocast(images.device):  # the loop scores under autocast
            return _ac_mean(images.float())

    def _ac_mean(images: torch.Tensor) -> torch.Tensor:
        # In fp32: under bf16 autocast the DCT's matmuls rounded luma (0..255) to about a unit, and the
        # gradient of a smooth image pointed elsewhere (tests/test_rewards.py asks for cosine > 0.999).
        y = (images * luma.to(images)).sum(1) * 255  # [B, H, W]
        b, h, w = y.shape
        y = y[:, : h - h % block, : w - w % block]
        tiles = y.unfold(1, block, block).unfold(2, block, block)  # [B, H/8, W/8, 8, 8]
        d = dct.to(y)
        coeffs = d @ tiles @ d.T
        ac = coeffs.abs().flatten(-2)[..., 1:]  # drop DC
        return -ac.mean(dim=(1, 2, 3))

    return fn


def check_jpeg_options(quality: int = 95) -> None:
    """Checked with the config: PIL's error came at the first evaluation, after the models had loaded."""
    if isinstance(quality, bool) or not isinstance(quality, int) or not 0 <= quality <= 100:
        raise ConfigError(f"quality={quality!r}: an integer from 0 to 100 (PIL's JPEG quality; 95 is its best)")


@register("jpeg_size", eval_only=True, check=check_jpeg_options)
def jpeg_size(quality: int = 95) -> RewardFn:
    """Minus the real JPEG size in kB (PIL, `quality` 95): what `compressibility` approximates.

    No gradient: an evaluation term only, for checking the proxy against the real thing."""

    def fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        sizes = []
        for img in (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy():
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=quality)
            sizes.append(-buf.tell() / 1000)
        return torch.tensor(sizes, device=images.device)

    return fn
