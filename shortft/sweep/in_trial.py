"""A one-worker trial runs the training loop in the Tune trial's own process and reports to Tune.

A Ray Train job around one worker starts four more processes per trial (controller, placement-group
cleaner, synchronization actor, the worker) and the report queue between them: about half a minute of
start-up per trial on a small machine, and a background share of a core during the steps. With one
worker there is nothing to synchronise, so the trial asks Tune for the worker's own resources
(`trials.trial_resources`) and trains here. Tune gets the evaluation steps, with the checkpoint
written at that step; a restarted trial resumes from the newer of Tune's latest checkpoint and the
latest one the loop wrote under the run's folder (checkpoints between evaluations are only there).
A checkpoint handed to Tune carries the metrics it was reported with (`reported.json`), so a trial
restarted at its very end on a node without its run folder can still give Tune its last result.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from shortft import checkpoint
from shortft.config import Config, TrainConfig
from shortft.loop import train
from shortft.metrics_file import read_metrics
from shortft.mlflow_logger import MlflowLogger
from shortft.mlflow_relay import start_relay
from shortft.ray_reports import FAULT_MARKER, FaultInjector, RayReport, fault_request, readable
from shortft.sweep.eval_report import OBJECTIVE

REPORTED = "reported.json"  # in a checkpoint handed to Tune: the metrics it was reported with


class TuneReport(RayReport):
    """The steps that carry an evaluation go to Tune (Tune wants the objective in every result), with
    the checkpoint written at that step, the mean seconds per step and the peak memory so far; the
    last step's once the run has ended (see `RayReport`: Tune kills a stopped trial's process)."""

    def __init__(self, train: TrainConfig, metrics_file: Path, resumed_from: Path | None = None):
        super().__init__(0, train=train)
        self.metrics_file, self.resumed_from, self.resend = metrics_file, resumed_from, None

    def on_start(self, models, start_step: int) -> None:
        # A resumed trial counts the steps before its checkpoint in its means, and one resumed at its very
        # end (it died after its last checkpoint, before its last report) still owes Tune that report.
        rows = read_metrics(self.metrics_file) if start_step else []
        for row in rows:
            self._count(row)
        if rows:
            self.pending = (rows[-1]["step"], rows[-1], None)
        elif start_step and self.resumed_from is not None and (self.resumed_from / REPORTED).is_file():
            # Restarted on another node from a checkpoint Tune already had: no metrics.jsonl here, but the
            # checkpoint has the result it was reported with; it is sent again if no step follows it.
            self.resend = json.loads((self.resumed_from / REPORTED).read_text())

    def on_end(self, result) -> None:
        if self.resend is not None and self.pending is None:
            self._send(self.resend["step"], self.resend, None)
        else:
            super().on_end(result)

    def _due(self, step: int, metrics: dict) -> bool:
        return OBJECTIVE in metrics and not self._last(metrics)

    def _due_at_end(self, metrics: dict) -> bool:
        return OBJECTIVE in metrics

    def _send(self, step: int, metrics: dict, ckpt: Path | None) -> None:
        from ray import tune

        if ckpt is not None:  # before Tune copies the folder; written whole or not at all
            (ckpt / f".{REPORTED}").write_text(json.dumps(metrics))
            (ckpt / f".{REPORTED}").replace(ckpt / REPORTED)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(ckpt)) if ckpt else None)


def _fallback(cfg: Config, start: Path) -> checkpoint.Fallback:
    """`start`, or if unreadable the newest readable checkpoint before it: in the run folder (Tune's copy,
    named checkpoint_NNNNNN, has no step_NNNNNN beside it)."""
    own = checkpoint.list_checkpoints(cfg.output_dir / "checkpoints")
    return checkpoint.Fallback(start, tuple(p for p in own if p != start and _step_of(p) < _step_of(start)))


def _step_of(path: Path | None) -> int:
    """A checkpoint's step; -1 for none or one whose state.json is unreadable (the other one wins)."""
    try:
        return checkpoint.read_state(path)["step"] if path is not None else -1
    except checkpoint.Unreadable:
        return -1


def resume_point(cfg: Config, scratch: Path) -> Path | None:
    """The newer of Tune's latest checkpoint of this trial (copied into `scratch` from remote storage) and
    the latest one under the run's folder; None for a trial that starts afresh."""
    from ray import tune

    local = checkpoint.latest(cfg.output_dir / "checkpoints")
    reported = tune.get_checkpoint()
    if reported is not None:
        tunes = readable(reported, scratch)
        if _step_of(tunes) > _step_of(local):
            return tunes
    return local


def train_in_trial(cfg: Config, sweep: dict, run_id: str | None) -> None:
    """Train `cfg` in this Tune trial (one worker: the CPU threads or the GPU Tune gave the trial)."""
    import torch

    if sweep["use_gpu"]:
        cfg.model.device = "cuda"  # Tune made the trial's GPU the only one this process sees
    else:
        torch.set_num_threads(max(1, sweep["threads"] or int(sweep["cpus_per_worker"] or 1)))
    scratch = Path(tempfile.mkdtemp(prefix="shortft-resume-"))
    try:
        start = resume_point(cfg, scratch)
        # MLflow first: a report to Tune can be the trial's last act (ASHA stops it there), so what a step
        # logs is logged before that step is reported.
        uri = sweep["tracking_uri"]
        metrics_file = cfg.output_dir / "metrics.jsonl"
        callbacks = [MlflowLogger(uri, run_id, 0, start_relay(uri), metrics_file)] if uri and run_id else []
        callbacks.append(TuneReport(cfg.train, metrics_file, start))
        fail_at, fail_rank = fault_request()  # tests: the trial's process dies once at that step
        if fail_at:
            callbacks.append(FaultInjector(0, fail_at, fail_rank, cfg.output_dir / FAULT_MARKER))
        train(cfg, callbacks, resume=_fallback(cfg, start) if start is not None else False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
