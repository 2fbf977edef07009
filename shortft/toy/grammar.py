"""The toy world's data: coloured shapes on backgrounds, a prompt grammar, and its parser.

An image has a shape, a shape colour, a background colour, a size and a position; its prompt names the
shape, colours and (sometimes) size and position: "a small red triangle at the top left on a blue
background". Some (shape, colour, background) combinations never appear in training: their prompts
are the held-out evaluation set.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 45, 45), "green": (50, 170, 70), "blue": (45, 85, 220),
    "yellow": (235, 205, 50), "purple": (145, 60, 185), "white": (240, 240, 240),
}
SIZES = ("small", "large")
POSITIONS = {"top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7),
             "bottom right": (0.7, 0.7), "center": (0.5, 0.5)}
IMAGE_SIZE = 32
HELD_OUT_FRACTION = 1 / 6

VOCAB = sorted(set(
    "a an at the on background".split() + list(SHAPES) + list(COLOURS) + list(SIZES)
    + [w for p in POSITIONS for w in p.split()]
))


@dataclass(frozen=True)
class Attributes:
    shape: str
    colour: str
    background: str
    size: str
    position: str

    def prompt(self, say_size: bool = True, say_position: bool = False) -> str:
        words = ["a"] + ([self.size] if say_size else []) + [self.colour, self.shape]
        if say_position:
            words += ["at the" if self.position != "center" else "in the", self.position]
        words += ["on a", self.background, "background"]
        return " ".join(words).replace(" in the ", " at the ")


def all_triples() -> list[tuple[str, str, str]]:
    return [(s, c, b) for s, c, b in itertools.product(SHAPES, COLOURS, COLOURS) if c != b]


def split_triples(seed: int = 0) -> tuple[list, list]:
    """(train, held_out) (shape, colour, background) triples. Every (shape, colour) and (colour,
    background) pair stays in training, so held-out prompts are new combinations of known parts."""
    rng = np.random.default_rng(seed)
    triples = all_triples()
    order = rng.permutation(len(triples))
    held, pairs_sc, pairs_cb = [], {}, {}
    for s, c, b in triples:
        pairs_sc[(s, c)] = pairs_sc.get((s, c), 0) + 1
        pairs_cb[(c, b)] = pairs_cb.get((c, b), 0) + 1
    target = round(len(triples) * HELD_OUT_FRACTION)
    for i in order:
        s, c, b = triples[i]
        if len(held) < target and pairs_sc[(s, c)] > 1 and pairs_cb[(c, b)] > 1:
            held.append(triples[i])
            pairs_sc[(s, c)] -= 1
            pairs_cb[(c, b)] -= 1
    held_set = set(held)
    return [t for t in triples if t not in held_set], sorted(held)


def sample_attributes(rng: np.random.Generator, triples: list, n: int) -> list[Attributes]:
    picks = rng.integers(len(triples), size=n)
    sizes = rng.integers(len(SIZES), size=n)
    positions = rng.integers(len(POSITIONS), size=n)
    names = list(POSITIONS)
    return [Attributes(*triples[p], SIZES[s], names[q]) for p, s, q in zip(picks, sizes, positions)]


def sample_prompts(rng: np.random.Generator, attrs: list[Attributes]) -> list[str]:
    say_size = rng.random(len(attrs)) < 0.5
    say_pos = rng.random(len(attrs)) < 0.3
    return [a.prompt(bool(s), bool(p)) for a, s, p in zip(attrs, say_size, say_pos)]


def _mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
    if shape == "triangle":  # apex up
        top, bottom = cy - r, cy + 0.8 * r
        return (yy >= top) & (yy <= bottom) & (np.abs(dx) <= (yy - top) / (bottom - top) * r)
    if shape == "cross":
        arm = 0.33 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(shape)


def render(attrs: list[Attributes], rng: np.random.Generator, size: int = IMAGE_SIZE, supersample: int = 4) -> torch.Tensor:
    """[B, 3, size, size] float images in [0, 1], anti-aliased, with small jitter in place and colour."""
    hi = size * supersample
    yy, xx = np.mgrid[0:hi, 0:hi].astype(np.float32) / hi
    out = np.empty((len(attrs), 3, size, size), dtype=np.float32)
    for i, a in enumerate(attrs):
        r = (0.19 if a.size == "small" else 0.3) * (1 + 0.1 * rng.standard_normal())
        px, py = POSITIONS[a.position]
        if a.size == "large":  # large shapes stay nearer the middle so they fit
            px, py = 0.5 + 0.25 * (px - 0.5), 0.5 + 0.25 * (py - 0.5)
        cx, cy = px + 0.03 * rng.standard_normal(), py + 0.03 * rng.standard_normal()
        fg = np.clip(np.array(COLOURS[a.colour]) / 255 + 0.04 * rng.standard_normal(3), 0, 1)
        bg = np.clip(np.array(COLOURS[a.background]) / 255 + 0.04 * rng.standard_normal(3), 0, 1)
        m = _mask(a.shape, xx, yy, cx, cy, r).astype(np.float32)
        img = m[None] * fg[:, None, None] + (1 - m[None]) * bg[:, None, None]
        out[i] = img.reshape(3, size, supersample, size, supersample).mean(axis=(2, 4))
    return torch.from_numpy(out)


def parse(prompt: str) -> dict[str, str | None]:
    """Attributes a prompt names: shape, colour (of the shape), background, size (None if unsaid)."""
    words = prompt.lower().replace(",", " ").split()
    shape = next((w for w in words if w in SHAPES), None)
    colour = background = size = None
    if shape is not None:
        before = words[: words.index(shape)]
        colour = next((w for w in reversed(before) if w in COLOURS), None)
        size = next((w for w in before if w in SIZES), None)
    if "background" in words:
        background = next((w for w in reversed(words[: words.index("background")]) if w in COLOURS), None)
    return {"shape": shape, "colour": colour, "background": background, "size": size}


def eval_prompts(seed: int = 0) -> list[str]:
    """One prompt per held-out triple, size named, no position."""
    _, held = split_triples(seed)
    return [f"a {c} {s} on a {b} background" for s, c, b in held]
