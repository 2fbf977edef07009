"""Prompts: a list in the config, or a text file with one prompt per line (a path or builtin:<world>/<file>)."""

from __future__ import annotations

from pathlib import Path

from shortft import builtin
from shortft.config import Config, ConfigError


def read_prompts(value: list | str) -> list[str]:
    """A list as is, or a text file (a path, or builtin:toy/<file>) with one prompt per line."""
    if isinstance(value, str):
        return [line.strip() for line in Path(builtin.resolve_path(value)).read_text().splitlines() if line.strip()]
    return list(value)


def check_prompts(cfg: Config) -> None:
    """`data.prompts` / `data.eval_prompts` given as files must exist (lists are checked by the config)."""
    for key in ("prompts", "eval_prompts"):
        value = getattr(cfg.data, key)
        if isinstance(value, str) and not Path(builtin.resolve_path(value)).is_file():
            raise ConfigError(f"data.{key}={value!r}: no such file; give a list or a text file, one prompt per line")
