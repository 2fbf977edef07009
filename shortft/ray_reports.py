"""Loop callbacks that hand a run's progress to Ray: `RayReport` (to Ray Train, from each worker; the
sweep's one-worker trials subclass it to report to Tune) and `FaultInjector`, the test switch that
kills a worker once (`SHORTFT_FAIL_AT_STEP`, `SHORTFT_FAIL_RANK`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from shortft.budget import ends_run
from shortft.config import TrainConfig
from shortft.loop import Callback

FAIL_AT_STEP_ENV = "SHORTFT_FAIL_AT_STEP"  # test switch: one worker dies once at this step
FAIL_RANK_ENV = "SHORTFT_FAIL_RANK"
FAULT_MARKER = ".fault-injected"  # under the run's folder: the worker died there once
# With each checkpoint handed to Ray: the objective of that step's evaluation, NO_SCORE for a step without
# one. A sweep's trials keep their best-scored checkpoint by it (BEST_AND_LATEST; sweep/best.py takes the
# best trial's LoRAs from there); a report without the key would be filed after every scored one, as the
# best. Finite: Tune's TensorBoard logger prints "NaN or Inf found" for -inf.
CHECKPOINT_SCORE = "checkpoint_objective"
NO_SCORE = -sys.float_info.max
# Ray's CheckpointConfig of a sweep's trial: the best-scored checkpoint, and the latest (Ray keeps it
# whatever its score, for a restart): two at most.
BEST_AND_LATEST = {"num_to_keep": 1, "checkpoint_score_attribute": CHECKPOINT_SCORE, "checkpoint_score_order": "max"}


def readable(ckpt, scratch: Path) -> Path:
    """The folder of a Ray checkpoint to resume from: the checkpoint itself where this machine's
    filesystem holds it (a local or NFS storage path: the resume line and a refused resume name
    `<storage>/<run>/step_NNNNNN`, not a temporary copy), else a copy in `scratch` (s3://, gs://)."""
    import pyarrow.fs

    if isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem) and Path(ckpt.path).is_dir():
        return Path(ckpt.path)
    return Path(ckpt.to_directory(str(scratch)))


def fault_request() -> tuple[int, int]:
    """(step, rank) at which a worker should die once, from this process's environment; step 0 = never."""
    return int(os.environ.get(FAIL_AT_STEP_ENV, "0") or 0), int(os.environ.get(FAIL_RANK_ENV, "1"))


class RayReport(Callback):
    """Reports to Ray Train the steps something needs: every checkpoint step (rank 0 attaches its
    checkpoint, so a restarted group resumes from it), every evaluation step (the sweep forwards those to
    Tune), the step a stop request ends the run at, and the last step. Not the others: each report waits
    for the controller's next poll (0.2 s), a toll on every step that bought nothing (the metrics go to
    MLflow from rank 0 directly). Each report carries the mean seconds per step and the peak memory over
    every step since this worker started. Every rank reports the same steps (Ray Train needs that): the
    schedule depends on the step alone, and the ranks agree on a stop. With `train` (the run's settings),
    the run's last step is reported only once the run has ended (`on_end`: LoRA saved, and MLflow told
    by a logger placed before this callback): a sweep may stop the trial at that report (ASHA stops every
    trial that reaches `max_t`), which kills its processes.
    Subclasses change where reports go (`_send`) and which steps are due (`_due`)."""

    def __init__(self, rank: int, eval_every: int = 0, checkpoint_every: int = 0, train: TrainConfig | None = None):
        import ray

        self.rank, self.every, self.train = rank, [n for n in (eval_every, checkpoint_every) if n > 0], train
        self.node_id = ray.get_runtime_context().get_node_id()  # where rank 0 ran: shown in sweep results
        self.seconds, self.steps, self.peak, self.reported, self.pending = 0.0, 0, 0.0, 0, None

    def on_step(self, step: int, metrics: dict, artifacts: dict) -> None:
        self._count(metrics)
        ckpt = artifacts.get("checkpoint") if self.rank == 0 else None
        self.pending = (step, metrics, ckpt)
        if self._due(step, metrics) or metrics.get("interrupted"):  # the step a stop ends at: with its checkpoint
            self._report()

    def on_end(self, result) -> None:
        if self.pending is not None and self.pending[0] > self.reported and self._due_at_end(self.pending[1]):
            self._report()  # the last step, if not on the schedule

    def _count(self, metrics: dict) -> None:
        self.seconds, self.steps = self.seconds + metrics.get("seconds_per_step", 0.0), self.steps + 1
        self.peak = max(self.peak, metrics.get("peak_memory_mb", 0.0))

    def _due(self, step: int, metrics: dict) -> bool:
        return any(step % n == 0 for n in self.every) and not self._last(metrics)

    def _last(self, metrics: dict) -> bool:
        return self.train is not None and ends_run(self.train, metrics)

    def _due_at_end(self, metrics: dict) -> bool:
        return True

    def _report(self) -> None:
        step, metrics, ckpt = self.pending
        score = {CHECKPOINT_SCORE: metrics.get("eval/objective", NO_SCORE)} if ckpt else {}
        self._send(step, {**metrics, "node_id": self.node_id, "peak_memory_mb": self.peak,
                          "mean_seconds_per_step": self.seconds / self.steps, **score}, ckpt)
        self.reported = step

    def _send(self, step: int, metrics: dict, ckpt: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(ckpt)) if ckpt else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step_{step:06d}" if ckpt else None)


class FaultInjector(Callback):
    """Kills this worker's process once, as it starts `fail_at` (a marker file remembers it happened)."""

    def __init__(self, rank: int, fail_at: int, fail_rank: int, marker: Path):
        self.rank, self.fail_at, self.fail_rank, self.marker = rank, fail_at, fail_rank, Path(marker)

    def on_step(self, step: int, metrics: dict, artifacts: dict) -> None:
        if self.rank == self.fail_rank and step + 1 == self.fail_at and not self.marker.exists():
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.write_text(str(step + 1))
            os._exit(1)
