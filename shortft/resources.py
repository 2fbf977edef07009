"""Reaching Ray, and whether a trial's worker group can ever be placed there.

`connect(...)` is `ray.init` that turns a refused token (a cluster with `RAY_AUTH_MODE=token`, reached
without its token) into one line saying what to set. `check(request)` runs before the first trial (and
before a `--workers` run starts its worker group), so that an impossible request fails in one line
instead of waiting.

What exists: the cluster's alive nodes (`ray.nodes()`), plus, on a cluster the Ray launcher started,
the node types its autoscaler may add (`available_node_types` of the autoscaling config the head was
started with, `~/ray_bootstrap_config.yaml`, or `$SHORTFT_AUTOSCALING_CONFIG`).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shortft.captured import captured_stderr
from shortft.config import ConfigError

AUTOSCALING_CONFIG_ENV = "SHORTFT_AUTOSCALING_CONFIG"
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"
TOKEN_FIX = ("export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<token> (or RAY_AUTH_TOKEN_PATH=<file>); "
             "`ray get-auth-token` on the head node prints it (docs/clusters.md#token-authentication)")


def connect(**kwargs) -> None:
    """`ray.init(**kwargs)`; a cluster that refuses this driver's token (or its lack of one) is a ConfigError.
    A local Ray started here knows its own address in all its processes (`local_ray_environment`)."""
    import sys
    from contextlib import nullcontext

    import ray

    local = not kwargs.get("address") and starts_local_ray()
    if not local:
        check_answers(kwargs.get("address"))
    else:  # a laptop is not preempted: no preemption-watcher actor (one process start less per trial or run, and
        # no "PreemptionWatcher ... max_restarts > 0" error line from Ray's core worker on every `train --workers`)
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Connecting to a cluster, Ray (Python and C++) logs its guesses and a traceback before it raises:
    # held back, and shown only if the connection succeeds. A local start is not held (its processes
    # would inherit the capture).
    with captured_stderr() if kwargs.get("address") else nullcontext([""]) as said:
        try:
            if local:
                with local_ray_environment():
                    ray.init(**{**kwargs, "address": "local"})
            else:
                ray.init(**kwargs)
            refused = False
        except (ray.exceptions.AuthenticationError, RuntimeError, ConnectionError) as e:
            if not _refused_token(e):
                raise
            refused = True
    if not refused:
        sys.stderr.write("".join(said))
        return
    where = kwargs.get("address") or "this machine"
    mode = os.environ.get("RAY_AUTH_MODE")  # unset: token only where ~/.ray/auth_token holds one (Ray's rule)
    said_mode = f"RAY_AUTH_MODE={mode}" if mode else "RAY_AUTH_MODE unset"
    raise ConfigError(f"the Ray cluster at {where} requires token authentication and refused this driver "
                      f"({said_mode}{', with a token it does not accept' if mode == 'token' else ''}); "
                      + TOKEN_FIX)


ANSWER_WAIT_S = 30.0  # a head that is still starting (`ray up`, a KubeRay service) answers within it


def check_answers(address: str | None, wait_s: float | None = None) -> None:
    """Something listens at the cluster address (given, or $RAY_ADDRESS): with nothing there, `ray.init`
    waited silently for minutes (seen: over 3 min for 127.0.0.1:1, killed then). TCP connects, one a
    second, for up to `wait_s` (ANSWER_WAIT_S), with a line saying so after the first refusal."""
    import socket
    import sys
    import time

    from ray._private.services import canonicalize_bootstrap_address  # listed in shortft/sweep/ray_compat.py

    given = address or os.environ.get("RAY_ADDRESS")
    if given and given.startswith("ray://"):
        target, port = given.removeprefix("ray://").split("/")[0], 10001  # Ray Client's default port
    elif given and "://" in given:  # another client scheme (anyscale://...): not a host:port to probe
        return
    else:
        try:
            target, port = canonicalize_bootstrap_address(address), 6379  # the GCS's default port
        except Exception:  # no cluster found for `auto`: ray.init says so at once
            return
    if not target:
        return
    host, sep, tail = target.rpartition(":")
    host, port = (host, tail) if sep and tail.isdigit() else (target, port)
    wait_s = ANSWER_WAIT_S if wait_s is None else wait_s
    deadline, told = time.monotonic() + wait_s, False
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=min(10.0, wait_s or 10.0)).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ConfigError(f"Ray cluster address {given}: nothing answers at {host}:{port}"
                                  f"{'' if given.endswith(f'{host}:{port}') else ' (as Ray reads it)'} "
                                  f"({e.strerror or type(e).__name__}) after {wait_s:g} s; start Ray there (ray start "
                                  "--head), or give the head node's host:port") from None
        if not told:
            print(f"note: nothing answers at {host}:{port} yet; waiting up to {wait_s:g} s for the Ray cluster",
                  file=sys.stderr, flush=True)
            told = True
        time.sleep(1.0)


GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"  # the port a head node's GCS listens on, read by Ray as it starts one


def starts_local_ray() -> bool:
    """Whether a bare `ray.init()` would start a Ray of its own (no RAY_ADDRESS, no `ray start` here)."""
    from ray._private.services import canonicalize_bootstrap_address  # listed in shortft/sweep/ray_compat.py

    if "://" in os.environ.get("RAY_ADDRESS", ""):  # a Ray Client address: no local start (Ray's parser refuses it)
        return False
    return canonicalize_bootstrap_address(None) is None


@contextmanager
def local_ray_environment():
    """While a local Ray starts inside: its GCS on a port chosen here, and RAY_ADDRESS naming it, which
    the GCS, the raylet and through it every worker inherit (the driver's own environment is restored).

    Ray Train's placement-group cleaner, a detached actor of every multi-worker run, asks the state API
    whether its controller is alive at the address it finds on the machine: RAY_ADDRESS, else the last
    `ray start`'s (`<tmp>/ray/ray_current_cluster`). Once another Ray was started on the machine, that
    is the other cluster, which has no such actor: the cleaner took the controller for dead and removed
    the run's placement group, killing its workers mid-run (seen in the test suite beside the cluster
    tests; tests/test_distributed.py starts a second Ray during a two-worker run)."""
    import socket

    import ray

    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", GCS_PORT_ENV)}
    port = os.environ.get(GCS_PORT_ENV)
    if not port:
        with socket.socket() as s:
            s.bind(("", 0))
            port = str(s.getsockname()[1])
    os.environ.update({GCS_PORT_ENV: port, "RAY_ADDRESS": f"{ray.util.get_node_ip_address()}:{port}"})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _refused_token(error: BaseException | None) -> bool:
    """Ray 2.60 raises ConnectionError from RuntimeError("Failed to connect to GCS ...") from the
    AuthenticationError: look down the chain."""
    from ray.exceptions import AuthenticationError

    while error is not None:
        if isinstance(error, AuthenticationError) or "InvalidAuthToken" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


@dataclass
class Request:
    """One trial: `workers` bundles of {CPU, GPU}, plus the trial's own CPUs; the flags that set them."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float = 0.0
    trial_cpus: float = 0.0
    workers_flag: str = "--workers-per-trial"
    gpu_flag: str = "--gpus-per-worker"
    gpu_fix: str = "use --gpus-per-worker 0"
    who: str = "one trial"  # what needs the workers: a sweep's trial, or a `train --workers` run


def _bundles(node: dict, request: Request) -> int:
    """How many worker bundles fit on a node with these total resources."""
    fits = [node.get("CPU", 0) / request.cpus_per_worker] if request.cpus_per_worker > 0 else []
    if request.gpus_per_worker > 0:
        fits.append(node.get("GPU", 0) / request.gpus_per_worker)
    return math.floor(min(fits) + 1e-9) if fits else request.workers


def _counts(request: Request, nodes: list[dict], node_types: list[tuple[dict, int]] | None) -> tuple[int, int]:
    """Worker bundles the cluster can place now, and at the largest its autoscaler may make it."""
    now = sum(_bundles(n, request) for n in nodes)
    return now, now + sum(_bundles(r, request) * count for r, count in node_types or [])


def fit(request: Request, nodes: list[dict], node_types: list[tuple[dict, int]] | None) -> str:
    """"now" if the cluster as it is can place the trial, "later" if only the autoscaler's nodes can;
    otherwise a ConfigError naming the flag, what was asked and what exists. `node_types`: (resources,
    max_workers) of each type the autoscaler may start; None when there is no autoscaler."""
    now, later = _counts(request, nodes, node_types)
    scaler = "no autoscaler" if node_types is None else "an autoscaler"
    if request.gpus_per_worker > 0 and not any(_bundles(n, request) for n in [*nodes, *(r for r, _ in node_types or [])]):
        gpus = sum(n.get("GPU", 0) for n in nodes)
        largest = max([n.get("GPU", 0) for n in nodes] + [r.get("GPU", 0) for r, _ in node_types or []])
        asked = request.gpu_flag if request.gpu_flag == "--gpu" else f"{request.gpu_flag} {request.gpus_per_worker:g}"
        raise ConfigError(f"{asked}: this Ray cluster has {gpus:g} GPUs "
                          f"(at most {largest:g} on one node) and {scaler} that could add more; {request.gpu_fix} "
                          "or start a GPU cluster (clusters/gpu.yaml)")
    if now >= request.workers:
        return "now"
    if later >= request.workers:
        return "later"
    gpu_part = f" + {request.gpus_per_worker:g} GPU" if request.gpus_per_worker > 0 else ""
    raise ConfigError(f"{request.workers_flag} {request.workers}: {request.who} needs {request.workers} workers of "
                      f"{request.cpus_per_worker:g} CPU{gpu_part}; this Ray cluster can place {now}"
                      + (f" (with its autoscaler {later})" if node_types is not None else " and has no autoscaler")
                      + f"; use {request.workers_flag} {max(1, later)} or fewer")


def autoscaler_node_types() -> list[tuple[dict, int]] | None:
    """(resources, max_workers) of the node types the cluster's autoscaler may start; None when it has
    none (a local Ray, a fixed cluster). In order: $SHORTFT_AUTOSCALING_CONFIG (a launcher YAML, or one
    inline); the
    config Ray's autoscaler (v2: `ray up` of Ray 2.60, KubeRay) publishes in the GCS, as Ray Train
    reads it; the launcher's `~/ray_bootstrap_config.yaml` on a head that `ray up` made."""
    explicit = os.environ.get(AUTOSCALING_CONFIG_ENV)
    if not explicit:
        published = _published_node_types()
        if published is not None:
            return published
    return _launcher_node_types(explicit or LAUNCHER_CONFIG)


def _published_node_types() -> list[tuple[dict, int]] | None:
    try:  # private to Ray (listed in shortft/sweep/ray_compat.py); absent or moved: the files decide
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001
        return None
    if config is None or not config.node_group_configs:
        return None
    unbounded = 1 << 20  # max_count -1: no cap
    return [(dict(g.resources), unbounded if g.max_count == -1 else int(g.max_count))
            for g in config.node_group_configs]


def _launcher_node_types(source: str) -> list[tuple[dict, int]] | None:
    """From a launcher YAML file, or the YAML itself in $SHORTFT_AUTOSCALING_CONFIG (a mapping, `{...}`: what
    a KubeRay head says of its worker groups, since Ray 2.60's autoscaler there publishes none)."""
    import yaml

    path = Path(source).expanduser()
    if source.strip().startswith("{"):
        config = yaml.safe_load(source) or {}
    elif path.is_file():
        config = yaml.safe_load(path.read_text()) or {}
    else:
        return None
    types = config.get("available_node_types") or {}
    return [(dict(t.get("resources") or {}), int(t.get("max_workers", config.get("max_workers", 0)) or 0))
            for t in types.values()]


def _alive_nodes(request: Request) -> list[dict]:
    import ray

    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    if nodes and request.trial_cpus:  # the trial process itself takes a little CPU somewhere
        nodes[0]["CPU"] = max(0.0, nodes[0].get("CPU", 0) - request.trial_cpus)
    return nodes


def trials_at_most(request: Request) -> int:
    """How many such trials the connected cluster can run at once at its largest: its nodes now and every
    node its autoscaler may add (a GPU cluster that starts with no GPU node ran one trial at a time)."""
    return max(1, _counts(request, _alive_nodes(request), autoscaler_node_types())[1] // request.workers)


def check(request: Request) -> str:
    """`fit` against the connected Ray cluster; says once, in one line, when the trial waits for nodes."""
    verdict = fit(request, _alive_nodes(request), autoscaler_node_types())
    if verdict == "later":
        print(f"note: {request.who} needs {request.workers} workers of {request.cpus_per_worker:g} CPU"
              + (f" + {request.gpus_per_worker:g} GPU" if request.gpus_per_worker else "")
              + "; the cluster has too few now, and its autoscaler can add them: waiting", flush=True)
    return verdict
