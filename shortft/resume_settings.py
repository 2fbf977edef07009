"""The settings a checkpoint was written with (its `state.json`), against a resumed run's: which a resume
refuses (its LoRAs would not fit, or would mean something else), which it names, which pass without a
note. Also what `shortft sample/eval --lora` checks a run's LoRAs against."""

from __future__ import annotations

import json
from pathlib import Path

from shortft.config import ConfigError
from shortft.safe_load import Unreadable

# Settings whose change makes a checkpoint's LoRAs not fit, or mean something else: a resume refuses them.
FIXED = ("model.pretrained", "lora.rank", "lora.alpha", "lora.targets")
# which LoRAs a run has: refused where the adapters differ (a baseline's one set whatever these say)
ADAPTER_KEYS = ("chain.method", "chain.segments", "chain.interior_adapters", "lora.timestep_aware")
# Settings a resumed run may change without note: its length, bookkeeping, where it runs.
BOOKKEEPING = ("name", "train.steps", "train.output_dir", "train.log_every", "train.checkpoint_every",
               "train.keep_checkpoints", "train.time_budget_s", "train.call_budget", "model.device", "model.compile",
               "model.compile_backend")


def read_state(path: Path) -> dict:
    """A checkpoint's state.json; `Unreadable` (one line) where it is cut short or no JSON."""
    try:
        state = json.loads((Path(path) / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise Unreadable(f"checkpoint {path}: state.json unreadable ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise Unreadable(f"checkpoint {path}: state.json holds no step")
    return state


def moved_model(saved: dict, now: dict) -> str | None:
    """Whether `model.pretrained` (flat configs) changed only in where the model is: None where the LoRAs are
    known not to fit (UNets of two architectures, both on this machine); else why it may be the same model
    ("" for one path resolved), which the caller says."""
    from shortft.hub import unet_architecture

    was, has = str(saved.get("model.pretrained")), str(now.get("model.pretrained"))
    if Path(was).expanduser().resolve() == Path(has).expanduser().resolve():
        return ""
    a, b = unet_architecture(was, saved.get("model.revision")), unet_architecture(has, now.get("model.revision"))
    if a is not None and b is not None:
        return "the same UNet architecture" if a == b else None
    gone = [v for v, arch in ((was, a), (has, b)) if arch is None]  # the LoRAs' load checks their shapes
    return f"{' and '.join(gone)} {'is' if len(gone) == 1 else 'are'} not on this machine to compare"


def changed_settings(path: Path, settings: dict, adapters: list[str]) -> list[str]:
    """`key old -> new` for each setting of this run (`settings`: flat config) that differs from the one the
    checkpoint at `path` was written with, bookkeeping left out (but a shorter `train.steps`); a ConfigError
    where the checkpoint's LoRAs would not fit (FIXED keys, or another set of adapters). A checkpoint without
    its settings: []."""
    saved = read_state(path).get("config")
    if not (Path(path) / "lora").is_dir():
        raise Unreadable(f"checkpoint {path}: its lora/ folder is missing")
    if saved is None:  # written before checkpoints kept their settings
        return []
    differ = [k for k in dict.fromkeys([*saved, *settings]) if saved.get(k) != settings.get(k) and k not in BOOKKEEPING]
    held = sorted(p.name for p in (Path(path) / "lora").iterdir() if p.is_dir())
    blocking = [k for k in differ if k in FIXED or (k in ADAPTER_KEYS and held != sorted(adapters))]
    moved = moved_model(saved, settings) if "model.pretrained" in blocking else None
    if moved is not None:  # listed with the changed settings, with the reason
        blocking.remove("model.pretrained")
    if blocking:
        was = ", ".join(f"{k}={json.dumps(saved.get(k))}" for k in blocking)
        now = ", ".join(f"{k}={json.dumps(settings.get(k))}" for k in blocking)
        raise ConfigError(f"resume: the checkpoint {path} was written with {was}; this run has {now}, which its LoRAs "
                          f"do not fit; resume with the checkpoint's values, or start a new run (another "
                          f"train.output_dir)")
    shorter = _shorter_run(saved.get("train.steps"), settings.get("train.steps"))
    return [f"{k} {json.dumps(saved.get(k))} -> {json.dumps(settings.get(k))}"
            + (f" ({moved}; the LoRAs load where their shapes fit)" if k == "model.pretrained" and moved else "")
            for k in differ] + shorter


def _shorter_run(was, has) -> list[str]:
    """A longer `train.steps` is what a resume is for (bookkeeping, no note); a shorter one is mostly a resume
    without the `train.steps=` override the run started with, which then ended at --config's default."""
    if not (isinstance(was, int) and isinstance(has, int) and has < was):
        return []
    return [f"train.steps {was} -> {has} (the run was started with train.steps={was}; pass it again to keep that "
            "length)"]


def check_workers(path: Path, state: dict, world_size: int) -> None:
    """A checkpoint resumes only with the worker count that wrote it: the global batch and each rank's
    draws depend on it (a `--dry-run` says so as the run would)."""
    written_by = state.get("world_size", 1)
    if written_by != world_size:
        raise ConfigError(f"resume: the checkpoint {path} was written by {written_by} worker(s), this run has "
                          f"{world_size}; resume with --workers {written_by} (the global batch and every "
                          "rank's data order depend on the worker count)")
