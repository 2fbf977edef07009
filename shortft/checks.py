"""The checks a config needs beyond its own types and ranges, in one step that the CLI, the loop and
the sweep run before anything heavy: reward names (registry), model and shortcut paths, prompt files.

    cfg = shortft.load_config("tiny", ["chain.steps=20"])   # read_config + check
"""

from __future__ import annotations

from shortft import builtin, data, rewards
from shortft.config import Config, read_config
from shortft.plan import check_shortcut


def check(cfg: Config) -> Config:
    """Raises a one-line ConfigError naming the key; returns `cfg` unchanged."""
    rewards.check_config(cfg)
    builtin.check_pretrained(cfg.model.pretrained)
    check_shortcut(cfg)
    data.check_prompts(cfg)
    return cfg


def load_config(config: str | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Built-in config name or YAML path, then `a.b=c` overrides (or a nested dict); fully checked."""
    return check(read_config(config, overrides))
