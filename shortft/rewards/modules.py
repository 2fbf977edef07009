"""`reward.modules`: the user's own Python modules that register reward terms (`@register`).

A term registered by `import my_rewards` in the driver is unknown to every other process: Ray Train's
workers and a sweep's trials import only `shortft`, and failed there with "unknown reward". Named in the
config, a module is imported wherever the config is checked, which every process that trains, evaluates or
samples does before it builds a reward.

    reward:
      modules: [my_rewards.py]        # a file (relative paths are made absolute where the config is read)
      weights: {my_score: 1.0}
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
import traceback
from pathlib import Path

from shortft.config import ConfigError, project_copy_hint

KEY = "reward.modules"
_IMPORTED: set[str] = set()  # entries imported in this process: each module runs once


def is_file(entry: str) -> bool:
    return entry.endswith(".py")


def import_all(entries: list) -> None:
    """Import each entry: a `.py` file or an importable module name. Any failure is one ConfigError naming
    `reward.modules` and the entry: a missing file or module with the fix, or the module's own error with
    the line of the user's file it came from."""
    for entry in entries:
        if not isinstance(entry, str) or not entry:
            raise ConfigError(f"{KEY}: {entry!r} is not a module name or a .py file, e.g. {KEY}=[my_rewards.py]")
        if entry in _IMPORTED:
            continue
        try:
            _import_file(Path(entry).expanduser()) if is_file(entry) else importlib.import_module(entry)
        except ConfigError:
            raise
        except ModuleNotFoundError as e:
            if not is_file(entry) and e.name and (entry == e.name or entry.startswith(f"{e.name}.")):
                raise ConfigError(f"{KEY}: no module {entry!r} in this process's Python path; name its file instead "
                                  f"({KEY}=[path/to/{entry.split('.')[-1]}.py]) or install it where every Ray "
                                  "worker runs") from None
            raise ConfigError(_failed(entry, e)) from None
        except Exception as e:  # the user's module raised on import: its error, not ours
            raise ConfigError(_failed(entry, e)) from None
        _IMPORTED.add(entry)


def _import_file(path: Path) -> None:
    if not path.is_file():
        where = ("on this machine (on a cluster every node needs it at that path: keep it in the project folder, "
                 "which the cluster files copy to every node)" if path.is_absolute() else
                 "(a relative path is read from the working directory where the config is loaded)"
                 + project_copy_hint(str(path)))
        raise ConfigError(f"{KEY}: {path.absolute()}: no such file {where}")
    path = path.resolve()
    known = sys.modules.get(path.stem)
    if known is not None and Path(getattr(known, "__file__", "") or "").resolve() == path:
        return  # imported by its name already (e.g. `import my_rewards` next to it)
    # A name of its own (prefix, stem, digest of the path): a file named like a package (rewards.py, utils.py)
    # must not take that package's place in sys.modules; the same on every node (no per-process hash).
    stem, digest = re.sub(r"\W", "_", path.stem), hashlib.sha1(str(path).encode()).hexdigest()[:8]
    name = f"shortft_reward_module_{stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name while it runs
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def _failed(entry: str, e: BaseException) -> str:
    """`reward.modules: importing X failed: Type: message (file:line)`: the last line of the entry's file
    that ran (of any file but importlib's and this one for a module name)."""
    where = ""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "importlib" not in f.filename
              and f.filename != __file__]
    if is_file(entry):
        own = str(Path(entry).expanduser().resolve())
        frames = [f for f in frames if f.filename == own] or frames
    if isinstance(e, SyntaxError) and e.filename:
        where = f" ({e.filename}:{e.lineno})"
    elif frames:
        where = f" ({frames[-1].filename}:{frames[-1].lineno})"
    message = e.msg if isinstance(e, SyntaxError) else str(e)
    return f"{KEY}: importing {entry} failed: {type(e).__name__}: {message}{where}"
