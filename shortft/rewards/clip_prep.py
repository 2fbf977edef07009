"""CLIP image preprocessing on tensors, so that the reward's gradient reaches the image.

The official processors work on PIL images (uint8): resize the shortest side with PIL's bicubic
filter, centre-crop, rescale to [0, 1], normalise with the model's mean/std. This does the same on a
float [B, 3, H, W] tensor in [0, 1], and gives the processors' values exactly: the image is rounded to
uint8 levels, and the resize is PIL's own algorithm (Pillow's Resample.c: its filter taps, its
22-bit fixed-point weights, a horizontal then a vertical pass, each rounded and clipped to uint8),
computed in float64, where those sums are exact. Each rounding passes the gradient straight through,
so the gradient is that of the resize's linear map. The output size is computed as both libraries do
(the long side truncated), and the crop offset follows the library the model was published with:
transformers' `center_crop` floors `(H - crop) / 2`, torchvision's `CenterCrop` (open_clip's
transform) rounds it. tests/test_preference_rewards.py checks both against PIL images of several sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from shortft.rewards.registry import without_autocast

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


PRECISION_BITS = 22  # Pillow's fixed-point weights for 8-bit images (32 - 8 - 2)


def _bicubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@lru_cache(maxsize=64)
def pil_weights(in_size: int, out_size: int, device: str = "cpu") -> torch.Tensor:
    """[out, in] float64 on `device`: Pillow's bicubic taps for one axis (precompute_coeffs, then the
    rounding to fixed point of normalize_coeffs_8bpc), as multiples of 2**-22. Cached per device: the
    reward runs every training step, and the taps would otherwise be copied to the GPU each time."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    w = torch.zeros(out_size, in_size, dtype=torch.float64)
    one = 1 << PRECISION_BITS
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        k = [_bicubic((x + 0.5 - center) / filterscale) for x in range(xmin, xmax)]
        total = sum(k)
        for i, v in enumerate(k):
            v = v / total if total != 0.0 else v
            w[xx, xmin + i] = math.trunc(v * one + (0.5 if v >= 0 else -0.5)) / one
    return w.to(device)


def _levels(x: torch.Tensor) -> torch.Tensor:
    """Rounded and clipped to uint8 levels as Pillow's clip8 does, with the gradient of x."""
    return x + (torch.floor(x + 0.5).clamp(0, 255) - x).detach()


def pil_resize(levels: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Pillow's `Image.resize((w, h), BICUBIC)` of [..., H, W] uint8 levels (float64), one pass per axis
    whose size changes, horizontal first."""
    if w != levels.shape[-1]:
        levels = _levels(levels @ pil_weights(levels.shape[-1], w, str(levels.device)).T)
    if h != levels.shape[-2]:
        levels = _levels(pil_weights(levels.shape[-2], h, str(levels.device)) @ levels)
    return levels


def _field(value, name: str) -> int:
    # transformers 4.x stores a dict, 5.x a SizeDict with attributes.
    if isinstance(value, int):
        return value
    return int(value[name] if isinstance(value, dict) else getattr(value, name))


@dataclass(frozen=True)
class ClipPreprocess:
    size: int = 224  # shortest side after the resize
    crop: int = 224
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD
    crop_rounding: str = "floor"  # "floor" (transformers) or "round" (torchvision / open_clip)

    @classmethod
    def from_image_processor(cls, proc, crop_rounding: str = "floor") -> ClipPreprocess:
        """The settings of a transformers `CLIPImageProcessor` (shortest-edge resize + centre crop)."""
        size, crop = _field(proc.size, "shortest_edge"), _field(proc.crop_size, "height")
        return cls(size, crop, tuple(proc.image_mean), tuple(proc.image_std), crop_rounding)

    def resized_shape(self, h: int, w: int) -> tuple[int, int]:
        short, long = min(h, w), max(h, w)
        new_long = int(self.size * long / short)
        return (self.size, new_long) if h <= w else (new_long, self.size)

    def _offset(self, length: int) -> int:
        d = length - self.crop
        return d // 2 if self.crop_rounding == "floor" else int(round(d / 2.0))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> normalised [B, 3, crop, crop] (float32, differentiable)."""
        h, w = self.resized_shape(*images.shape[-2:])
        top, left = self._offset(h), self._offset(w)
        levels = pil_resize(_levels(images.double() * 255), h, w)
        x = (levels[..., top : top + self.crop, left : left + self.crop] / 255).float()
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


@dataclass(frozen=True)
class LongestSidePreprocess:
    """HPS v2's own evaluation transform (`hpsv2.score`: open_clip's `image_transform` with
    `resize_longest_max=True`, which HPSv2's fork selects through `light_augmentation=True`): ToTensor of
    the PIL image (uint8 levels / 255), `ResizeMaxSize(224)` (torchvision's resize of that float
    tensor: `F.interpolate` bicubic with antialias, not clamped; the long side to 224, the other rounded),
    padded with 0 to a square (the odd pixel right and bottom), then normalised. No centre crop: a
    non-square image is scored whole. The pad is also made when the long side is already 224 (HPSv2
    skips it there, and its model then fails on the non-square input)."""

    size: int = 224
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD

    @classmethod
    def from_image_processor(cls, proc) -> LongestSidePreprocess:
        return cls(_field(proc.crop_size, "height"), tuple(proc.image_mean), tuple(proc.image_std))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> normalised [B, 3, size, size] (float32, differentiable)."""
        h, w = images.shape[-2:]
        scale = self.size / max(h, w)
        x = (_levels(images.double() * 255) / 255).float()
        with without_autocast(x.device):
            if scale != 1.0:
                x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bicubic", align_corners=False,
                                  antialias=True)
            pad_h, pad_w = self.size - x.shape[-2], self.size - x.shape[-1]
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std
