"""MLflow: runs created in the driver (SQLite has one writer), logged to from the training process.

The tracking URI comes from `--tracking-uri`, else $MLFLOW_TRACKING_URI, else `sqlite:///mlflow.db` in
the working directory. A run is found again by its deterministic run key (tag `shortft.run_key`), so a
restarted job logs into the run it started, and steps already logged are not logged twice.
"""

from __future__ import annotations

import os
import re
import time
import urllib.request
from pathlib import Path

from shortft.config import Config, ConfigError, flatten, to_dict
from shortft.credentials import CREDENTIAL_ENV, credentials_env, split_credentials, take_credentials  # noqa: F401
from shortft.evaluate import scalars
from shortft.loop import Callback, TrainResult, read_metrics
from shortft.machine import run_tags
from shortft.mlflow_client import SQLITE, fail_fast, open_client, sqlite_path
from shortft.progress import warn

RUN_KEY = "shortft.run_key"
CHANGED_TAG = "shortft.settings_changed"  # a resumed run's settings that are not its params (`note_changed_params`)
DEFAULT_EXPERIMENT = "shortft"


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
    if (path := sqlite_path(uri)) is not None:
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise ConfigError(f"tracking URI {uri}: directory {parent} does not exist or is not writable; "
                              "pass --tracking-uri sqlite:///<writable dir>/mlflow.db or an http(s):// server")
        # MLflow retried a folder (an old ./mlruns file store) or another kind of file for 100 s, then raised
        kind = "a folder" if path.is_dir() else "not an SQLite database" if not _sqlite_or_empty(path) else None
        if kind:
            raise ConfigError(f"tracking URI {uri}: {path} is {kind}; pass --tracking-uri sqlite:///<a new or "
                              "SQLite file>, e.g. sqlite:///mlflow.db (MLflow 3.17+ no longer reads a ./mlruns file store)")
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
                raise ConfigError(f"tracking URI {uri}: MLflow server unreachable ({type(e).__name__}: {e}); "
                                  "start it (mlflow server ...) or pass another --tracking-uri") from None
    elif uri.startswith(("databricks", "postgresql", "mysql", "mssql")):
        return
    else:
        raise ConfigError(f"tracking URI {uri!r}: use sqlite:///path/mlflow.db or http(s)://host:port "
                          "(MLflow 3.17+ no longer reads a ./mlruns file store)")


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
    log_dict_params(uri, run_id, flatten(to_dict(cfg)))


def param_values(values: dict) -> dict[str, str]:
    """Params as MLflow keeps them: strings, cut at its 6000 characters."""
    return {k: str(v)[:6000] for k, v in values.items()}


def note_changed_params(uri: str, run_id: str, cfg: Config) -> list[str]:
    """A resumed run's settings that differ from its params (MLflow never changes a param: they stay the
    settings it started with), as the tag `shortft.settings_changed` ('train.lr: 0.001 -> 0.003; ...'),
    dropped where none differ; the differences returned."""
    mlflow_client = client(uri)
    run = mlflow_client.get_run(run_id)
    was, now = run.data.params, param_values(flatten(to_dict(cfg)))
    changed = [f"{k}: {was.get(k, '(none)')} -> {now.get(k, '(none)')}" for k in dict.fromkeys([*was, *now])
               if was.get(k) != now.get(k)]
    if changed:
        mlflow_client.set_tag(run_id, CHANGED_TAG, "; ".join(changed)[:5000])
    elif CHANGED_TAG in run.data.tags:
        mlflow_client.delete_tag(run_id, CHANGED_TAG)
    return changed


def log_dict_params(uri: str, run_id: str, values: dict) -> None:
    from mlflow.entities import Param

    params = [Param(k, v) for k, v in param_values(values).items()]
    mlflow_client = client(uri)
    for i in range(0, len(params), 100):
        mlflow_client.log_batch(run_id, params=params[i:i + 100])


def ensure_trial_run(uri: str, experiment: str, name: str, cfg: Config, parent_run_id: str | None) -> str:
    """A sweep trial's nested run, keyed by its name under its parent (an earlier sweep of the same name
    keeps its trials' runs: one was taken over, or deleted as stale). If a resumed sweep gives that trial
    other values than the run already holds (the crash came before the sweep state was saved), the stale,
    unfinished run is deleted and a fresh one made, so every trial has exactly one run with its real params."""
    key = f"{parent_run_id}/{name}" if parent_run_id else name
    run_id = ensure_run(uri, experiment, key, name, cfg, parent_run_id)
    logged = client(uri).get_run(run_id).data.params
    wanted = param_values(flatten(to_dict(cfg)))
    if any(logged.get(k) != v for k, v in wanted.items()):
        client(uri).delete_run(run_id)
        run_id = ensure_run(uri, experiment, key, name, cfg, parent_run_id, reuse=False)
    return run_id


class MlflowLogger(Callback):
    """Per-step metrics, eval grids, the final LoRA and config, into an existing run (rank 0 only).

    Tracking never stops training: a call that fails (server gone, store locked) is kept in a bounded
    queue (`MAX_PENDING` metric values; the oldest are dropped past that), retried at most every
    `RETRY_S` seconds in order, and once more at the end; what is still unlogged then is named in one
    line on stderr. metrics.jsonl, the checkpoints and the run folder hold all of it either way."""

    MAX_PENDING = 100_000
    RETRY_S = 30.0

    def __init__(self, uri: str, run_id: str, rank: int = 0, relay: str | None = None,
                 metrics_file: Path | None = None):
        self.uri, self.run_id, self.rank, self.relay = uri, run_id, rank, relay
        self.metrics_file = metrics_file  # the run's metrics.jsonl: steps a restart skips are logged from it
        self.pending: list[tuple] = []  # (method, args) in order
        self.dropped, self.failed_at, self.error = 0, 0.0, ""

    def on_start(self, models, start_step: int) -> None:
        if self.rank:
            return
        fail_fast()  # a dead server costs seconds per call; the queue retries later
        if self.relay:  # under Ray: the calls go through the actor next to the driver (see mlflow_relay)
            from shortft.mlflow_relay import RelayClient

            self.client = RelayClient(self.relay)
        else:
            self.client = client(self.uri)
        self.logged_up_to = 0
        try:
            history = self.client.get_metric_history(self.run_id, "loss")
            # After a restart the steps since the last checkpoint run again; they were logged already.
            self.logged_up_to = max((m.step for m in history), default=0)
        except Exception as e:
            self._failed(e)
        self._log("update_run", self.run_id, status="RUNNING")
        from mlflow.entities import RunTag

        # what this part of the run ran on (a resumed run's tags are its last part's)
        tags = run_tags(getattr(models, "device", None))
        self._log("log_batch", self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        if self.metrics_file is not None and start_step > self.logged_up_to:
            # A process that died after writing a step to metrics.jsonl but before logging it: the
            # resumed run starts after that step and would never log it.
            for row in read_metrics(self.metrics_file):
                if self.logged_up_to < row.get("step", 0) <= start_step:
                    self.on_step(row["step"], row, {})

    def on_step(self, step: int, metrics: dict, artifacts: dict) -> None:
        if self.rank or step <= self.logged_up_to:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._log("log_batch", self.run_id, metrics=[Metric(k, float(v), now, step)
                                                      for k, v in scalars(metrics).items() if k != "step"])
        if "grid" in artifacts:
            self._log("log_artifact", self.run_id, str(artifacts["grid"]), "samples")

    def on_end(self, result: TrainResult) -> None:
        if self.rank:
            return
        self.failed_at = 0.0  # one more try for everything queued
        self._log("log_artifacts", self.run_id, str(result.lora_dir), "lora")
        self._log("log_artifact", self.run_id, str(result.output_dir / "config.yaml"))
        self._log("set_terminated", self.run_id, "FINISHED")
        if self.pending or self.dropped:
            values = self.dropped + sum(len(kw.get("metrics", [])) for _, _, kw in self.pending)
            files = sum(1 for method, _, _ in self.pending if method.startswith("log_artifact"))
            warn(f"shortft: mlflow: {values} metric values and {files} artifact upload(s) of run {self.run_id} "
                 f"were not logged to {self.uri} ({self.error}); all of it is in {result.output_dir}")

    def _log(self, method: str, *args, **kwargs) -> None:
        self.pending.append((method, args, kwargs))
        if self.failed_at and time.time() - self.failed_at < self.RETRY_S:
            self._bound()
            return
        while self.pending:
            method, args, kwargs = self.pending[0]
            try:
                getattr(self.client, method)(*args, **kwargs)
            except Exception as e:
                self._failed(e)
                self._bound()
                return
            self.pending.pop(0)
        self.failed_at = 0.0

    def _failed(self, error: Exception) -> None:
        self.failed_at = time.time()
        self.error = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}"

    def _bound(self) -> None:
        while sum(len(kw.get("metrics", [])) for _, _, kw in self.pending) > self.MAX_PENDING:
            i = next(i for i, (m, _, _) in enumerate(self.pending) if m == "log_batch")
            self.dropped += len(self.pending.pop(i)[2]["metrics"])
