"""Loading files that other people or jobs can write: checkpoints on shared storage (an s3:// bucket, an
NFS path) and reward weights from the hub. Tensors and plain values only, never arbitrary unpickling:
a pickle can run any code on the machine that loads it.

    state = safe_load.load(path, "checkpoint")     # a ConfigError, in one line, for anything else
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from shortft.config import ConfigError

# numpy's RNG state array, as checkpoints written before RNG states became plain values hold it:
# array reconstruction only, which runs no code of the file's choosing.
_numpy_core = getattr(np, "_core", None) or np.core
NUMPY_ARRAY_GLOBALS = [_numpy_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load(path: str | Path, what: str) -> object:
    """`torch.load(..., weights_only=True)` onto the CPU; refuses, in one line, a file that needs more."""
    try:
        with torch.serialization.safe_globals(NUMPY_ARRAY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                      str(e).splitlines()[0]).split(". ")[0]
        raise ConfigError(f"{what} {path}: refused: loading it would run code from whoever can write that file "
                          f"({reason[:160]}); only tensors and plain values are loaded") from None
