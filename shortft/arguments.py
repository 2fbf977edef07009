"""argparse's parser with the package's one-line errors: `shortft sample: error: argument --steps: 0: must
be >= 1 (shortft sample --help)`, status 2. argparse printed its whole usage block (4-10 lines) first, so the
error was the last of many lines; every other bad input is one line."""

from __future__ import annotations

import argparse
import errno
import os
import sys

from shortft.config import ConfigError


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser (its subcommands' parsers too) whose errors are one line naming where to read more."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def exit(self, status: int = 0, message: str | None = None):
        if message:
            sys.stderr.write(message)
        sys.exit(status)


def name_too_long(e: OSError) -> str:
    """The one line for a path with a file or folder name longer than the file system takes (Python's
    `Path.is_file()` raises it where a check asks: `--out`, `--config`, `data.prompts` ended in a traceback);
    any other OSError is raised again."""
    if e.errno != errno.ENAMETOOLONG:
        raise e
    path = os.fsdecode(e.filename) if e.filename is not None else ""
    longest = max(path.split(os.sep), key=lambda part: len(part.encode()), default="")
    what = (f"a file or folder name of {len(longest.encode())} bytes" if len(longest.encode()) > 255 else
            f"a path of {len(path.encode())} bytes")
    return f"{path[:60] + '...' if len(path) > 60 else path}: {what}, longer than the file system takes; shorten it"


def comma_items(flag: str, text: str) -> list[str]:
    """The items of a comma-separated flag, stripped; none for a text of commas and blanks alone (the caller
    asks for one). A blank between commas is refused: `--seeds 0,,1` drew seeds 0 and 1, and the value
    meant there was lost unsaid."""
    items = [v.strip() for v in text.split(",")]
    if not any(items):
        return []
    if "" in items:
        raise ConfigError(f"{flag} {text!r}: item {items.index('') + 1} of {len(items)} is empty; give one value "
                          "between each two commas")
    return items


def check_at_least(items) -> None:
    """(label, value, low) each: None passes; else a finite number >= low (a string from Python, `"2"`, was a
    TypeError of the comparison; nan passed)."""
    for label, value, low in items:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < float("inf"):
            raise ConfigError(f"{label} {value!r}: must be a finite number >= {low}")
