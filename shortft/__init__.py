"""ShortFT: reward fine-tuning of text-to-image diffusion models through a shortcut-built short chain.

    import shortft
    cfg = shortft.load_config("tiny", ["train.steps=10"])
    result = shortft.train(cfg)
"""

from shortft.config import Config, ConfigError

__version__ = "0.1.0"


def __getattr__(name: str):
    # `check` and `load_config` import torch (the built-in models): only when asked for, so a process
    # that only unpickles a sweep callback (Ray Train's controller) does not import torch
    if name in ("check", "load_config"):
        from shortft import checks

        return getattr(checks, name)
    raise AttributeError(f"module 'shortft' has no attribute {name!r}")


def console() -> int:
    """The `shortft` command. `shortft.cli` imports torch (seconds): a Ctrl-C then was a traceback of the import."""
    import sys

    try:
        from shortft.cli import main
    except KeyboardInterrupt:
        print("shortft: interrupted while starting", file=sys.stderr)
        return 130
    return main()


def train(cfg, callbacks=(), resume=False):
    """Fine-tune in this process; see `shortft.loop.train`."""
    from shortft.loop import train as _train

    return _train(cfg, callbacks, resume)


__all__ = ["Config", "ConfigError", "check", "load_config", "train", "__version__"]
