"""One process trains in a run folder at a time.

A second `shortft train` in the same folder (a resume started in another terminal, a scheduler's requeue
while the first job still writes its last checkpoint, the same command run twice) trained beside the
first: each pruned the other's checkpoints, their rows interleaved in metrics.jsonl, and their steps went
into one MLflow run. A new run was refused only once the first had written a checkpoint.

The lock is an flock on `.shortft.lock` in the run folder, so it ends with its process, however that
ends (no stale lock after a crash or kill -9). A run that finds the folder in use waits for the other
process to end (a restarted Ray worker group, a requeued job: the old one is still finishing), up to
`$SHORTFT_LOCK_WAIT_S` seconds (default 60), then stops in one line naming that process. Where the
filesystem has no flock, runs are not locked.

    with run_lock.held(cfg.output_dir):   # raises FolderInUse if another process keeps it
        ...train...
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shortft.config import ConfigError
from shortft.out_paths import refuse_links
from shortft.progress import warn

FILE = ".shortft.lock"
WAIT_ENV = "SHORTFT_LOCK_WAIT_S"
_HELD: set[tuple[Path, int]] = set()  # (folder, thread) held: `held` inside `held` is the same lock


class FolderInUse(ConfigError):
    """Another process kept the run folder past the wait. A user's line (status 2), but not final to a
    retry (`attempts.final` matches exact types): a restarted Ray worker group or trial may find it free."""


def _wait_s() -> float:
    text = os.environ.get(WAIT_ENV, "60")
    try:
        return max(0.0, float(text))
    except ValueError:
        raise ConfigError(f"${WAIT_ENV}={text!r}: give the seconds to wait for another run in the folder, "
                          "e.g. 60") from None


def _holder(fd: int) -> str:
    try:
        who = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {who['pid']} on {who['host']}, since {who['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not said which"


@contextmanager
def held(output_dir: Path, wait_s: float | None = None, quiet: bool = False,
         links_refused: bool = True) -> Iterator[None]:
    """The run folder locked for this process while the block runs; waits `wait_s` (default
    `$SHORTFT_LOCK_WAIT_S`, else 60) for another holder to end, saying so unless `quiet`, then raises
    FolderInUse. A folder holding a symbolic link is refused first (`out_paths.refuse_links`), unless
    not `links_refused` (a sweep's driver removing a trial's checkpoints)."""
    import fcntl

    folder = Path(output_dir)
    key = (folder.resolve(), threading.get_ident())
    if key in _HELD:  # this thread holds it already (the CLI around the loop)
        yield
        return
    if links_refused:
        refuse_links("train.output_dir", folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # a link made since: not followed
    except OSError:  # a folder this process cannot write: the run's own writes will say so
        fd = None
    if fd is None:
        yield
        return
    try:
        wait_s = _wait_s() if wait_s is None else wait_s
        deadline, told, locked = time.monotonic() + wait_s, False, False
        while not locked:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise FolderInUse(
                        f"train.output_dir {output_dir} is in use by another run ({_holder(fd)}); waited "
                        f"{wait_s:g} s ({WAIT_ENV}) for it to end: stop it, or set name=<new name> (or "
                        "train.output_dir) to start another") from None
                if not told and not quiet:
                    warn(f"shortft: train.output_dir {output_dir} is in use by another run ({_holder(fd)}); waiting "
                         f"up to {wait_s:g} s for it to end")
                    told = True
                time.sleep(0.5)
            except OSError:  # no flock on this filesystem: unlocked, as before
                break
        if locked:  # who keeps it, for the line of a run that finds it kept
            who = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(who).encode(), 0)
        _HELD.add(key)
        yield
    finally:
        _HELD.discard(key)
        os.close(fd)  # the lock ends here
