"""Differentiable rewards: the registry (`registry.py`) and the pixel rewards (`pixel.py`).

    from shortft import rewards
    rewards.names()                      # every registered term, built-in worlds' included
    r = rewards.Rewards({"symmetry": 1.0}, options={})
"""

from shortft.config import ConfigError
from shortft.rewards import pixel  # noqa: F401  (registers the pixel rewards)
from shortft.rewards.registry import RewardFn, Rewards, build, check_config, check_name, names, register

__all__ = ["ConfigError", "RewardFn", "Rewards", "build", "check_config", "check_name", "names", "register"]
