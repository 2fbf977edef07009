"""Loading files that other people or jobs can write: checkpoints on shared storage (an s3:// bucket, an
NFS path) and reward weights from the hub. Tensors and plain values only, never arbitrary unpickling:
a pickle can run any code on the machine that loads it.

    state = safe_load.load(path, "checkpoint")     # a ConfigError, in one line, for anything else
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from shortft.config import ConfigError

# numpy's RNG state array, as checkpoints written before RNG states became plain values hold it:
# array reconstruction only, which runs no code of the file's choosing.
_numpy_core = getattr(np, "_core", None) or np.core
NUMPY_ARRAY_GLOBALS = [_numpy_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


class Unreadable(ConfigError):
    """A file that is empty, cut short or of another kind: its state, not a setting. A resume may go back
    to the checkpoint before the one holding it (`checkpoint.restore`)."""


def load(path: str | Path, what: str) -> object:
    """`torch.load(..., weights_only=True)` onto the CPU; refuses, in one line, a file that needs more,
    and says so, in one line, of a file that is no torch checkpoint at all (empty, cut short, text, an
    image)."""
    try:
        with torch.serialization.safe_globals(NUMPY_ARRAY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = next((line for line in lines if "GLOBAL" in line), None)
        if reason is None:  # the unpickler met bytes that are no pickle: not code, just not a checkpoint
            raise _not_a_checkpoint(path, what, e) from None
        raise ConfigError(f"{what} {path}: refused: loading it would run code from whoever can write that file "
                          f"({reason.split('. ')[0][:160]}); only tensors and plain values are loaded") from None
    except PermissionError as e:  # the file may be whole: not damage
        raise ConfigError(f"{what} {path}: not readable here ({e.strerror or e})") from None
    except FileNotFoundError:
        raise Unreadable(f"{what} {path}: missing") from None
    except (EOFError, RuntimeError, KeyError, ValueError, IndexError, zipfile.BadZipFile, OSError) as e:
        raise _not_a_checkpoint(path, what, e) from None  # OSError: torch's reader on a file cut short (EINVAL)


def _not_a_checkpoint(path, what: str, e: Exception) -> Unreadable:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    first = next((line for line in lines if "Unsupported" in line or "load key" in line), lines[0] if lines else "")
    detail = f"{type(e).__name__}: {first}"[:120] if first else type(e).__name__
    return Unreadable(f"{what} {path}: not a torch checkpoint ({detail}); the file is empty, cut short, or "
                      "of another kind: give the file itself, downloaded whole")
