"""Training checkpoints: written atomically (a temp folder renamed into place), resumed exactly.

Layout: <output_dir>/checkpoints/step_000006/{lora/, optimizer.pt, state.json}. A folder without
state.json is never read: state.json is written last, then the folder is renamed, so a crash mid-save
leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import random
import shutil
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shortft import safe_load
from shortft.config import ConfigError
from shortft.lora import load_lora_state, save_loras
from shortft.progress import warn
from shortft.safe_load import Unreadable


def _rng_state() -> dict:
    """Every RNG's state as tensors and plain values, so that the file loads with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if torch.is_tensor(keys) else keys  # checkpoints written before kept the array
    np.random.set_state((name, keys.astype(np.uint32), pos, has_gauss, cached))
    cuda = state.get("cuda")
    # CUDA generators are per device: restore them only onto the same device count (a checkpoint
    # from a GPU machine still resumes on a CPU one).
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


class CheckpointWriteError(RuntimeError):
    """A run's file could not be written (disk full, no permission, a file size limit): a checkpoint, the
    step's metrics row or the final LoRAs; the previous checkpoint is intact."""


def _why_not_written(e: BaseException) -> str | None:
    """Why a write failed, or None where `e` is no failure to write (a bug keeps its traceback). On a full
    disk safetensors raises its own error and torch.save a RuntimeError without an errno, not OSError."""
    from safetensors import SafetensorError

    if isinstance(e, OSError):
        return f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
    if isinstance(e, SafetensorError) and "I/O error: " in str(e):
        return str(e).split("I/O error: ", 1)[1]
    # torch.save's writer, by where it stopped ("unexpected pos 576 vs 534", "basic_ios::clear: iostream error")
    frames = traceback.extract_tb(e.__traceback__) if isinstance(e, RuntimeError) else []
    if frames and Path(frames[-1].filename).parts[-2:] == ("torch", "serialization.py"):
        return "torch.save could not write the file (the disk full, or a file size limit)"
    return None


@contextmanager
def written(what: str, root: Path, tmp: Path | None = None) -> Iterator[None]:
    """Around a run's writes: a failure to write is one line (CheckpointWriteError) saying what was not
    written, why, the space left there and the checkpoint that is intact; `tmp`, half-written, is removed."""
    try:
        yield
    except Exception as e:
        why = _why_not_written(e)
        if why is None:
            raise
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            there = next(p for p in (Path(root), *Path(root).absolute().parents) if p.exists())
            free = f"{shutil.disk_usage(there).free / 2**30:.1f} GiB free on that disk; "
        except OSError:
            free = ""
        previous = latest(root)
        raise CheckpointWriteError(
            f"{what}: {why}; {free}"
            + (f"{previous.name} is intact, resume from it with --resume" if previous else "no earlier checkpoint")
        ) from None


def save(root: Path, step: int, unet, adapters: list[str], optimizer, state: dict, plan: dict, keep: int,
         scaler: torch.amp.GradScaler | None = None) -> Path:
    root = Path(root)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-step_{step:06d}"
    blob = {"optimizer": optimizer.state_dict(), "rng": _rng_state()}
    if scaler is not None and scaler.is_enabled():
        blob["scaler"] = scaler.state_dict()  # fp16: the loss scale and its growth tracker
    with written(f"checkpoint of step {step} not written to {root}", root, tmp):
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_loras(unet, adapters, tmp / "lora", plan)
        torch.save(blob, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """The checkpoints under `root`, by step (a number: step_1000000 comes after step_999999)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step_*") if step_of(p) >= 0 and (p / "state.json").is_file()), key=step_of)


def latest(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def check_new_run(out: Path) -> None:
    """A new run (no resume) may not start in a run folder that holds checkpoints: it wrote its steps beside
    them and its metrics over the old ones, and a later `--resume` took the newest checkpoint of either run.
    Nor in one that holds a finished run whose checkpoints were removed: its LoRAs and result went."""
    held = latest(Path(out) / "checkpoints")
    if held is not None:
        raise ConfigError(f"train.output_dir {out} holds a run (checkpoints to step {step_of(held)}); pass --resume to "
                          "continue it, or set name=<new name> (or train.output_dir) to start another")
    if (Path(out) / "result.json").is_file():
        raise ConfigError(f"train.output_dir {out} holds a finished run (result.json, lora/); set name=<new name> "
                          "(or train.output_dir) to start another")


def set_aside_newer(root: Path, step: int) -> list[Path]:
    """A resume from an earlier checkpoint of this run starts another line of steps: the checkpoints after
    it (of the line left) are renamed `left-step_N`, out of the way of pruning, which kept the newest by
    step and removed the one just written, and of the next `--resume`. Returns the new names."""
    moved = []
    for path in list_checkpoints(root):
        if step_of(path) > step:
            target, i = path.with_name(f"left-{path.name}"), 1
            while target.exists():  # a line left at an earlier resume
                target, i = path.with_name(f"left{i + 1}-{path.name}"), i + 1
            moved.append(path.rename(target))
    return moved


def check_resume_path(resume: bool | str | Path) -> None:
    """A checkpoint folder given to resume from (`--resume PATH`; True/False name none) is one: a
    ConfigError naming the latest checkpoint under it where it is a run folder (or its `checkpoints/`).
    Checked before the models load; it was a FileNotFoundError for state.json after."""
    if isinstance(resume, (bool, Fallback)):  # Fallback: Ray Train's own, not the user's
        return
    path = Path(resume)
    if (path / "state.json").is_file():
        read_state(path)  # cut short or no JSON: now, not after the models load
        return
    found = (latest(path / "checkpoints") or latest(path)) if path.is_dir() else None
    hint = (f"; the latest checkpoint under it is {found}" if found else
            "; give a checkpoints/step_NNNNNN folder, or --resume alone for the latest under train.output_dir")
    raise ConfigError(f"--resume {path}: {'not a checkpoint (no state.json)' if path.exists() else 'no such folder'}"
                      + hint)


# Settings whose change makes a checkpoint's LoRAs not fit, or mean something else: a resume refuses them.
FIXED = ("model.pretrained", "lora.rank", "lora.alpha", "lora.targets", "lora.timestep_aware")
ADAPTER_KEYS = ("chain.method", "chain.segments", "chain.interior_adapters")  # which LoRAs a run has
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
    checkpoint at `path` was written with, bookkeeping left out; a ConfigError where the checkpoint's LoRAs
    would not fit (FIXED keys, or another set of adapters). A checkpoint without its settings: []."""
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
    return [f"{k} {json.dumps(saved.get(k))} -> {json.dumps(settings.get(k))}"
            + (f" ({moved}; the LoRAs load where their shapes fit)" if k == "model.pretrained" and moved else "")
            for k in differ]


def load(path: Path, unet, adapters: list[str], optimizer, scaler: torch.amp.GradScaler | None = None) -> dict:
    """Restores LoRA weights, optimizer (its moments; the lr and weight decay stay this run's), GradScaler
    and RNG state in place; returns state.json (with `step`).
    An `Unreadable` file leaves the optimizer and RNG as they were (state.json and optimizer.pt are read
    before either is set), and the checkpoint loaded next overwrites every LoRA."""
    path = Path(path)
    state = read_state(path)
    load_lora_state(unet, path / "lora", adapters)
    blob = safe_load.load(path / "optimizer.pt", "checkpoint")
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(blob["optimizer"])
    for group, now in zip(optimizer.param_groups, settings):  # this run's lr and weight decay, not the saved ones
        group.update(now)
    if scaler is not None and scaler.is_enabled() and "scaler" in blob:
        scaler.load_state_dict(blob["scaler"])
    _set_rng_state(blob["rng"])
    return state


@dataclass(frozen=True)
class Fallback:
    """A checkpoint to resume from that, if unreadable, gives way to the newest readable one before it:
    among `older` where given (a sweep trial's run folder, for Tune's copy of its checkpoint), else in its
    own folder (Ray Train's storage path; a copy from s3:// has none). Ray Train's latest and Tune's are
    not the user's choice: a --workers run or a trial cannot name another."""
    path: Path
    older: tuple[Path, ...] | None = None


def step_of(path: Path) -> int:
    return int(Path(path).name[5:]) if Path(path).name[5:].isdigit() else -1


def candidates(resume: bool | str | Path | Fallback, root: Path) -> list[Path]:
    """The checkpoints a resume tries, in order: True, every one under `root`, newest first (`--resume`);
    a path, that one only (`--resume PATH`: no other); `Fallback(path)`, it and those before it."""
    if resume is True:
        return list_checkpoints(root)[::-1]
    if isinstance(resume, Fallback):
        path = Path(resume.path)
        if resume.older is not None:
            return [path, *sorted(resume.older, key=step_of, reverse=True)]
        return [path, *[p for p in list_checkpoints(path.parent)[::-1] if step_of(p) < step_of(path)]]
    return [Path(resume)]


def restore(resume: bool | str | Path | Fallback, root: Path, unet, adapters: list[str], optimizer, scaler,
            settings: dict) -> tuple[Path | None, dict, list[str]]:
    """(path, state.json, changed settings) of the checkpoint restored (`load`); (None, {}, []) where there
    is none. An unreadable checkpoint (cut short on the way to shared storage, a disk error) gives way to
    the one before it where `candidates` allows, with a warning; else it is one line naming the file."""
    tries = candidates(resume, root)
    for i, path in enumerate(tries):
        try:
            changed = changed_settings(path, settings, adapters)
            return path, load(path, unet, adapters, optimizer, scaler), changed
        except Unreadable as e:
            if i + 1 == len(tries):
                raise
            warn(f"resume: {e}; resuming from {tries[i + 1]}, the checkpoint before it")
    return None, {}, []
