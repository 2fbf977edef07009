"""A failure that a retry cannot change ends the retry at once, with the same line.

Ray retries a failed sweep trial (`FailureConfig(max_failures=1)`) and restarts a failed worker group
(`shortft train --workers N`, `--max-failures 1` by default). That is right for a process that was
killed or a node that was lost. It is wasted on a bad setting (ConfigError), a run stopped for
non-finite steps, or running out of the GPU memory that the process had to itself. The same config
with the same seed fails the same way, after loading the models and training again from the last
checkpoint to the same step. The process that fails records the line in the run folder (`FILE`), with
the attempt it belongs to. An attempt is one sweep driver, one `trainable_for`, or one
`train_with_ray` call. Within that attempt, a retry finds the record and raises the same error before it
loads anything. A new attempt (`--resume` of the sweep or the run) tries again for real, since the user
may have freed the card or edited the code in between.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

from shortft.config import ConfigError
from shortft.guard import NonFiniteError
from shortft.memory import OutOfMemory
from shortft.safe_load import Unreadable

FILE = "failed.json"  # in the run folder: {"attempt", "type", "line"} of the failure a retry cannot change
_FINAL = {cls.__name__: cls for cls in (ConfigError, Unreadable, NonFiniteError, OutOfMemory)}


def new_attempt() -> str:
    return uuid.uuid4().hex[:12]


def final(error: BaseException) -> bool:
    """A retry of the same config fails the same way: a ConfigError, a non-finite stop, or out of GPU
    memory that no other process shared. Not final: a failed checkpoint write (another trial may free
    the disk), running out of memory beside other processes (they may leave), and anything else."""
    if isinstance(error, OutOfMemory):
        return not error.beside_others
    return type(error) in _FINAL.values()


def record(output_dir: Path, attempt: str, error: BaseException) -> None:
    """Writes `error`'s line for `attempt` (whole or not at all; ranks that fail together may race)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    part = output_dir / f".{FILE}.{os.getpid()}"
    part.write_text(json.dumps({"attempt": attempt, "type": type(error).__name__, "line": str(error)}))
    part.replace(output_dir / FILE)


def recorded(output_dir: Path, attempt: str) -> BaseException | None:
    """The error recorded in `output_dir` for `attempt`, as itself; None if there is none."""
    try:
        saved = json.loads((output_dir / FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("attempt") != attempt or saved.get("type") not in _FINAL:
        return None
    return _FINAL[saved["type"]](str(saved.get("line", "")))


@contextmanager
def once(output_dir: Path, attempt: str | None):
    """Runs the body unless this attempt already failed for good in `output_dir` (then raises that error
    again); records a final failure of the body. `attempt` None: always runs, records nothing."""
    if attempt is None:
        yield
        return
    before = recorded(output_dir, attempt)
    if before is not None:
        print(f"shortft: not retried (a retry of the same config fails the same way; a resume tries again): "
              f"{before}", file=sys.stderr, flush=True)
        raise before
    try:
        yield
    except BaseException as e:
        if final(e):
            record(output_dir, attempt, e)
        raise
    (output_dir / FILE).unlink(missing_ok=True)  # an earlier attempt's failure, now past
