"""CLIP image preprocessing on tensors, so that the reward's gradient reaches the image.

The official processors work on PIL images (uint8): resize the shortest side with bicubic
resampling, centre-crop, rescale to [0, 1], normalise with the model's mean/std. This does the same
on a float [B, 3, H, W] tensor in [0, 1]: `F.interpolate(bicubic, antialias=True)` is torch's port of
PIL's resampling filter, the output size is computed as both libraries do (the long side truncated),
and the crop offset follows the library the model was published with: transformers' `center_crop`
floors `(H - crop) / 2`, torchvision's `CenterCrop` (open_clip's transform) rounds it.
tests/test_rewards.py checks it against `CLIPImageProcessor` on PIL images of several sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


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
        x = images.float()
        h, w = self.resized_shape(*x.shape[-2:])
        if (h, w) != tuple(x.shape[-2:]):
            # Clamped as PIL clips its uint8 output (bicubic overshoots at edges when upsampling).
            x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = self._offset(h), self._offset(w)
        x = x[..., top : top + self.crop, left : left + self.crop]
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std
