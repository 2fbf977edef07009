"""`shortft sample` and `shortft eval --lora`: a config's models with the LoRAs a run wrote.

    models = load_trained(cfg, "runs/tiny/lora")     # the run's adapters and chain, on the config's model
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from shortft.config import Config, ConfigError
from shortft.data import read_prompts
from shortft.evaluate import generate, save_grid
from shortft.lora import load_lora_state, read_lora_plan
from shortft.models import Models, load_models
from shortft.out_paths import output_folder
from shortft.plan import training_plan
from shortft.progress import warn


def check_trained_with(cfg: Config, lora: str | Path) -> None:
    """The LoRAs of a run folder (`<run>/lora`, next to the run's `config.yaml`) fit `cfg`: the same base
    model and LoRA shape. Else one line naming both values and the run's config, before anything loads;
    it was PyTorch's state-dict error after the model had loaded."""
    import yaml

    from shortft.checkpoint import FIXED, moved_model
    from shortft.config import flatten, to_dict

    saved_file = Path(lora).parent / "config.yaml"
    try:
        saved = flatten(yaml.safe_load(saved_file.read_text()) or {})
    except (OSError, yaml.YAMLError, AttributeError):  # a LoRA folder outside a run folder: nothing to compare
        return
    now = flatten(to_dict(cfg))
    differ = [k for k in FIXED if k in saved and saved[k] != now.get(k)]
    moved = moved_model(saved, now) if "model.pretrained" in differ else None
    if moved is not None:
        differ.remove("model.pretrained")
        if moved:
            warn(f"--lora {lora}: trained with model.pretrained={saved['model.pretrained']!r}, now "
                 f"{now['model.pretrained']!r} ({moved}); the LoRAs load where their shapes fit that UNet")
    if differ:
        was = ", ".join(f"{k}={saved[k]!r}" for k in differ)
        has = ", ".join(f"{k}={now.get(k)!r}" for k in differ)
        raise ConfigError(f"--lora {lora}: trained with {was}; this config has {has}; pass --config {saved_file}")
    # The LoRAs fit; the sampler may still not be the one the run evaluated with (method.md: the interior
    # adapters alone move the toy judge from 0.838 to 0.550).
    other = [k for k in SAMPLER if k in saved and saved[k] != now.get(k)]
    if other:
        warn(f"--lora {lora}: the run evaluated with " + ", ".join(f"{k}={saved[k]!r}" for k in other) + "; this "
             "samples with " + ", ".join(f"{k}={now.get(k)!r}" for k in other) + f" (--config {saved_file} for the run's)")


SAMPLER = ("chain.steps", "chain.guidance_scale", "chain.interior_adapters", "model.timestep_spacing")


def for_sampling(cfg: Config) -> Config:
    """`cfg` for the original N-step sampler, which never calls the shortcut: it is neither fetched nor loaded
    (an SDXL `unet:` shortcut is another 5 GB on the card, and a download on a machine that only samples)."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, shortcut="none"))


def load_trained(cfg: Config, lora: str | None) -> Models:
    """The config's models with the LoRAs of a run (its own adapters and chain), or without any; no shortcut."""
    cfg = for_sampling(cfg)
    if lora:
        check_trained_with(cfg, lora)
    plan = training_plan(cfg, saved=read_lora_plan(lora)) if lora else None
    models = load_models(cfg, with_loras=bool(lora), plan=plan)
    if lora:
        load_lora_state(models.unet, Path(lora), models.adapters)
    return models


def run_sample(cfg: Config, lora: str, prompt: list[str], prompts_file: str | None, seeds: list[int],
               steps: int | None, guidance: float | None, out: Path, compare: bool) -> Path:
    """Every prompt with every seed through the original sampler with the run's LoRAs (and, with
    `compare`, the base model beside them in one grid). Images go to `out`."""
    prompts = list(prompt) + (read_prompts(prompts_file, cfg.data.prompt_column, "--prompts") if prompts_file else [])
    if not prompts:
        raise ConfigError("give --prompt \"...\" (repeatable) or --prompts <file>")
    output_folder("--out", out)  # before sampling, not after
    chain = dataclasses.replace(cfg.chain, steps=steps or cfg.chain.steps,
                                guidance_scale=cfg.chain.guidance_scale if guidance is None else guidance)
    cfg = dataclasses.replace(cfg, chain=chain)
    models = load_trained(cfg, lora)
    items = [(p, s) for p in prompts for s in seeds]
    tuned = generate(models, cfg, [p for p, _ in items], [s for _, s in items])
    out.mkdir(parents=True, exist_ok=True)
    for i, ((_, seed), image) in enumerate(zip(items, tuned)):
        save_grid(image[None], out / f"{i:03d}-seed{seed}.png", min_tile=1)
    if compare:
        base = generate(models, cfg, [p for p, _ in items], [s for _, s in items],
                        plan=dataclasses.replace(models.plan, adapters=()))
        pairs = torch.stack([base, tuned], 1).flatten(0, 1)  # base_0, tuned_0, base_1, ...
        path = save_grid(pairs, out / "compare.png", cols=2)
        print(f"base | tuned, one row per prompt and seed: {path}")
    print(f"{len(items)} image(s) in {out}")
    return out


def evaluate_trained(cfg: Config, lora: str | None, grid: Path | None = None) -> dict:
    """`evaluate` of the model with the LoRAs in `lora` (None: the untrained model) on `cfg`'s
    held-out prompts, seeds and judge; the sample grid to `grid` if given."""
    from shortft.evaluate import evaluate
    from shortft.rewards import Rewards

    models = load_trained(cfg, lora)
    rewards = Rewards(cfg.reward.weights, cfg.reward.options, [cfg.eval.objective, *cfg.eval.terms], models.device)
    return evaluate(models, cfg, rewards, grid)
