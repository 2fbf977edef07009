"""Where a `shortft train` run logs to MLflow, kept in its folder (`run_record`: the store's URI, with no
credentials, the experiment and the run's id), so that `--resume` logs into that same run from any working
folder, and after the run's folder moved.

Without it, the store was `./mlflow.db` of whichever folder the resume ran in (the run's history split over
two stores), and a moved folder became a second MLflow run (runs are found by the folder's absolute path).
Sweeps keep their store in their own record (`sweep/saved.py`).

    uri, experiment, note = run_store.settle(cfg.output_dir, args.tracking_uri, args.experiment, resume=True)
    run_id = run_store.open_run(uri, experiment, key, name, cfg)   # the recorded run, or ensure_run's
    run_store.remember(cfg.output_dir, uri, experiment, run_id)
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

from shortft import run_record, tracking
from shortft.config import Config, ConfigError
from shortft.credentials import has_secret
from shortft.mlflow_client import sqlite_path

PART = "mlflow"
WORKERS_TAG = "shortft.workers"  # a `--workers N` run's N


def remember(output_dir: Path, uri: str, experiment: str, run_id: str) -> None:
    """A URI with credentials in it (a database's `user:password@`; an http(s) URI's are moved out before
    this) is not written down: a resume takes the store from the environment or `--tracking-uri` again."""
    run_record.remember(output_dir, PART, {"tracking_uri": None if has_secret(uri) else uri, "experiment": experiment,
                                           "run_id": run_id})


def settle(output_dir: Path, given_uri: str | None, given_experiment: str | None,
           resume: bool) -> tuple[str, str, str | None]:
    """The store and experiment a run logs to, and a note for the user when a resume takes the run's own
    instead of this folder's default. Given ones (`--tracking-uri`, `--experiment`) always win."""
    record = run_record.recorded(output_dir, PART)[0] if resume else {}
    experiment = given_experiment or record.get("experiment") or tracking.DEFAULT_EXPERIMENT
    kept, default = record.get("tracking_uri"), given_uri or tracking.default_tracking_uri()
    if given_uri or not isinstance(kept, str):
        return tracking.resolve_uri(default), experiment, None
    path = sqlite_path(kept)
    if path is not None and not path.is_file():
        here = tracking.resolve_uri(default)
        return here, experiment, (f"the run's MLflow store {kept} is not on this machine (moved?); logging to "
                                  f"{here} (--tracking-uri to name the store)")
    if kept == tracking.absolute_uri(tracking.split_credentials(default)[0]):  # with the credentials it holds
        return tracking.resolve_uri(default), experiment, None
    sent = sorted(tracking.credentials_env())
    if sent and urllib.parse.urlsplit(kept).scheme.split("+")[0] in ("http", "https", "postgresql"):
        # MLflow and libpq send them to whatever store the URI names: not to one a run folder (maybe
        # another's, on shared storage) names
        raise ConfigError(f"the run's MLflow store {kept} (recorded in its folder) is not this environment's "
                          f"({tracking.split_credentials(default)[0]}), and {', '.join(sent)} would be sent to it; "
                          f"pass --tracking-uri {kept} to log there, or --tracking-uri with the store to log to")
    # The run's own store, checked alone: this folder's default is not asked (a folder this process cannot
    # write, a $MLFLOW_TRACKING_URI server that is down would refuse a resume that never logs there).
    return tracking.resolve_uri(kept), experiment, (f"logging to the run's MLflow store {kept}, where it started "
                                                    "(--tracking-uri to log elsewhere)")


def open_run(uri: str, experiment: str, key: str, name: str, cfg: Config, reuse: bool = True,
             workers: int = 0) -> str:
    """The run to log to (`_open_run`); a `--workers N` run's tagged `shortft.workers` N: its params are a
    one-process run's, with `train.batch_size` each worker's (the global batch is N times it)."""
    run_id = _open_run(uri, experiment, key, name, cfg, reuse)
    if workers:
        tracking.set_tag(uri, run_id, WORKERS_TAG, str(workers))
    return run_id


def _open_run(uri: str, experiment: str, key: str, name: str, cfg: Config, reuse: bool) -> str:
    """The one the run folder recorded, where it is this folder's own run (`run_record`) of this experiment
    and is in this store (a run id is unique: a store moved with its runs has it), its key then set to this
    folder's (it may have moved); else the run with this key, or a new one. A resumed run whose settings are
    not its params gets them named in a tag (`tracking.note_changed_params`)."""
    record, own = run_record.recorded(cfg.output_dir, PART) if reuse else ({}, False)
    run_id = record.get("run_id")
    if own and isinstance(run_id, str) and record.get("experiment") == experiment:
        client = tracking.client(uri)
        try:
            run = client.get_run(run_id)
        except Exception:  # no longer in the store (deleted, or another store now at that path)
            run = None
        if run is not None and run.info.lifecycle_stage == "active" \
                and run.info.experiment_id == tracking.experiment_id(uri, experiment):
            if run.data.tags.get(tracking.RUN_KEY) != key:
                client.set_tag(run_id, tracking.RUN_KEY, key)
            tracking.note_changed_params(uri, run_id, cfg)  # a resume's settings that are not the params
            return run_id
    run_id = tracking.ensure_run(uri, experiment, key, name, cfg, reuse=reuse)
    tracking.note_changed_params(uri, run_id, cfg)
    return run_id
