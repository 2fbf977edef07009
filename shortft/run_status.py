"""The MLflow status of a `shortft train` run (one process or `--workers`) that does not end well.

`MlflowLogger.on_end` marks a run FINISHED; nothing marked the others, so a run that stopped on an error
or was interrupted showed as RUNNING in the MLflow UI for ever, among the runs that really were. (Sweep
trials are closed by the sweep's driver: `sweep/trial_runs.py`.)

    with run_status.kept(uri, run_id):   # RUNNING now (again, on a resume); KILLED or FAILED if it raises
        train(...)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from shortft import tracking
from shortft.progress import warn

ERROR_TAG = "shortft.error"  # the one line a failed or interrupted run ended with


@contextmanager
def kept(uri: str | None, run_id: str | None) -> Iterator[None]:
    """Around a run's training: an interrupt (KeyboardInterrupt, `Interrupted`) ends the run KILLED, any
    other exception FAILED, each with its line as the `shortft.error` tag. Marking never hides the error."""
    if not uri or not run_id:
        yield
        return
    _mark(uri, run_id, "RUNNING", "")
    try:
        yield
    except KeyboardInterrupt as e:
        _mark(uri, run_id, "KILLED", str(e) or "interrupted")
        raise
    except Exception as e:
        _mark(uri, run_id, "FAILED", str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
        raise


def _mark(uri: str, run_id: str, status: str, line: str) -> None:
    try:
        client = tracking.client(uri)
        if status == "RUNNING":
            run = client.get_run(run_id)
            if run.info.status != "RUNNING":  # a resumed run: it runs again, and the line it ended with goes
                client.update_run(run_id, status="RUNNING")
            if ERROR_TAG in run.data.tags:
                client.delete_tag(run_id, ERROR_TAG)
            return
        client.set_tag(run_id, ERROR_TAG, line[:5000])
        client.set_terminated(run_id, status)
    except Exception as e:  # the tracking server may be what failed; the run's own error comes first
        warn(f"shortft: mlflow: run {run_id} not marked {status} ({type(e).__name__}: {str(e)[:160]})")
