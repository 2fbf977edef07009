"""The checks a config needs, in one step that the CLI, the loop and the sweep run before anything heavy:
its types and ranges again (a Config is a plain dataclass, changed at will after loading), reward names
(registry), model and shortcut paths, the compile backend, prompt files.

    cfg = shortft.load_config("tiny", ["chain.steps=20"])   # read_config + check
"""

from __future__ import annotations

from collections.abc import Collection

from shortft import builtin, data, rewards
from shortft.compiling import check_compile
from shortft.config import PARTS, Config, ConfigError, builtin_configs, from_dict, read_config, to_dict, validate
from shortft.plan import check_shortcut


def check(cfg: Config, parts: Collection[str] = PARTS) -> Config:
    """Raises a one-line ConfigError naming the key; returns `cfg` unchanged. The base model and those of
    `parts` (`shortft.config.PARTS`) are checked."""
    if not isinstance(cfg, Config):  # a name, path or dict was dataclasses' "asdict() should be called on ..."
        raise ConfigError(f"config {cfg!r:.60}: give a Config, e.g. shortft.load_config('tiny', ['train.steps=10'])")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:  # a misspelt part was checked as no part at all
        raise ConfigError(f"parts {unknown}: not among {', '.join(PARTS)}")
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


def checked_callbacks(callbacks) -> list:
    """`train`'s callbacks as a list, each with `shortft.loop.Callback`'s methods: `callbacks=print` or
    `[object()]` failed once the models had loaded, and left a run folder behind."""
    iterable = hasattr(callbacks, "__iter__") and not isinstance(callbacks, (str, bytes))
    items = list(callbacks) if iterable else [callbacks]
    bad = next((c for c in items if not all(callable(getattr(c, m, None)) for m in ("on_start", "on_step", "on_end"))),
               None)
    if bad is not None:
        raise ConfigError(f"callbacks: {bad!r:.60} is no Callback (on_start, on_step, on_end); give a list of "
                          "shortft.loop.Callback objects")
    return items


def check_types(base: str | dict, **keys: dict) -> None:
    """A base config's name or path (a Config: "'Config' object is not iterable"), and dicts of dotted keys
    (a list of key=value strings: "'list' object is not a mapping")."""
    if not isinstance(base, (str, dict)):
        raise ConfigError(f"base {base!r:.60}: give a config name ({', '.join(builtin_configs())}) or a YAML path")
    bad = next((label for label, value in keys.items() if not isinstance(value, dict)), None)
    if bad is not None:
        raise ConfigError(f"{bad} {keys[bad]!r:.60}: give a dict of dotted keys, e.g. {{'train.steps': 2}}")
