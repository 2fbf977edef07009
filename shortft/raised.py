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
