"""MLflow: runs created in the driver (SQLite has one writer), logged to from the training process.

The tracking URI comes from `--tracking-uri`, else $MLFLOW_TRACKING_URI, else `sqlite:///mlflow.db` in
the working directory. A run is found again by its deterministic run key (tag `shortft.run_key`), so a
restarted job logs into the run it started, and steps already logged are not logged twice.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import urllib.request
from pathlib import Path

from shortft.captured import captured_warnings
from shortft.config import Config, ConfigError, alpha_as_used, flatten, to_dict
from shortft.credentials import (  # noqa: F401
    CREDENTIAL_ENV, credentials_env, redacted, split_credentials, take_credentials)
from shortft.mlflow_client import SQLITE, open_client, sqlite_path

RUN_KEY = "shortft.run_key"
CHANGED_TAG = "shortft.settings_changed"  # a resumed run's settings that are not its params (`note_changed_params`)
DEFAULT_EXPERIMENT = "shortft"
# A trial's run made by the trial itself (a plain tune.run or Tuner) is found by the driver through these:
# Tune's trial id (8 hex digits, or 5 and an index) and its experiment's folder name, which tells apart
# equal ids of two experiments.
TUNE_TRIAL_TAG, TUNE_EXPERIMENT_TAG = "shortft.tune_trial_id", "shortft.tune_experiment"


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def absolute_uri(uri: str) -> str:
    """sqlite:///mlflow.db names a file relative to the working directory, which differs in Ray's
    workers and trials: pin it to an absolute path before handing it to them."""
    path = sqlite_path(uri)
    return SQLITE + str(path.resolve()) if path is not None and not uri.startswith(SQLITE + "/") else uri


# A server that takes the connection but answers slowly (a loaded head node: seen at over 5 s in CI) is
# waited for this long; one that refuses it fails at once.
HEALTH_WAIT_S = 60.0


def resolve_uri(uri: str) -> str:
    """The URI every other part of the project gets: credentials moved to the environment, checked
    (one line if unusable), a relative sqlite path made absolute."""
    uri = take_credentials(uri)
    check_tracking_uri(uri)
    return absolute_uri(uri)


def check_tracking_uri(uri: str) -> None:
    """Fail fast, with one line, when runs could not be logged."""
    env = os.environ.get("MLFLOW_TRACKING_URI")  # "pass another --tracking-uri" of one never passed; credentials
    with contextlib.suppress(ConfigError):  # moved out of it (a server's) or not
        env = env and split_credentials(env)[0]
    from_env = bool(env) and uri == env
    source = " (from $MLFLOW_TRACKING_URI)" if from_env else ""
    shown = redacted(uri) + source  # a database's password stays in its URI: not in the line
    other = "set MLFLOW_TRACKING_URI to another or pass --tracking-uri" if from_env else "pass another --tracking-uri"
    if (path := sqlite_path(uri)) is not None:
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise ConfigError(f"tracking URI {shown}: directory {parent} does not exist or is not writable; "
                              f"{other}: sqlite:///<writable dir>/mlflow.db or an http(s):// server")
        # MLflow retried a folder (an old ./mlruns file store) or another kind of file for 100 s, then raised
        kind = "a folder" if path.is_dir() else "not an SQLite database" if not _sqlite_or_empty(path) else None
        if kind:
            raise ConfigError(f"tracking URI {shown}: {path} is {kind}; {other}: sqlite:///<a new or SQLite file>, "
                              "e.g. sqlite:///mlflow.db (MLflow 3.17+ no longer reads a ./mlruns file store)")
    elif uri.startswith(("http://", "https://")):
        deadline = time.time() + HEALTH_WAIT_S
        while True:
            try:
                urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
                return
            except Exception as e:  # any failure means: unreachable from here
                slow = isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError)
                if slow and time.time() < deadline:  # it answers the connection, slowly: a loaded head node
                    continue
                raise ConfigError(f"tracking URI {shown}: MLflow server unreachable ({type(e).__name__}: {e}); "
                                  f"start it (mlflow server ...) or {other}") from None
    elif uri.startswith(("databricks", "postgresql", "mysql", "mssql")):
        # asked once: a database driver not installed, or Databricks credentials not set, was a traceback at
        # the first MLflow call
        import mlflow  # noqa: F401 - first: importing it sets its loggers' handlers

        try:
            # Databricks' own warning line before ours; a database's "retrying" lines say why it waits
            with captured_warnings("mlflow") if uri.startswith("databricks") else contextlib.nullcontext():
                open_client(uri).search_experiments(max_results=1)
        except Exception as e:
            why = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise ConfigError(f"tracking URI {shown}: MLflow cannot use it ({type(e).__name__}: {why}); "
                              f"{'install the driver it names, ' if isinstance(e, ImportError) else ''}fix its "
                              f"settings or {other}") from None
    else:
        raise ConfigError(f"tracking URI {redacted(uri)!r}{source}: use sqlite:///path/mlflow.db or http(s)://host:port "
                          "(MLflow 3.17+ no longer reads a ./mlruns file store)")


def ui_line(uri: str) -> str:
    """Where to compare the runs of the store `uri`: a server's own UI, else `mlflow ui` on it. A database's
    password (it stays in its URI: `take_credentials`) is shown as `***`: the line goes to stdout and logs."""
    uri = redacted(uri)
    if uri.startswith(("http://", "https://")):
        return (f"compare the runs: the MLflow UI at {uri} (from your machine, on a cluster: ray attach <cluster yaml> "
                "-p 5000, or kubectl port-forward)")
    return f"compare the runs: mlflow ui --backend-store-uri {uri}"


def _sqlite_or_empty(path: Path) -> bool:
    """Absent, empty (SQLite makes its database there) or an SQLite database by its header."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:  # absent (SQLite makes it), or unreadable: MLflow's own error says why
        return True
    return not head or head == b"SQLite format 3\x00"


def client(uri: str):
    return open_client(uri)


# MLflow 3's UI opens an experiment by its kind: without this tag it may land on the GenAI overview
# instead of the runs table with the searched params and the objective.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def artifact_location(uri: str, name: str) -> str | None:
    """Where a new experiment's artifacts go: for a SQLite store, mlruns/<name> next to the store file.
    MLflow's own default is ./mlruns of the working directory of whichever process creates the
    experiment (a run started from the checkout against sqlite:////data/mlflow.db wrote its LoRA and
    samples into the checkout; a Ray worker's working directory is a temporary folder). A server
    decides for itself (None)."""
    path = sqlite_path(uri)
    if path is None:
        return None
    return str(path.resolve().parent / "mlruns" / (re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip(".") or "_"))


def experiment_id(uri: str, name: str) -> str:
    """The experiment's id (created if new), marked as a model-training experiment."""
    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None:
        from mlflow.exceptions import MlflowException

        try:
            return mlflow_client.create_experiment(name, artifact_location=artifact_location(uri, name),
                                                   tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException as e:  # another run or sweep created it since (two started at once)
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = mlflow_client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":  # deleted in the UI: MLflow refuses runs in it, in a traceback
        shown = split_credentials(uri)[0]
        raise ConfigError(f"MLflow experiment {name!r} in {shown} was deleted; restore it (MLFLOW_TRACKING_URI="
                          f"{shown} mlflow experiments restore -x {experiment.experiment_id}) or pass another "
                          "--experiment")
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        mlflow_client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def replace_artifacts(client, run_id: str, local_dir: Path | None, artifact_path: str) -> bool | None:
    """The run's `artifact_path` made `local_dir`'s files, or emptied where `local_dir` is None. MLflow's
    log_artifacts adds and overwrites but never removes: the files of an earlier end (a sweep resumed to a
    new best) stayed beside or instead of the new ones. True where none are left; False where the store
    could not delete them (not every artifact store can) and some are; None where it cannot list them
    (a credential that may write but not list): logged over, as before."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        held = client.list_artifacts(run_id, artifact_path)
    except Exception:  # noqa: BLE001 - whatever a store says to a listing it refuses
        held, cleared = [], None
    else:
        cleared = True
    if held:
        try:
            get_artifact_repository(client.get_run(run_id).info.artifact_uri,
                                    client.tracking_uri).delete_artifacts(artifact_path)
        except Exception:  # noqa: BLE001 - NotImplementedError, a refused DELETE: the files stay, said by False
            pass
        try:
            cleared = not client.list_artifacts(run_id, artifact_path)
        except Exception:  # noqa: BLE001
            cleared = None
    if local_dir is not None:
        client.log_artifacts(run_id, str(local_dir), artifact_path)
    return cleared


def ensure_run(uri: str, experiment: str, run_key: str, run_name: str, cfg: Config | None = None,
               parent_run_id: str | None = None, tags: dict | None = None, reuse: bool = True) -> str:
    """The newest run with this key (created if none, or if reuse=False, with the config's params)."""
    mlflow_client = client(uri)
    exp_id = experiment_id(uri, experiment)
    found = mlflow_client.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY}` = '{run_key}'", max_results=1,
                          order_by=["attributes.start_time DESC"]) if reuse else []
    if found:
        return found[0].info.run_id
    all_tags = {RUN_KEY: run_key, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow_client.create_run(exp_id, run_name=run_name, tags=all_tags)
    if cfg is not None:
        log_params(uri, run.info.run_id, cfg)
    return run.info.run_id


def set_tag(uri: str, run_id: str, key: str, value: str) -> None:
    client(uri).set_tag(run_id, key, value)


def log_params(uri: str, run_id: str, cfg: Config) -> None:
    log_dict_params(uri, run_id, run_params(cfg))


def run_params(cfg: Config) -> dict:
    """A run's settings as its params: an unset `lora.alpha` as the rank that scales the LoRAs ('None' beside
    the sampled alphas of a sweep's trials in MLflow's compare view)."""
    return alpha_as_used(flatten(to_dict(cfg)))


def logged_params(run) -> dict[str, str]:
    """A run's params as `run_params` gives them now: an unset alpha logged as 'None' (before 2026-12-08) is rank."""
    params = dict(run.data.params)
    if params.get("lora.alpha") == "None":
        params["lora.alpha"] = None
    return param_values(alpha_as_used(params))


def param_values(values: dict) -> dict[str, str]:
    """Params as MLflow keeps them: strings, cut at its 6000 characters."""
    return {k: str(v)[:6000] for k, v in values.items()}


def note_changed_params(uri: str, run_id: str, cfg: Config) -> None:
    """A resumed run's settings that differ from its params (MLflow never changes a param: they stay the
    settings it started with), as the tag `shortft.settings_changed` ('train.lr: 0.001 -> 0.003; ...'),
    dropped where none differ."""
    mlflow_client = client(uri)
    run = mlflow_client.get_run(run_id)
    was, now = logged_params(run), param_values(run_params(cfg))
    changed = [f"{k}: {was.get(k, '(none)')} -> {now.get(k, '(none)')}" for k in dict.fromkeys([*was, *now])
               if was.get(k) != now.get(k)]
    if changed:
        mlflow_client.set_tag(run_id, CHANGED_TAG, "; ".join(changed)[:5000])
    elif CHANGED_TAG in run.data.tags:
        mlflow_client.delete_tag(run_id, CHANGED_TAG)


def log_dict_params(uri: str, run_id: str, values: dict) -> None:
    from mlflow.entities import Param

    params = [Param(k, v) for k, v in param_values(values).items()]
    mlflow_client = client(uri)
    for i in range(0, len(params), 100):
        mlflow_client.log_batch(run_id, params=params[i:i + 100])


def ensure_trial_run(uri: str, experiment: str, name: str, cfg: Config, parent_run_id: str | None,
                     tune_trial: tuple[str, str] | None = None) -> str:
    """A sweep trial's nested run, keyed by its name under its parent (an earlier sweep of the same name
    keeps its trials' runs: one was taken over, or deleted as stale). If a resumed sweep gives that trial
    other values than the run already holds (the crash came before the sweep state was saved), the stale,
    unfinished run is deleted and a fresh one made, so every trial has exactly one run with its real params.
    `tune_trial`: (Tune's experiment folder name, trial id), tagged so that `tune_trial_run` finds it."""
    key = f"{parent_run_id}/{name}" if parent_run_id else name
    run_id = ensure_run(uri, experiment, key, name, cfg, parent_run_id)
    logged = logged_params(client(uri).get_run(run_id))
    wanted = param_values(run_params(cfg))
    if any(logged.get(k) != v for k, v in wanted.items()):
        client(uri).delete_run(run_id)
        run_id = ensure_run(uri, experiment, key, name, cfg, parent_run_id, reuse=False)
    for tag, value in zip((TUNE_EXPERIMENT_TAG, TUNE_TRIAL_TAG), tune_trial or ()):  # a run found again too
        set_tag(uri, run_id, tag, value)
    return run_id


def tune_trial_run(uri: str, experiment_dir: str, trial_id: str) -> str | None:
    """The newest run `ensure_trial_run` tagged with this Tune trial, in any experiment; None if none."""
    mlflow_client = client(uri)
    ids, token = [], None
    while True:
        page = mlflow_client.search_experiments(page_token=token)
        ids += [e.experiment_id for e in page]
        token = page.token
        if not token:
            break
    runs = mlflow_client.search_runs(ids, filter_string=f"tags.`{TUNE_TRIAL_TAG}` = '{trial_id}'",  # Tune's: hex
                                     order_by=["attributes.start_time DESC"]) if ids else []
    return next((r.info.run_id for r in runs if r.data.tags.get(TUNE_EXPERIMENT_TAG) == experiment_dir), None)
