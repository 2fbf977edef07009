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
from shortft.config import ConfigError
from shortft.mlflow_client import fail_fast
from shortft.progress import warn

ERROR_TAG = "shortft.error"  # the one line a failed or interrupted run ended with


@contextmanager
def kept(uri: str | None, run_id: str | None) -> Iterator[None]:
    """Around a run's training: an interrupt (KeyboardInterrupt, `Interrupted`) ends the run KILLED, any
    other exception FAILED, each with its line as the `shortft.error` tag. A resume refused with a
    ConfigError (another worker count, a bad path) leaves the run as it was: the run did not fail, the
    command did. Marking never hides the error, nor delays it by more than seconds."""
    if not uri or not run_id:
        yield
        return
    fail_fast()
    before = _reopen(uri, run_id)
    try:
        yield
    except KeyboardInterrupt as e:
        _end(uri, run_id, "KILLED", str(e) or "interrupted")
        raise
    except Exception as e:
        refused = isinstance(e, ConfigError) and before is not None
        _end(uri, run_id, *(before if refused else ("FAILED", _line(e))))
        raise


def _line(e: BaseException) -> str:
    return str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__


def _reopen(uri: str, run_id: str) -> tuple[str, str] | None:
    """The run RUNNING, its last line dropped; what it was before (status, line) if it had ended."""
    try:
        client = tracking.client(uri)
        run = client.get_run(run_id)
        before = (run.info.status, run.data.tags.get(ERROR_TAG, "")) if run.info.status != "RUNNING" else None
        if before is not None:  # a resumed run: it runs again
            client.update_run(run_id, status="RUNNING")
        if ERROR_TAG in run.data.tags:
            client.delete_tag(run_id, ERROR_TAG)
        return before
    except Exception as e:
        warn(f"shortft: mlflow: run {run_id} not marked RUNNING ({type(e).__name__}: {str(e)[:160]})")
        return None


def _end(uri: str, run_id: str, status: str, line: str) -> None:
    try:
        client = tracking.client(uri)
        if line:
            client.set_tag(run_id, ERROR_TAG, line[:5000])
        if status == "RUNNING":
            client.update_run(run_id, status="RUNNING")
        else:
            client.set_terminated(run_id, status)
    except BaseException as e:  # a dead server, or a second Ctrl-C: the run's own error comes first
        warn(f"shortft: mlflow: run {run_id} not marked {status} ({type(e).__name__}: {str(e)[:160]})")
