"""`shortft sample` and `shortft eval --lora`: a config's models with the LoRAs a run wrote.

    models = load_trained(cfg, "runs/tiny/lora")     # the run's adapters and chain, on the config's model
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

from shortft.config import INTERIOR_ADAPTERS, Config, ConfigError, alpha_as_used, flatten, to_dict
from shortft.data import read_prompts
from shortft.evaluate import generate, save_grid
from shortft.lora import load_lora_state
from shortft.lora_plan import PLAN_FILE, read_lora_plan
from shortft.models import Models, load_models
from shortft.out_paths import output_folder, write_whole
from shortft.plan import training_plan
from shortft.progress import warn


def trained_settings(lora: str | Path) -> tuple[dict, str]:
    """The flat settings a LoRA folder was trained with, and where they were read: the run's `config.yaml`
    beside `<run>/lora`, a checkpoint's `state.json` beside `<checkpoint>/lora`, else the rank and alpha
    its files carry and the sampler of its `shortft_lora.json` (a folder copied out of a run, or downloaded from
    MLflow); ({}, "") where none is."""
    import yaml

    from shortft.lora import lora_metadata
    from shortft.resume_settings import read_state
    from shortft.safe_load import Unreadable

    folder = Path(lora).parent
    try:
        return flatten(yaml.safe_load((folder / "config.yaml").read_text()) or {}), str(folder / "config.yaml")
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    try:
        saved = read_state(folder).get("config")
        if isinstance(saved, dict):
            return saved, str(folder / "state.json")
    except Unreadable:  # no checkpoint beside it, or one cut short: the files' own metadata below
        pass
    plan, found = read_lora_plan(lora), {}
    for name in plan["adapters"]:
        meta = lora_metadata(Path(lora) / name) if (Path(lora) / name).is_dir() else None
        if meta and "r" in meta and "lora_alpha" in meta:  # one adapter tells: a run's adapters share them
            found = {"lora.rank": meta["r"], "lora.alpha": float(meta["lora_alpha"])}
            break
    # and the sampler its plan was made for (a copied lora/ sampled with this config's interior adapters,
    # another model than the run evaluated, without a word)
    if isinstance(plan.get("steps"), int):
        found["chain.steps"] = plan["steps"]
    if plan["method"] == "shortft" and plan.get("interior") in INTERIOR_ADAPTERS:
        found["chain.interior_adapters"] = plan["interior"]
    return (found, str(lora)) if found else ({}, "")


def check_trained_with(cfg: Config, lora: str | Path, flags: dict[str, str] | None = None) -> str | None:
    """The LoRAs of a run (`trained_settings`) fit `cfg`: the same base model and LoRA shape. Else one line
    naming both values and where the run's are, before anything loads; it was PyTorch's state-dict error
    after the model had loaded, or (a folder with no run config beside it) LoRAs scaled by this config's
    alpha, not the run's, without a word. `flags`: the sampler's keys a command's flag set (`--steps`),
    which the run's config would not change: the note names the flag. Returns the note where the sampler is
    not the one the run evaluated with, for the caller to print once the sampler is known to run."""
    from shortft.resume_settings import FIXED, moved_model

    saved, where = trained_settings(lora)
    if not saved:
        return None
    now = flatten(to_dict(cfg))
    if saved.get("lora.alpha") is not None or now.get("lora.alpha") is not None:  # unset is the rank
        saved, now = alpha_as_used(saved), alpha_as_used(now)
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
        raise ConfigError(f"--lora {lora}: trained with {was}; this config has {has}; " + _fix(where, saved, differ))
    # The LoRAs fit; the sampler may still not be the one the run evaluated with (method.md: the interior
    # adapters alone move the toy judge from 0.838 to 0.550).
    other = [k for k in SAMPLER if k in saved and saved[k] != now.get(k)]
    if other:
        flags = {k: flag for k, flag in (flags or {}).items() if k in other}
        rest = [k for k in other if k not in flags]
        fixes = (["pass " + " ".join(f"{flag} {saved[k]}" for k, flag in flags.items())] if flags else []) + (
            [_fix(where, saved, rest, keys_only=True)] if rest else [])
        return (f"--lora {lora}: the run evaluated with " + ", ".join(f"{k}={saved[k]!r}" for k in other) + "; this "
                "samples with " + ", ".join(f"{k}={now.get(k)!r}" for k in other) + f" ({'; '.join(fixes)})")
    return None


def _fix(where: str, saved: dict, keys: list[str], keys_only: bool = False) -> str:
    """How to sample with the run's settings: its config (which may name code: reward.modules), or the keys
    (`keys_only`: the sampler's few, which hold whatever --config was given: `--config run/config.yaml
    chain.interior_adapters=segment` was told to pass the --config it had)."""
    if where.endswith("config.yaml") and not keys_only:
        modules = saved.get("reward.modules")
        return f"pass --config {where}" + (f" (read it first: its reward.modules {modules} are imported, so run)"
                                           if modules else "")
    return "pass " + " ".join(f"{k}={json.dumps(saved[k])}" for k in keys) + f" (the run's, from {where})"


SAMPLER = ("chain.steps", "chain.guidance_scale", "chain.interior_adapters", "model.timestep_spacing")


def for_sampling(cfg: Config) -> Config:
    """`cfg` for the original N-step sampler, which never calls the shortcut: it is neither fetched nor loaded
    (an SDXL `unet:` shortcut is another 5 GB on the card, and a download on a machine that only samples)."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, shortcut="none"))


def load_trained(cfg: Config, lora: str | None, flags: dict[str, str] | None = None) -> Models:
    """The config's models with the LoRAs of a run (its own adapters and chain), or without any; no shortcut.
    `flags`: as `check_trained_with`'s."""
    cfg = for_sampling(cfg)
    note = check_trained_with(cfg, lora, flags) if lora else None
    plan = training_plan(cfg, saved=read_lora_plan(lora)) if lora else None
    models = load_models(cfg, with_loras=bool(lora), plan=plan)
    models.denoiser.timesteps(cfg.chain.steps)  # a schedule the model refuses (`--steps 1001`) is refused here,
    if note:  # before the note on it (the note came first, then the error at the first image)
        warn(note)
    if lora:
        load_lora_state(models.unet, Path(lora), models.adapters)
    return models


def run_sample(cfg: Config, lora: str, prompt: list[str], prompts_file: str | None, seeds: list[int],
               steps: int | None, guidance: float | None, out: Path, compare: bool) -> Path:
    """Every prompt with every seed through the original sampler with the run's LoRAs (and, with
    `compare`, the base model beside them in one grid). Images go to `out`."""
    blank = next((p for p in prompt if not p.strip()), None)
    if blank is not None:  # drawn unconditioned, as data.prompts' blank lines are refused
        raise ConfigError(f"--prompt {blank!r}: blank; give text")
    twice = next((p for i, p in enumerate(prompt) if p in prompt[:i]), None)
    if twice is not None:  # the same images drawn twice, as `--seeds 0,0` was
        raise ConfigError(f"--prompt {twice!r}: given twice; give each once")
    prompts = list(prompt) + (read_prompts(prompts_file, cfg.data.prompt_column, "--prompts") if prompts_file else [])
    if not prompts:
        raise ConfigError("give --prompt \"...\" (repeatable) or --prompts <file>")
    output_folder("--out", out)  # before sampling, not after
    chain = dataclasses.replace(cfg.chain, steps=steps or cfg.chain.steps,
                                guidance_scale=cfg.chain.guidance_scale if guidance is None else guidance)
    cfg = dataclasses.replace(cfg, chain=chain)
    # (a folder that is not a set, a run's: `load_trained` says which folder to give)
    saved = read_lora_plan(lora) if lora and (Path(lora) / PLAN_FILE).is_file() else {}
    segments = saved["segments"] if saved.get("method") == "shortft" else 1  # a baseline's N steps have none
    if chain.steps < segments:  # the segments collapsed (segment_1 never ran alone); chain.steps=2 was refused
        raise ConfigError(f"{'--steps' if steps else 'chain.steps='}{' ' if steps else ''}{chain.steps}: the LoRA set "
                          f"{lora} has {segments} segments, and each needs a step; give {segments} or more")
    flags = {k: flag for k, flag, given in (("chain.steps", "--steps", steps), ("chain.guidance_scale", "--guidance",
                                                                                 guidance)) if given is not None}
    try:
        models = load_trained(cfg, lora, flags)
    except ConfigError as e:  # the schedule's refusal names chain.steps, which --steps replaced
        said = f"chain.steps={chain.steps}:"
        if steps and str(e).startswith(said):
            raise ConfigError(f"--steps {steps}:{str(e)[len(said):]}") from None
        raise
    items = [(p, s) for p in prompts for s in seeds]
    tuned = generate(models, cfg, [p for p, _ in items], [s for _, s in items],
                     desc="sampling (tuned)" if compare else "sampling")
    if compare:  # every image drawn before the folder changes: a Ctrl-C here leaves the earlier sample whole
        base = generate(models, cfg, [p for p, _ in items], [s for _, s in items],
                        plan=dataclasses.replace(models.plan, adapters=()), desc="sampling (base)")
    out.mkdir(parents=True, exist_ok=True)
    if removed := clear_earlier(out):
        warn(f"shortft: note: {out}: the {removed} image(s) of the earlier sample there are replaced by these "
             "(--out <folder> keeps both)")
    images = [{"file": f"{i:03d}-{_slug(prompt)}-seed{seed}.png", "prompt": prompt, "seed": seed}
              for i, (prompt, seed) in enumerate(items)]
    if compare:
        images.append({"file": "compare.png", "prompt": "base | tuned, one row per prompt and seed, in the order above"})
    # the index before its images: one cut short as it writes them names them all (the next sample removes them)
    write_whole(out / INDEX, json.dumps({"lora": str(lora) if lora else None, "steps": chain.steps,
                                         "guidance_scale": chain.guidance_scale, "images": images}, indent=1))
    for entry, image in zip(images, tuned):
        save_grid(image[None], out / entry["file"], min_tile=1)
    if compare:
        pairs = torch.stack([base, tuned], 1).flatten(0, 1)  # base_0, tuned_0, base_1, ...
        print(f"base | tuned, one row per prompt and seed: {save_grid(pairs, out / 'compare.png', cols=2)}")
    print(f"{len(items)} image(s) in {out} (which prompt and seed each is: {out / INDEX})")
    return out


INDEX = "samples.json"
SAMPLED = re.compile(r"\d{3,}-[a-z0-9-]+-seed\d+\.png|compare\.png")  # the names `run_sample` gives its images


def clear_earlier(out: Path) -> int:
    """The images an earlier `shortft sample` wrote in `out` (its `samples.json` lists them), removed: a second
    call overwrote some and left the others, and its line counted only its own. Nothing else is touched: a
    listed file is removed only if its name is one the sampler gives (a `samples.json` planted in a shared
    folder listing `wedding.png` had it deleted). Returns how many there were."""
    try:
        earlier = json.loads((out / INDEX).read_text()).get("images", [])
    except (OSError, ValueError, AttributeError):
        return 0
    removed = 0
    for entry in earlier:
        name = entry.get("file") if isinstance(entry, dict) else None
        if isinstance(name, str) and SAMPLED.fullmatch(name):  # this folder's own files, as named above
            removed += (out / name).is_file()
            (out / name).unlink(missing_ok=True)
    return removed


def _slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40].rstrip("-") or "prompt"


def evaluate_trained(cfg: Config, lora: str | None, grid: Path | None = None) -> dict:
    """`evaluate` of the model with the LoRAs in `lora` (None: the untrained model) on `cfg`'s
    held-out prompts, seeds and judge; the sample grid to `grid` if given."""
    from shortft.evaluate import evaluate
    from shortft.rewards import Rewards

    models = load_trained(cfg, lora)
    rewards = Rewards(cfg.reward.weights, cfg.reward.options, [cfg.eval.objective, *cfg.eval.terms], models.device)
    return evaluate(models, cfg, rewards, grid)
