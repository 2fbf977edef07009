"""Toy build stage 4: the reward model and the judge (two AttributeNets: other seeds, widths, pooling
and data streams), and their matched-vs-mismatched ranking accuracy on held-out prompts."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from shortft.toy import grammar
from shortft.toy.judges import HEADS, AttributeNet, prompt_score
from shortft.toy.sizes import BuildSize, batches, progress


def train_attribute_net(size: BuildSize, triples: list, vae, seed: int, widths, kernel: int, pool: str, tag: str):
    torch.manual_seed(seed)
    net = AttributeNet(widths, kernel, pool)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    data, t0 = batches(seed, triples, size.batch), time.time()
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, size.judge_steps + 1):
        images, _, attrs = next(data)
        with torch.no_grad():  # half the batch through the VAE, so decoded samples look familiar
            half = len(images) // 2
            rec = vae.decode(vae.encode(images[:half] * 2 - 1).latent_dist.mean).sample
            images = torch.cat([(rec / 2 + 0.5).clamp(0, 1), images[half:]])
            images = (images + 0.03 * torch.randn(images.shape, generator=gen)).clamp(0, 1)
        logits = net(images)
        loss = sum(F.cross_entropy(logits[h], torch.tensor([HEADS[h].index(getattr(a, h)) for a in attrs]))
                   for h in HEADS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        progress(tag, step, size.judge_steps, loss.item(), t0)
    return net.eval().requires_grad_(False)


@torch.no_grad()
def ranking_accuracy(net, held: list, seed: int, n: int = 512) -> float:
    """Share of held-out images whose own prompt outscores a prompt with another shape or colour."""
    rng = np.random.default_rng(seed)
    attrs = grammar.sample_attributes(rng, held, n)
    images = grammar.render(attrs, rng)
    match = [f"a {a.colour} {a.shape} on a {a.background} background" for a in attrs]
    wrong = []
    for a in attrs:
        if rng.random() < 0.5:
            shape = grammar.SHAPES[(grammar.SHAPES.index(a.shape) + rng.integers(1, len(grammar.SHAPES))) % 4]
            wrong.append(f"a {a.colour} {shape} on a {a.background} background")
        else:
            others = [c for c in grammar.COLOURS if c not in (a.colour, a.background)]
            wrong.append(f"a {others[rng.integers(len(others))]} {a.shape} on a {a.background} background")
    logits = net(images)
    return float((prompt_score(logits, match) > prompt_score(logits, wrong)).float().mean())
