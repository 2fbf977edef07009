"""A sweep's own settings, stored next to its Tune state, so that `--resume --name X` runs the same sweep
(same space, base config, trial count, sizes, MLflow store, output folder) whatever flags the resume is
given, and from whatever folder, and refuses, in one line, a flag that would make it another sweep."""

from __future__ import annotations

import json
from pathlib import Path

from shortft.config import ConfigError
from shortft.out_paths import write_whole
from shortft.sweep.trials import EXPERIMENT, RESOURCE_WAIT_S

FILE = "shortft_sweep.json"
DEFAULTS = {"space": "toy", "config": None, "num_samples": 6, "workers_per_trial": 1, "gpus_per_worker": 0.0,
            "max_concurrent": None, "experiment": EXPERIMENT, "smoke_test": False, "seed": 0,
            "resource_wait_s": RESOURCE_WAIT_S, "tracking_uri": "", "output_root": None}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _given(key: str, value) -> str:
    return "--no-mlflow" if key == "tracking_uri" and value is False else f"{_flag(key)} {value}"


def _had(key: str, value) -> str:
    return "no MLflow" if key == "tracking_uri" and value is False else str(value)


def _path_for(value):
    """A space or config given as a file is stored as an absolute path (a resume may run elsewhere)."""
    return str(Path(value).resolve()) if isinstance(value, str) and Path(value).is_file() else value


def _read(storage_path: str, name: str) -> dict | None:
    if "://" in storage_path:
        import pyarrow.fs

        fs, root = pyarrow.fs.FileSystem.from_uri(storage_path)
        try:
            with fs.open_input_stream(f"{root}/{name}/{FILE}") as f:
                text = f.read()
        except (FileNotFoundError, OSError):
            return None
    else:
        path = Path(storage_path) / name / FILE
        if not path.is_file():
            return None
        text = path.read_text()
    try:
        return json.loads(text)
    except ValueError:  # cut short as the sweep started (a full disk): one line, not a traceback
        raise ConfigError(f"sweep {name!r}: its settings ({storage_path}/{name}/{FILE}) are cut short or unreadable; "
                          "remove that file and resume with the flags the sweep started with, or start it again "
                          "under another --name") from None


def sweep_exists(storage_path: str, name: str) -> bool:
    """Tune's state of sweep `name` is under the storage path (a local dir, or s3://, gs://, file://...)."""
    if "://" in storage_path:
        import pyarrow.fs

        fs, root = pyarrow.fs.FileSystem.from_uri(storage_path)
        return fs.get_file_info(f"{root}/{name}/tuner.pkl").type != pyarrow.fs.FileType.NotFound
    return (Path(storage_path) / name / "tuner.pkl").is_file()


def write(storage_path: str, name: str, values: dict) -> None:
    text = json.dumps(values, indent=1)
    if "://" in storage_path:
        import pyarrow.fs

        fs, root = pyarrow.fs.FileSystem.from_uri(storage_path)
        fs.create_dir(f"{root}/{name}", recursive=True)
        with fs.open_output_stream(f"{root}/{name}/{FILE}") as f:
            f.write(text.encode())
        return
    (Path(storage_path) / name).mkdir(parents=True, exist_ok=True)
    write_whole(Path(storage_path) / name / FILE, text)


def settle(given: dict, storage_path: str, name: str | None, resume: bool) -> dict:
    """The sweep's settings: for a new sweep the given values (None = not given) over the defaults; for
    a resume the stored ones, with every given value that differs refused in one line."""
    if not resume:
        return {k: _path_for(given[k]) if given.get(k) is not None else v for k, v in DEFAULTS.items()}
    stored = _read(storage_path, name) if name else None
    if stored is None:  # a sweep started before its settings were stored: the flags as given
        return settle(given, storage_path, name, resume=False)
    conflicts = [f"{_given(k, given[k])} (the sweep has {_had(k, stored[k])})" for k in DEFAULTS
                 if k in stored and given.get(k) is not None and _path_for(given[k]) != stored[k]]
    if conflicts:
        raise ConfigError(f"--resume --name {name}: {'; '.join(conflicts)}; drop the flag to continue the sweep as "
                          "it started, or give another --name for a new sweep")
    fresh = settle(given, storage_path, name, resume=False)  # for settings stored before they were kept
    return {k: stored[k] if k in stored else fresh[k] for k in DEFAULTS}
