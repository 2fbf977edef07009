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


def open_client(uri: str):
    from mlflow.tracking import MlflowClient

    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    try:
        import fcntl

        fd = os.open(Path(uri[len("sqlite:///"):]).expanduser().parent, os.O_RDONLY)
    except (ImportError, OSError):  # no flock here, or a folder that cannot be opened: MLflow says why
        return MlflowClient(tracking_uri=uri)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return MlflowClient(tracking_uri=uri)
    finally:
        os.close(fd)  # closing the folder releases the lock
