"""The checks a config needs, in one step that the CLI, the loop and the sweep run before anything heavy:
its types and ranges again (a Config is a plain dataclass, changed at will after loading), reward names
(registry), model and shortcut paths, the compile backend, prompt files.

    cfg = shortft.load_config("tiny", ["chain.steps=20"])   # read_config + check
"""

from __future__ import annotations

from collections.abc import Collection

from shortft import builtin, data, rewards
from shortft.compiling import check_compile
from shortft.config import PARTS, Config, from_dict, read_config, to_dict, validate
from shortft.plan import check_shortcut


def check(cfg: Config, parts: Collection[str] = PARTS) -> Config:
    """Raises a one-line ConfigError naming the key; returns `cfg` unchanged. The base model and those of
    `parts` (`shortft.config.PARTS`) are checked."""
    # types and ranges again: a Config changed after load_config (`cfg.chain.segments = 0`) reached the
    # loop (a ZeroDivisionError in the plan; `train.steps = 0` "trained" and wrote its LoRAs)
    validate(from_dict(Config, to_dict(cfg)))
    if "rewards" in parts:
        rewards.check_config(cfg)
    builtin.check_pretrained(cfg.model.pretrained)
    check_compile(cfg.model, None)
    if "shortcut" in parts:
        check_shortcut(cfg)
    data.check_prompts(cfg, [key for key in ("prompts", "eval_prompts") if key in parts])
    return cfg


def load_config(config: str | None = None, overrides: list[str] | dict | None = None,
                parts: Collection[str] = PARTS) -> Config:
    """Built-in config name or YAML path, then `a.b=c` overrides (or a dict, nested or of dotted keys); checked
    (`check`)."""
    return check(read_config(config, overrides), parts)
