"""Ray Train's failure policy, less the restart that cannot help.

Ray Train restarts a failed worker group (`--max-failures`) and logs each decision with the workers'
tracebacks, twice each. For a failure a retry cannot change (`attempts.final`: a bad setting, a
non-finite stop, out of GPU memory the card had to itself, an unreadable checkpoint) the restart
loaded the models again only to fail at once (`attempts.once`), and the log put some 60 lines of
tracebacks above the one line the driver prints. This policy raises such a failure at once and
logs nothing; the driver says the line. Every other failure (a lost node, a killed process, a
preemption) goes to Ray's own policy unchanged.

Imported only where the controller is built (`distributed.lean_trainer`); the Ray names it reaches
are listed in sweep/ray_compat.py.
"""

from __future__ import annotations

from ray.train.v2._internal.execution.failure_handling import FailureDecision
from ray.train.v2._internal.execution.failure_handling.default import DefaultFailurePolicy
from ray.train.v2.api.exceptions import WorkerGroupError

from shortft import attempts


def worker_errors(error: BaseException) -> list[BaseException]:
    """The workers' own exceptions in a WorkerGroupError (Ray wraps each with its traceback text)."""
    failures = getattr(error, "worker_failures", None) or {}
    return [getattr(e, "_base_exc", e) for e in failures.values()]


class FinalRaises(DefaultFailurePolicy):
    """DefaultFailurePolicy, except that a worker group in which any worker failed for good is not
    restarted: one rank's bad setting or non-finite step is every rank's on the next try too."""

    def make_decision(self, training_failed_error):
        if isinstance(training_failed_error, WorkerGroupError) and any(
                attempts.final(e) for e in worker_errors(training_failed_error)):
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)
