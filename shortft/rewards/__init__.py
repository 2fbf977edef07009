"""Rewards: the registry (`registry.py`), the pixel rewards (`pixel.py`) and the human-preference
models (`preference.py`: PickScore, HPS v2, CLIPScore, the LAION aesthetic predictor).

    from shortft import rewards
    rewards.names()                      # every registered term, built-in worlds' included
    r = rewards.Rewards({"symmetry": 1.0}, options={})
"""

from shortft.config import ConfigError
from shortft.rewards import pixel, preference  # noqa: F401  (they register their rewards)
from shortft.rewards.registry import RewardFn, Rewards, build, check_config, check_name, names, register

__all__ = ["ConfigError", "RewardFn", "Rewards", "build", "check_config", "check_name", "names", "register"]
