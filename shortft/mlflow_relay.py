"""MLflow through Ray: one actor on the driver's node makes every MLflow call of the training workers.

Why: on a cluster the MLflow server listens on the head node's 127.0.0.1 only (it is never exposed),
so workers on other nodes cannot reach it; and a local `sqlite:///mlflow.db` wants a single writer.
Workers hand their calls (and the bytes of the files they log) to this actor; it runs them next to
the driver. Start it in the driver with `start_relay(uri)`; workers use `RelayClient(name)`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from shortft.credentials import credentials_env

NAMESPACE = "shortft"
RELAY = "mlflow-relay"  # the relay's actor name
_handles: dict = {}  # a named actor lives while a handle to it does: keep one per process


class _Relay:
    def __init__(self, uri: str, credentials: dict[str, str] | None = None):
        import os

        from shortft.mlflow_client import fail_fast, open_client

        # The one process that talks to MLflow gets the credentials, as arguments: a job's runtime_env
        # reached every trial and worker, and Ray logs it on every node and shows it in `ray list jobs`.
        os.environ.update(credentials or {})
        fail_fast()  # a dead server fails a call in seconds, not after MLflow's minutes of retries
        self.uri, self.client = uri, open_client(uri)

    def call(self, method: str, *args, **kwargs):
        return getattr(self.client, method)(*args, **kwargs)

    def run(self, function, *args):
        """`function(uri, *args)` on this relay's URI (e.g. `tracking.ensure_trial_run`): calls from
        concurrent trials run here one at a time, as SQLite wants."""
        return function(self.uri, *args)

    def log_files(self, run_id: str, files: dict[str, bytes], artifact_path: str | None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            for rel, data in files.items():
                (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / rel).write_bytes(data)
            self.client.log_artifacts(run_id, tmp, artifact_path)


def start_relay(uri: str, name: str = RELAY) -> str:
    """Start (or find) the relay actor on this process's node; returns the name workers look it up by."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if name in _handles:  # started by this process: keep the handle it created, which keeps it alive
        # (a handle from get_if_exists does not: replacing the first one would let Ray destroy the actor)
        try:
            ray.get(_handles[name].__ray_ready__.remote(), timeout=30)
            return name
        except Exception:
            del _handles[name]
    here = ray.get_runtime_context().get_node_id()
    actor = ray.remote(_Relay).options(name=name, namespace=NAMESPACE, get_if_exists=True, num_cpus=0,
                                       scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False))
    handle = actor.remote(uri, credentials_env())
    ray.get(handle.__ray_ready__.remote())
    _handles[name] = handle
    return name


def relay_call(name: str, function, *args):
    """`function(uri, *args)` run by the relay actor `name` (a module-level function: pickled by name)."""
    import ray

    return ray.get(ray.get_actor(name, namespace=NAMESPACE).run.remote(function, *args))


class RelayClient:
    """The MlflowClient methods the training loop uses, run by the relay actor."""

    def __init__(self, name: str):
        import ray

        self._ray = ray
        self._actor = ray.get_actor(name, namespace=NAMESPACE)

    def __getattr__(self, method: str):
        return lambda *args, **kwargs: self._ray.get(self._actor.call.remote(method, *args, **kwargs))

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        p = Path(local_path)
        self._ray.get(self._actor.log_files.remote(run_id, {p.name: p.read_bytes()}, artifact_path))

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
        root = Path(local_dir)
        files = {str(f.relative_to(root)): f.read_bytes() for f in root.rglob("*") if f.is_file()}
        self._ray.get(self._actor.log_files.remote(run_id, files, artifact_path))
