"""The package's one-line errors, found again in the tracebacks Ray wraps them in.

A worker, a trial or a Ray task that raises one of them (a ConfigError, running out of GPU memory, a
non-finite stop, a failed checkpoint write) reaches the driver as Ray's own exception, whose text is the
remote traceback ending in `shortft.<module>.<Type>: <line>`. `found(error)` gives back (Type, line), so
that the driver can say the line (the CLI, a sweep's results table, the untrained model's row) or raise
the error again as itself.
"""

from __future__ import annotations

import re

_OURS = re.compile(r"shortft(?:\.\w+)*\.(\w+): (.+)")


def found(error: BaseException | str) -> tuple[str, str] | None:
    """(type name, line) of the last of the package's errors in `error`'s text, or None."""
    for line in reversed(str(error).splitlines()):
        raised = _OURS.match(line.strip())
        if raised:
            return raised.group(1), raised.group(2)
    return None


def one_line(error) -> str | None:
    """A failed trial's reason in one line: the package's own one-line error where it raised one (a
    `--resource-wait-s` wait, running out of GPU memory: whole, without its type), else the
    last line of the error Tune kept (the whole traceback is in the trial's error.txt)."""
    if error is None:
        return None
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    ours = found(error)
    return ours[1] if ours else (lines[-1][:300] if lines else type(error).__name__)
