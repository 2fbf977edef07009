"""argparse's parser with the package's one-line errors: `shortft sample: error: argument --steps: 0: must
be >= 1 (shortft sample --help)`, status 2. argparse printed its whole usage block (4-10 lines) first, so the
error was the last of many lines; every other bad input is one line."""

from __future__ import annotations

import argparse
import difflib
import errno
import os
import sys

from shortft.config import ConfigError, describe

UNRECOGNIZED = "unrecognized arguments: "


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser (its subcommands' parsers too) whose errors are one line naming where to read more."""

    def error(self, message: str):
        if message.startswith(UNRECOGNIZED):
            message = unknown_flags(self, message[len(UNRECOGNIZED):].split())
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def exit(self, status: int = 0, message: str | None = None):
        if message:
            sys.stderr.write(message)
        sys.exit(status)


def unknown_flags(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """The line for arguments no flag took: each unknown flag with the config key of its name (`--steps`:
    `train.steps=... or chain.steps=...`, where the command takes key=value; a parser's `flag_keys` adds
    others: train's `--out`) or the nearest flag. argparse named them all, with the overrides and values
    after them: `--out /tmp/r train.steps=2` was `unrecognized arguments: --out train.steps=2`."""
    flags = [e for e in extra if e.startswith("--") or (e.startswith("-") and e[1:2].isalpha())]
    if not flags:
        return UNRECOGNIZED + " ".join(extra)
    known = [s for action in parser._actions for s in action.option_strings]
    keys = [key for key, _, _ in describe()] if any(a.dest == "overrides" for a in parser._actions) else []
    said = []
    for flag in dict.fromkeys(flags):
        name, eq, value = flag.partition("=")
        word = name.lstrip("-").replace("-", "_")
        same = [k for k in keys if k.rsplit(".", 1)[-1] == word]
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        as_keys = same or [k for k in getattr(parser, "flag_keys", {}).get(word, ()) if not close]
        hint = (f"the config key{'s' if len(as_keys) > 1 else ''}: "
                + " or ".join(f"{k}={value if eq else '...'}" for k in as_keys) if as_keys
                else f"did you mean {close[0]}?" if close else "")
        said.append(f"{name}{f' ({hint})' if hint else ''}")
    return f"no flag {', '.join(said)}"


def command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)command's own parser that `args` came from: its flags and `--help` are the ones to name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
            return command_parser(action.choices[getattr(args, action.dest)], args)
    return parser


def pipe_closed() -> int:
    """The status once the reader of stdout has gone (`shortft config --keys | head`): 141, as a process the
    SIGPIPE ended; the rest of the output goes nowhere (Python's BrokenPipeError was a traceback)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit fails no more
    return 141


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


def check_at_least(items, whole: bool = False) -> None:
    """(label, value, low) each: None passes; else a finite number >= low (a string from Python, `"2"`, was a
    TypeError of the comparison; nan passed); with `whole`, an integer (`run_sweep(num_samples=1.5)` started Ray,
    evaluated the base model, then failed in Tune's traceback, and left a sweep folder behind)."""
    for label, value, low in items:
        if value is None:
            continue
        kinds = int if whole else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value < float("inf"):
            raise ConfigError(f"{label} {value!r}: must be {'an integer' if whole else 'a finite number'} >= {low}")
