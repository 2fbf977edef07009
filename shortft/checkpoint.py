"""Training checkpoints: written atomically (a temp folder renamed into place), resumed exactly.

Layout: <output_dir>/checkpoints/step_000006/{lora/, optimizer.pt, state.json}. A folder without
state.json is never read: state.json is written last, then the folder is renamed, so a crash mid-save
leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import os
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
from shortft.lora import load_lora_state
from shortft.lora_save import save_loras
from shortft.progress import warn
from shortft.resume_settings import changed_settings, read_state
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
        for stale in root.glob(".tmp-step_*"):  # one a second Ctrl-C (or a kill) cut short
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        try:
            save_loras(unet, adapters, tmp / "lora", plan)
            torch.save(blob, tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, **state}))
            synced(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    synced(root, files=False)  # the rename itself, before pruning removes the checkpoint before it
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def synced(folder: Path, files: bool = True) -> None:
    """`folder` (and, with `files`, everything under it) on the disk, not only in the page cache: a rename
    that publishes a checkpoint, and the pruning after it, outran its bytes, and a power or node loss left
    a checkpoint of empty files where the one before it had been removed."""
    paths = sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True) if files else []
    for path in [*paths, folder]:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:  # a folder on a file system that syncs no folders (some network ones)
            pass
        finally:
            os.close(fd)


def list_checkpoints(root: Path) -> list[Path]:
    """The checkpoints under `root`, by step (a number: step_1000000 comes after step_999999)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step_*") if step_of(p) >= 0 and (p / "state.json").is_file()), key=step_of)


def latest(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


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


def load(path: Path, unet, adapters: list[str], optimizer, scaler: torch.amp.GradScaler | None = None) -> dict:
    """Restores LoRA weights, optimizer (its moments; the lr and weight decay stay this run's), GradScaler
    and RNG state in place; returns state.json (with `step`).
    An `Unreadable` file (one cut short, or whole but not what a run writes) raises before or while they are
    set; the checkpoint loaded next sets every LoRA, the optimizer and the RNG again."""
    path = Path(path)
    state = read_state(path)
    load_lora_state(unet, path / "lora", adapters)
    blob = safe_load.load(path / "optimizer.pt", "checkpoint")
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:  # whole, but another program's or hand-edited: torch's traceback (KeyError 'param_groups')
        why = None if isinstance(blob, dict) else f"not a dict but a {type(blob).__name__}"
        if why is None:
            optimizer.load_state_dict(blob["optimizer"])
            if scaler is not None and scaler.is_enabled() and "scaler" in blob:
                scaler.load_state_dict(blob["scaler"])
            _set_rng_state(blob["rng"])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        why = f"{type(e).__name__}: {str(e)[:150]}"
    if why is not None:
        raise Unreadable(f"checkpoint {path / 'optimizer.pt'}: not what a run writes ({why}); give a checkpoint a run "
                         "wrote, whole")
    for group, now in zip(optimizer.param_groups, settings):  # this run's lr and weight decay, not the saved ones
        group.update(now)
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
