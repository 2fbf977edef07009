"""Progress: a tqdm bar on stderr where a person watches (a terminal), none in logs (Ray workers, CI,
pipes), none at all under `--quiet` ($SHORTFT_QUIET=1, which Ray workers inherit)."""

from __future__ import annotations

import os
import sys
import warnings

QUIET_ENV = "SHORTFT_QUIET"


def quiet_libraries() -> None:
    """Import-time chatter of transformers/diffusers (optional backends) is noise on a command line."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    # diffusers (0.42) still passes this argument to huggingface_hub, which says it is ignored, on every load
    warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated")


def quiet() -> bool:
    return os.environ.get(QUIET_ENV, "") not in ("", "0")


def bar(iterable=None, show: bool = True, **kwargs):
    """tqdm over `iterable` (s/it and ETA), shown only on a terminal, if `show`, and never when quiet."""
    from tqdm.auto import tqdm

    disable = True if quiet() or not show else None  # None: tqdm's own test, off where stderr is not a tty
    return tqdm(iterable, disable=disable, file=sys.stderr, dynamic_ncols=True, **kwargs)


def say(line: str) -> None:
    """A progress line on stdout (above the bar, if one is shown); nothing when quiet."""
    if not quiet():
        from tqdm.auto import tqdm

        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()


def printable(text: str) -> str:
    """`text` with control characters other than newline and tab escaped (`\\x1b`): lines name values read
    from files others may write (a received run folder's config.yaml), which reached the terminal as escape
    sequences."""
    return "".join(c if c in "\n\t" or c.isprintable() else repr(c)[1:-1] for c in text)


def warn(line: str) -> None:
    """One line on stderr (`printable`): not with print(), which Ray Train V2 patches in its workers
    and which then writes the line twice where stderr is wrapped (the user saw each line twice)."""
    sys.stderr.write(printable(line) + "\n")
    sys.stderr.flush()
