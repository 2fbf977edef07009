"""ShortFT: reward fine-tuning of text-to-image diffusion models through a shortcut-built short chain.

    import shortft
    cfg = shortft.load_config("tiny", ["train.steps=10"])
    result = shortft.train(cfg)
"""

from shortft.checks import check, load_config
from shortft.config import Config, ConfigError

__version__ = "0.1.0"


def train(cfg, callbacks=(), resume=False):
    """Fine-tune in this process; see `shortft.loop.train`."""
    from shortft.loop import train as _train

    return _train(cfg, callbacks, resume)


__all__ = ["Config", "ConfigError", "check", "load_config", "train", "__version__"]
