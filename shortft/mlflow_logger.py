"""The per-step MLflow logger of a training run (rank 0): metrics, sample grids, the final LoRA and config,
into a run made before (`tracking.ensure_run`, `run_store.open_run`). Steps already logged are not logged
twice, unless the run took another line of steps (`shortft.rewound`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from shortft.evaluate import scalars
from shortft.loop import Callback, TrainResult
from shortft.metrics_file import read_metrics
from shortft.machine import run_tags
from shortft.mlflow_client import fail_fast
from shortft.progress import warn
from shortft.tracking import client

REWOUND_TAG = "shortft.rewound"  # a run resumed from a checkpoint before its last logged step
# The best evaluation so far, beside each evaluation: the UI's runs table shows a metric's last value, and a
# sweep ranks its trials by their best (a trial that peaked early looked worse there than in results.md).
BEST = "eval/objective_best"
REPLAYED = ("loss", "lr", "eval/objective")  # what a step run again compares with its logged values


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
        self.best: float | None = None

    def on_start(self, models, start_step: int) -> None:
        if self.rank:
            return
        fail_fast()  # a dead server costs seconds per call; the queue retries later
        if self.relay:  # under Ray: the calls go through the actor next to the driver (see mlflow_relay)
            from shortft.mlflow_relay import RelayClient

            self.client = RelayClient(self.relay)
        else:
            self.client = client(self.uri)
        self.logged_up_to, self.logged, self.start = 0, {}, start_step
        # the steps before this start, read once: for the best so far (a resumed run's earlier evaluations) and
        # for the steps written but not logged (below)
        before = [row for row in (read_metrics(self.metrics_file) if self.metrics_file is not None else [])
                  if row.get("step", 0) <= start_step]
        for row in before:
            self._note_best(row)
        try:
            # After a restart the steps since the last checkpoint run again; they were logged already.
            self.logged = {key: {m.step: m.value for m in self.client.get_metric_history(self.run_id, key)}
                           for key in REPLAYED}
            self.logged_up_to = max(self.logged["loss"], default=0)
        except Exception as e:  # the server away: take the steps to the checkpoint as logged (else the replay
            self._failed(e)      # below logged the whole of metrics.jsonl a second time)
            self.logged_up_to = start_step
        self._log("update_run", self.run_id, status="RUNNING")
        from mlflow.entities import RunTag

        # what this part of the run ran on (a resumed run's tags are its last part's)
        tags = run_tags(getattr(models, "device", None))
        self._log("log_batch", self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        # A process that died after writing a step to metrics.jsonl but before logging it: the resumed run
        # starts after that step and would never log it.
        for row in before:
            if row.get("step", 0) > self.logged_up_to:
                self.on_step(row["step"], row, {})

    def on_step(self, step: int, metrics: dict, artifacts: dict) -> None:
        best = self._note_best(metrics) if not self.rank else None
        if self.rank or step <= self.logged_up_to and not self._another_line(step, metrics):
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = {**scalars(metrics), **({BEST: best} if best is not None else {})}
        self._log("log_batch", self.run_id, metrics=[Metric(k, float(v), now, step)
                                                      for k, v in values.items() if k != "step"])
        if "grid" in artifacts:
            self._log("log_artifact", self.run_id, str(artifacts["grid"]), "samples")

    def _note_best(self, metrics: dict) -> float | None:
        """The best `eval/objective` so far where `metrics` holds one (a finite one), else None."""
        value = metrics.get("eval/objective")
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        self.best = value if self.best is None else max(self.best, value)
        return self.best

    def _another_line(self, step: int, metrics: dict) -> bool:
        """A step run again whose loss, learning rate or evaluation is not the one logged (an exact resume gives
        the same): the run resumed from an earlier checkpoint with other settings, another line of steps. From
        it on every step is logged (MLflow then holds a value of each line at those steps, this line's the
        later) and the run says so in the tag `shortft.rewound`; before, MLflow kept the abandoned line's
        values. (The loss alone missed a new train.lr or eval setting: a step's loss is computed before its
        update, so the first step run again had the logged loss, and an evaluation changes no loss.)"""
        differs = [key for key in REPLAYED if step in self.logged.get(key, {}) and key in metrics
                   and not math.isclose(self.logged[key][step], float(metrics[key]), rel_tol=1e-9)]
        if not differs:
            return False
        self._log("set_tag", self.run_id, REWOUND_TAG, (
            f"resumed at step {self.start} after step {self.logged_up_to} was logged, and from step {step} its values "
            f"are not those logged: steps {step}-{self.logged_up_to} have a value of each line, this line's the later "
            "(metrics.jsonl holds it alone)"))
        self.logged_up_to = step - 1
        return True

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
