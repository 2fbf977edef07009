"""What a sweep trial's Ray Train job hands to Tune. A module of its own because Ray Train's controller
unpickles the callback: importing it there must not import torch or the rest of the sweep."""

from __future__ import annotations

from ray.tune.integration.ray_train import TuneReportCallback

OBJECTIVE = "eval/objective"
OBJECTIVE_SE = "eval/objective_se"  # its standard error over the prompts (evaluate.py, stats.clustered)
OBJECTIVE_SAMPLES = "eval/objective_samples"  # its value on each evaluation sample, a list (evaluate.py)
NOT_TERMS = (OBJECTIVE, OBJECTIVE_SE, OBJECTIVE_SAMPLES)  # the eval/ keys that are not a reward term's mean


class EvalReport(TuneReportCallback):
    """Ray Train callback: forward to Tune only the steps that carry an evaluation (Tune wants the
    objective in every result); each carries the mean seconds per step and the peak memory since the
    worker started (`ray_reports.RayReport`)."""

    def after_report(self, run_context, metrics, checkpoint):
        if OBJECTIVE in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)
