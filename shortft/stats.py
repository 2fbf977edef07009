"""Standard errors of an evaluation. Its samples come `eval.samples_per_prompt` to a prompt, and a prompt's
samples share it (a hard prompt is hard for every seed), so they are not independent draws: the standard
error is taken over the prompts, each prompt's samples averaged first (a cluster-robust standard error
with the prompt as the cluster). Over the samples, it understated the spread where prompts differ: by up
to sqrt(samples per prompt).

An evaluation's samples are kept grouped, one list per prompt (`[[s11, s12], [s21, s22], ...]`); a flat
list (samples recorded before they were grouped) counts each sample as its own prompt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def finite(value) -> float | None:
    """`value` where it is a finite number, else None."""
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def prompt_means(samples: Sequence) -> list[float]:
    """One value per prompt: the mean of its samples (a flat list: the samples themselves)."""
    return [_mean(s) if isinstance(s, (list, tuple)) else float(s) for s in samples]


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """The mean of independent values and its standard error (NaN with fewer than two values). A NaN or
    infinite value makes both NaN or infinite, as numpy's would (`statistics` raises on them)."""
    mean = _mean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def _mean(values: Sequence[float]) -> float:
    finite = all(math.isfinite(v) for v in values)
    return (math.fsum(values) if finite else sum(values)) / len(values)


def clustered(samples: Sequence) -> tuple[float, float]:
    """The mean of an evaluation's samples and its standard error over the prompts."""
    return mean_se(prompt_means(samples))


def shape(samples: Sequence | None) -> list[int] | None:
    """The samples per prompt, prompt by prompt (1 each for a flat list): two evaluations pair where equal."""
    return None if not samples else [len(s) if isinstance(s, (list, tuple)) else 1 for s in samples]


def paired(hi: Sequence | None, lo: Sequence | None) -> tuple[float, float] | None:
    """The mean of `hi - lo` and its standard error over the prompts, for two evaluations of the same
    samples (same prompts, noise seeds, sampler and judge): the sample-by-sample differences cancel what
    the two share, and a prompt's differences are averaged before the spread is taken. None where they
    cannot be paired (other shapes, or fewer than two prompts)."""
    if shape(hi) is None or shape(hi) != shape(lo) or len(hi) < 2:
        return None
    return mean_se([a - b for a, b in zip(prompt_means(hi), prompt_means(lo))])
