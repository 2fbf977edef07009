"""What libraries log and warn while we call them, collected instead of printed: the caller decides
what the user sees (one line on failure, the loader's own warnings on success)."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager


@contextmanager
def captured_warnings(*loggers: str):
    """Collect what `loggers` log at WARNING or above, and Python warnings, instead of printing them."""
    said: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    handler, saved = Collect(logging.WARNING), []
    for name in loggers:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.handlers[:], logger.propagate))
        logger.handlers, logger.propagate = [handler], False
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield said
        said.extend(str(w.message) for w in caught)
    finally:
        for logger, level, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate
            logger.setLevel(level)


@contextmanager
def captured_stderr():
    """File descriptor 2, Python's and native code's (Ray's C++ core logs there), collected into the
    yielded list's one string. Only around calls that start no child process: a child would inherit
    the capture."""
    import os
    import sys
    import tempfile

    out: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))
