"""argparse's parser with the package's one-line errors: `shortft sample: error: argument --steps: 0: must
be >= 1 (shortft sample --help)`, status 2. argparse printed its whole usage block (4-10 lines) first, so the
error was the last of many lines; every other bad input is one line."""

from __future__ import annotations

import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser (its subcommands' parsers too) whose errors are one line naming where to read more."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def exit(self, status: int = 0, message: str | None = None):
        if message:
            sys.stderr.write(message)
        sys.exit(status)
