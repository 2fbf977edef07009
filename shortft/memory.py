"""A process's GPU memory: its peak (`peak_memory_mb`), and running out of it told in one line: where
(loading, which step, which evaluation), how much was asked for and free, and the settings of this config
that would lower the peak.

    with explained(cfg, f"in step {step}", "step"):
        ...   # a torch.OutOfMemoryError (or the CPU's) in here becomes an OutOfMemory with that line

Without it a run on a card too small for its config ended in a page of traceback whose last line is
PyTorch's allocator report, which names no setting of this project. The settings are the ones that
change the peak (BENCHMARKS.md: per-call checkpointing takes ShortFT on SD 1.5 from 1.58x to 1.10x the
checkpointed full chain's memory); the ones already set are not offered again.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager

import torch

from shortft.config import Config


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory of this process, or its peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class OutOfMemory(RuntimeError):
    """A one-line account of a torch.OutOfMemoryError (the CLI prints it; status 1). `beside_others`:
    other processes held memory on the card then (a retry may fit once they leave)."""

    beside_others = False

    @classmethod
    def from_line(cls, line: str) -> "OutOfMemory":
        """The error of a line `message` wrote (a Ray Train worker's, found again in the driver): beside
        others where it says so, or where the machine's memory ran out (others may hold it)."""
        told = cls(line)
        told.beside_others = line.startswith("out of CPU memory") or " process holds " in line or " processes hold " in line
        return told


_SIZE = r"([\d.]+ (?:bytes|[KMGTP]iB))"  # c10's format_size


def report(error: BaseException) -> str:
    """PyTorch's allocator report in a few words: asked for, free of total, and what other processes hold."""
    text = str(error)
    asked, total, free = (re.search(pattern, text) for pattern in (
        r"Tried to allocate " + _SIZE, r"total capac\w* of " + _SIZE, r"of which " + _SIZE + " is free"))
    if not (asked and total and free):
        return text.strip().splitlines()[0][:200] if text.strip() else type(error).__name__
    others = _others(error)
    return (f"asked for {asked.group(1)} with {free.group(1)} of {total.group(1)} free"
            + (f"; {'another process holds' if len(others) == 1 else 'other processes hold'} {' + '.join(others)}"
               if others else ""))


def _others(error: BaseException) -> list[str]:
    """What each other process on the card held, as PyTorch's report lists them."""
    return re.findall(r"Process \d+ has " + _SIZE + " memory in use", str(error))


def _fragmented(error: BaseException) -> bool:
    """PyTorch held a GiB or more that it could not hand out (its own advice: expandable segments)."""
    found = re.search(r"([\d.]+) GiB is reserved by PyTorch but unallocated", str(error))
    return bool(found) and float(found.group(1)) >= 1.0


KINDS = ("loading", "step", "evaluation", "sampling")  # sampling: `shortft eval`/`sample`, outside a training run


def settings(cfg: Config, what: str) -> list[str]:
    """The `key=value` settings of `cfg` that lower the peak of `what` (one of KINDS)."""
    out = []
    if cfg.model.dtype == "float32":
        out.append("model.dtype=bfloat16 (the frozen weights in half the memory)")
    if what == "step":
        if not cfg.chain.checkpointing:
            out.append("chain.checkpointing=true (each call recomputed in backward)")
        if not cfg.model.gradient_checkpointing:
            out.append("model.gradient_checkpointing=true")
        if not cfg.model.vae_checkpointing:
            out.append("model.vae_checkpointing=true")
        if cfg.train.batch_size > 1:
            half = cfg.train.batch_size // 2
            accum = cfg.train.grad_accum * cfg.train.batch_size // half
            same = " (the same images per step)" if half * accum == cfg.train.batch_size * cfg.train.grad_accum else ""
            out.append(f"train.batch_size={half} train.grad_accum={accum}{same}")
    if what in ("evaluation", "sampling") and cfg.eval.batch_size > 1:
        out.append(f"eval.batch_size={cfg.eval.batch_size // 2}")
    if what != "loading" and cfg.model.vae_batch_size != 1:
        out.append("model.vae_batch_size=1 (one image per decode)")
    return out


def _cpu_asked(error: BaseException) -> str | None:
    """What the CPU allocator could not hand out (its RuntimeError, not a torch.OutOfMemoryError), or None for
    any other error."""
    found = re.search(r"DefaultCPUAllocator: can't allocate memory: you tried to allocate (\d+) bytes", str(error))
    if not found:
        return None
    try:
        total = f" of the machine's {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB"
    except (ValueError, OSError, AttributeError):  # no sysconf here
        total = ""
    return f"asked for {int(found.group(1)) / 2**30:.1f} GiB{total}"


def message(cfg: Config, where: str, what: str, error: BaseException) -> str:
    fixes = settings(cfg, what)
    asked = _cpu_asked(error)
    line = f"out of CPU memory {where} ({asked})" if asked else f"out of GPU memory {where} ({report(error)})"
    line += (f"; to lower the peak: {', '.join(fixes)}" if fixes else
             f"; this config needs {'a machine' if asked else 'a card'} with more memory")
    if _fragmented(error):
        line += "; PyTorch held memory it could not hand out: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
    if what in ("step", "evaluation"):
        line += "; the checkpoints written so far are kept"
    return line


@contextmanager
def explained(cfg: Config, where: str, what: str):
    """Turns a torch.OutOfMemoryError (or the CPU allocator's failure) raised inside into an OutOfMemory naming
    `where` and the fixes for `what` (one of KINDS)."""
    assert what in KINDS, what
    try:
        yield
    except torch.OutOfMemoryError as e:
        told = OutOfMemory(message(cfg, where, what, e))
        told.beside_others = bool(_others(e))
        raise told from None
    except RuntimeError as e:  # the CPU's allocator (a lora.rank of 10**12 ended in its traceback)
        if _cpu_asked(e) is None:
            raise
        told = OutOfMemory(message(cfg, where, what, e))
        told.beside_others = True  # other processes may hold the machine's memory: a retry may fit, as before
        raise told from None
