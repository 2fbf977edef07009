"""What a run folder remembers of where its run lives outside it (`shortft_run.json`): the MLflow store,
experiment and run; the Ray run's name in its storage path; and the folder the record was written for.

A run found by its folder's absolute path (an MLflow run's key, a Ray run's name) was lost when the folder
moved. With the record, a folder that moved (the one it was written for is gone) is still that run; a copy
(its original still there) is a run of its own.

    remember(out, "mlflow", {"tracking_uri": uri, "experiment": "shortft", "run_id": run_id})
    values, own = recorded(out, "mlflow")   # own: the record is this folder's run
"""

from __future__ import annotations

import json
from pathlib import Path

from shortft.out_paths import write_whole
from shortft.progress import warn

FILE = "shortft_run.json"


def _read(folder: Path) -> dict:
    try:
        record = json.loads((folder / FILE).read_text())
    except (OSError, ValueError):  # none, or unreadable: a record is a convenience, never a reason to stop
        return {}
    return record if isinstance(record, dict) else {}


def recorded(output_dir: Path, part: str) -> tuple[dict, bool]:
    """The part of the record ({} if none), and whether it is this folder's own run: written for this
    folder, or for one that is no longer there (this folder moved)."""
    here = Path(output_dir).resolve()
    record = _read(here)
    values = record.get(part)
    if not isinstance(values, dict):
        return {}, False
    was = record.get("folder")
    return values, isinstance(was, str) and (was == str(here) or not Path(was).exists())


def remember(output_dir: Path, part: str, values: dict) -> None:
    """Writes (atomically) one part of the record, and this folder as the one it is for."""
    here = Path(output_dir).resolve()
    record = _read(here)
    record.update({part: values, "folder": str(here)})
    try:
        here.mkdir(parents=True, exist_ok=True)
        write_whole(here / FILE, json.dumps(record, indent=1))
    except OSError as e:  # a convenience: the run goes on (and its own writes say what is wrong there)
        warn(f"shortft: {here / FILE} not written ({e.strerror or e}): a resume from another folder or after a "
             "move will not find this run's MLflow store and run")
