"""Evaluation: held-out prompts, fixed seeds, the ORIGINAL N-step sampler with the learned LoRAs.

Reports the mean of every reward term, `objective`, the fixed evaluation objective (the term named by
`eval.objective`, never the weighted training reward), `objective_se`, its standard error over the
prompts (a prompt's samples share it: `shortft.stats`), and `objective_samples`, its value on each
sample (one list per prompt, in the order of `sample_terms`); writes a grid of the first `GRID_MAX`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from shortft import stats
from shortft.chain import original_sampler
from shortft.config import Config
from shortft.data import read_prompts
from shortft.models import Models
from shortft.out_paths import whole
from shortft.plan import TrainingPlan
from shortft.progress import bar, warn
from shortft.rewards import Rewards

SAMPLES = "eval/objective_samples"  # the one metric that is a list, not a number: kept out of scalar logs
GRID_MAX = 64  # the samples an evaluation's grid shows, the first ones (one PNG of thousands was gigabytes)


def seeded_noise(models: Models, seeds: list[int]) -> torch.Tensor:
    """One generator per sample, so a sample's noise does not depend on the batch it lands in."""
    return torch.cat([models.initial_noise(1, torch.Generator().manual_seed(s)) for s in seeds])


@torch.no_grad()
def generate(models: Models, cfg: Config, prompts: list[str], seeds: list[int], plan: TrainingPlan | None = None,
             progress: bool = True, desc: str = "sampling") -> torch.Tensor:
    """[B, 3, H, W] images in [0, 1] from the original sampler with `plan`'s LoRAs (default: the models'
    own; a plan with no adapters gives the base model), in eval.batch_size chunks."""
    out = []
    size = cfg.eval.batch_size
    calls = (plan or models.plan).inference_calls(models.denoiser.timesteps(cfg.chain.steps))
    for i in bar(range(0, len(prompts), size), show=progress, desc=desc, unit="batch", leave=False):
        condition = models.condition(prompts[i:i + size], cfg.chain.guidance_scale, cfg.chain.guidance_scale)
        latents = original_sampler(models.denoiser, seeded_noise(models, seeds[i:i + size]), condition, calls)
        out.append(models.decode(latents).cpu())
    return torch.cat(out)


def sample_terms(models: Models, cfg: Config, rewards: Rewards,
                 keep: int | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every reward term of every held-out sample ([S] each: prompt by prompt, `eval.samples_per_prompt`
    fixed seeds each) and the first `keep` images (default `GRID_MAX`): the same samples for every model of
    one config, so two models' terms can be compared sample by sample. Each eval.batch_size chunk is drawn,
    then scored (the reward models see as many images at once as the sampler drew), before the next: the
    images of a large evaluation were all held at once (3200 prompts at 1024 px: 37.5 GiB in fp32)."""
    prompts = read_prompts(cfg.data.eval_prompts, cfg.data.prompt_column, "data.eval_prompts")
    items = [(p, n) for p in prompts for n in range(cfg.eval.samples_per_prompt)]
    all_prompts = [p for p, _ in items]
    seeds = [cfg.eval.seed + i for i in range(len(items))]
    keep = GRID_MAX if keep is None else keep
    size, parts, kept = cfg.eval.batch_size, [], []
    for i in bar(range(0, len(items), size), desc="evaluating", unit="batch", leave=False):
        images = generate(models, cfg, all_prompts[i:i + size], seeds[i:i + size], progress=False)
        with torch.no_grad():
            parts.append(rewards.terms(images.to(models.device), all_prompts[i:i + size]))
        kept.append(images[:max(0, keep - i)])
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}, torch.cat(kept)


def evaluate(models: Models, cfg: Config, rewards: Rewards, grid_path: Path | None = None,
             grid_optional: bool = False) -> dict:
    terms, images = sample_terms(models, cfg, rewards)
    bad = {n: int((~torch.isfinite(v)).sum()) for n, v in terms.items()}
    if any(bad.values()):  # one spoils the mean, the standard error and every paired gain: say where
        warn("shortft: evaluation: non-finite values in " + ", ".join(f"{n} ({k} of {len(terms[n])} samples)"
                                                                   for n, k in bad.items() if k))
    metrics = {f"eval/{n}": float(v.mean()) for n, v in terms.items()}
    metrics["eval/objective"] = metrics[f"eval/{cfg.eval.objective}"]
    # the objective's standard error over the prompts, and the samples themselves: two models evaluated on
    # these same samples are told apart more finely sample by sample (`shortft.stats.paired`)
    samples = terms[cfg.eval.objective].double().view(-1, cfg.eval.samples_per_prompt).tolist()
    metrics["eval/objective_se"] = stats.clustered(samples)[1]
    metrics[SAMPLES] = samples
    if grid_path is not None:
        try:
            save_grid(images, grid_path)
        except OSError as e:
            if not grid_optional:  # `eval --grid` asked for it; in training it is a picture: the checkpoint matters
                raise
            warn(f"shortft: sample grid not written to {grid_path}: {e.strerror or e}; the run goes on")
    return metrics


def save_grid(images: torch.Tensor, path: Path, min_tile: int = 128, cols: int | None = None) -> Path:
    """[B, 3, H, W] in [0, 1] -> one PNG, row by row (`cols` per row, default a square-ish grid); small
    images are upscaled (nearest) to be visible."""
    from PIL import Image

    b, _, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    scale = max(1, min_tile // max(h, w))
    grid = np.ones((rows * h, cols * w, 3), dtype=np.uint8) * 255
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for i in range(b):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = arr[i]
    img = Image.fromarray(grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with whole(path) as tmp:  # a full disk left a cut PNG that MLflow logged
        img.save(tmp)  # its format from the suffix, which the temporary name keeps
    return path


def scalars(metrics: dict) -> dict[str, float]:
    """`metrics` without the per-sample list: what MLflow, a log line or a table of numbers takes."""
    return {k: v for k, v in metrics.items() if k != SAMPLES}
