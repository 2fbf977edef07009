"""Opening an MlflowClient, with a lock for a SQLite store. Imports nothing of the package (the MLflow
relay actor opens its client here without loading torch).

MLflow creates a new SQLite store's tables by running its migrations when the first client opens it;
two processes doing that on one file at once (two `shortft train` started together in one folder, on
the default `sqlite:///mlflow.db`) fail with a traceback: "table _alembic_tmp_model_versions already
exists". The store's folder is locked (flock) while a client opens it, so the second one finds the
tables made.
"""

from __future__ import annotations

import os
from pathlib import Path


SQLITE = "sqlite:///"


def fail_fast() -> None:
    """MLflow's HTTP client retries a refused connection for minutes by default (7 tries, 120 s each); a
    few seconds in this process instead, so that a dead server stalls neither training (its logger's queue
    retries later) nor a run's last line. Settings the user made are kept."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (relative to the working directory unless absolute), else None."""
    return Path(uri[len(SQLITE):]).expanduser() if uri.startswith(SQLITE) else None


def open_client(uri: str):
    import logging

    from mlflow.tracking import MlflowClient

    # "Creating initial MLflow database tables..." and "Updating database tables" on a store's first use: noise
    # on a command line (its retry warnings, when a database does not answer, still show)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    path = sqlite_path(uri)
    try:
        import fcntl

        fd = os.open(path.parent, os.O_RDONLY) if path is not None else None
    except (ImportError, OSError):  # no flock here, or a folder that cannot be opened: MLflow says why
        fd = None
    if fd is None:
        return MlflowClient(tracking_uri=uri)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return MlflowClient(tracking_uri=uri)
    finally:
        os.close(fd)  # closing the folder releases the lock
