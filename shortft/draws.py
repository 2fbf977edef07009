"""A step's random draws, one generator per sample: its prompt, its initial noise, and whatever the chain
draws for it after (draft_lv's re-noise); a micro-batch's own stream (`CHAIN_STREAM`) for what every
sample of it shares (a cut, a stop, a step to train)."""

from __future__ import annotations

import numpy as np
import torch

CHAIN_STREAM = 2**32 - 1  # the stream of a micro-batch's method randomness (cuts, stops), shared by ranks


def seeded(*key: int) -> torch.Generator:
    state = np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def draw_batch(models, prompts: list[str], seed: int, step: int, micro: int, first: int, size: int):
    """Prompts, noise and generators (the chain draws on) of global samples first..first+size-1 of a micro-batch,
    one generator per sample: a resumed run draws what the uninterrupted run drew, ranks draw disjoint samples,
    and 2 ranks x b samples are exactly the samples of 1 process x 2b. `models`: the run's (`initial_noise`)."""
    batch, noise, gens = [], [], []
    for i in range(first, first + size):
        g = seeded(seed, step, micro, i)
        batch.append(prompts[int(torch.randint(len(prompts), (1,), generator=g))])
        noise.append(models.initial_noise(1, g))
        gens.append(g)
    return batch, torch.cat(noise), gens  # [B, 4, h, w]
