"""The toy build's sizes (`--set key=value`), its random data stream and its progress lines."""

from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace

import numpy as np

from shortft.config import ConfigError
from shortft.toy import grammar


@dataclass
class BuildSize:
    """The full build takes about 105 minutes on a 2-core CPU (README: time by stage)."""

    vae_steps: int = 800
    vae_widths: tuple = (16, 32, 32)
    vae_batch: int = 32
    unet_steps: int = 4000
    unet_widths: tuple = (32, 64)
    text_width: int = 32
    batch: int = 64
    teacher_samples: int = 8192
    shortcut_steps: int = 1500
    shortcut_rank: int = 8
    judge_steps: int = 800
    eval_samples: int = 256
    teacher_steps: int = 50
    guidance: float = 1.0  # of the teacher paths the shortcuts follow (the toy config trains without CFG)
    shortcut_guidance: float = 1.0  # of the jump itself: same as the teacher, so the LoRA learns the curvature
    shortcut_lr: float = 3e-3
    shortcut_batch: int = 64
    shortcut_eval_every: int = 0  # >0: print the jump-error ratio on training and fresh paths every n steps
    eval_guidance: float = 4.0  # of the base-model accuracy check


QUICK = BuildSize(vae_steps=40, vae_widths=(8, 16, 16), vae_batch=16, unet_steps=60, unet_widths=(16, 32),
                  text_width=16, batch=16, teacher_samples=32, shortcut_steps=15, shortcut_rank=2, shortcut_batch=16,
                  judge_steps=40, eval_samples=16, teacher_steps=10)
SEGMENTS = (2, 4, 8)


def log(msg: str) -> None:
    print(msg, flush=True)


def batches(seed: int, triples: list, batch: int):
    """Endless (images [B,3,32,32], prompts, attributes) from the generator, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    while True:
        attrs = grammar.sample_attributes(rng, triples, batch)
        prompts = grammar.sample_prompts(rng, attrs)
        yield grammar.render(attrs, rng), prompts, attrs


def progress(stage: str, step: int, total: int, loss: float, t0: float) -> None:
    if step == 1 or step % max(1, total // 10) == 0 or step == total:
        rate = (time.time() - t0) / step
        log(f"  [{stage}] {step}/{total}  loss {loss:.4f}  {rate:.2f} s/step  eta {rate * (total - step):.0f} s")


def build_size(quick: bool = False, overrides: dict | None = None) -> BuildSize:
    """The build's sizes with `overrides` (from `--set key=value`) applied; unknown keys are a ConfigError."""
    size = QUICK if quick else BuildSize()
    names = [f.name for f in fields(BuildSize)]
    clean = {}
    for key, value in (overrides or {}).items():
        if key not in names:
            raise ConfigError(f"--set {key}=...: not a build size; the sizes are {', '.join(names)}")
        default = getattr(size, key)
        if isinstance(default, tuple) and isinstance(value, list) and all(isinstance(v, int) for v in value):
            value = tuple(value)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(default):
            raise ConfigError(f"--set {key}={value!r}: expected {type(default).__name__} like {default!r}")
        # a count or a size: 0 would build nothing or divide by it; a rate or a scale: finite and positive
        values = value if isinstance(value, tuple) else (value,)
        low = 0 if key == "shortcut_eval_every" else 1
        if not values or not all(v >= low if isinstance(v, int) else 0 < v < float("inf") for v in values):
            raise ConfigError(f"--set {key}={value!r}: expected " + (f"integers >= {low}" if isinstance(default, (int, tuple))
                              else "a finite number > 0") + f", like {default!r}")
        clean[key] = value
    return replace(size, **clean)
