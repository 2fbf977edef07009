"""`shortft rewards`: the registered rewards, and with `--cost` what each costs per image.

    shortft rewards                                  # name, what it measures, gradient or not
    shortft rewards --cost --random-weights          # seconds per 224x224 image, forward and forward+backward

With `--random-weights` the preference models are their real architectures (CLIP ViT-H/14, ViT-L/14)
with random weights, so the cost is measured without downloading anything; the scores mean nothing.
"""

from __future__ import annotations

import gc
import statistics
import time

import torch

from shortft.rewards.registry import EVAL_ONLY, build, factory_doc, names


def describe() -> list[dict]:
    return [{"name": n, "gradient": n not in EVAL_ONLY, "about": factory_doc(n)} for n in names()]


def _seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, options: dict | None, random_weights: bool, batch: int = 2, size: int = 224,
            repeats: int = 3, device: str = "cpu") -> dict:
    """Median seconds per image of one call (forward) and of forward + backward to the images."""
    fn = build(name, options, device, random_weights)
    images = torch.rand(batch, 3, size, size, device=device)
    prompts = [f"a photo of a cat number {i}" for i in range(batch)]  # distinct: the text cache is warmed once

    def forward():
        with torch.no_grad():
            fn(images, prompts)

    def backward():
        x = images.clone().requires_grad_(name not in EVAL_ONLY)
        out = fn(x, prompts)
        if x.requires_grad:
            out.sum().backward()

    backward()  # warm-up (and prompt embeddings)
    params = sum(p.numel() for p in fn.parameters()) if isinstance(fn, torch.nn.Module) else 0
    row = {"name": name, "params_M": round(params / 1e6, 1), "batch": batch, "size": size,
           "forward_s_per_image": _seconds(forward, repeats) / batch}
    if name not in EVAL_ONLY:
        row["fwd_bwd_s_per_image"] = _seconds(backward, repeats) / batch
    del fn
    gc.collect()  # one model in memory at a time
    return row


def run(cfg, names: list[str] | None, random_weights: bool, batch: int = 2, repeats: int = 3) -> str:
    """Time `names` (default: the config's training and evaluation terms) with the config's reward
    options, on its device; returns the table."""
    from shortft.models import pick_device
    from shortft.progress import bar
    from shortft.rewards.registry import check_name

    wanted = names or list(dict.fromkeys([*cfg.reward.trained(), cfg.eval.objective, *cfg.eval.terms]))
    for name in wanted:
        check_name("--names", name)
    if not random_weights:  # one line now, not half a minute of retries in the first load
        from shortft.hub import check, reward_sources

        check(reward_sources(cfg, wanted))
    device = pick_device(cfg.model.device)
    rows = [measure(n, cfg.reward.options.get(n), random_weights, batch, repeats=repeats, device=device)
            for n in bar(wanted, desc="rewards", unit="reward")]
    return table(rows)


def table(rows: list[dict]) -> str:
    lines = [f"{'reward':16s} {'params (M)':>10s} {'forward s/img':>14s} {'fwd+bwd s/img':>14s}"]
    for r in rows:
        fb = f"{r['fwd_bwd_s_per_image']:14.3f}" if "fwd_bwd_s_per_image" in r else f"{'-':>14s}"
        lines.append(f"{r['name']:16s} {r['params_M']:10.1f} {r['forward_s_per_image']:14.3f} {fb}")
    return "\n".join(lines)
