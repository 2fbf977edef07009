"""Requests no placement can ever meet fail fast, in one line; ones an autoscaler can meet wait."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from shortft.config import ConfigError
from shortft.resources import Request, fit

# Tests that start Ray run one after another on one pytest-xdist worker (`ray stop` in one of them
# would stop another's cluster); the other worker takes the rest.
pytestmark = pytest.mark.xdist_group("ray")

ROOT = Path(__file__).resolve().parents[1]
CPU_NODE = {"CPU": 4.0}


def test_fit_against_nodes_and_autoscaler_types():
    assert fit(Request(2, 1.0), [CPU_NODE], None) == "now"
    with pytest.raises(ConfigError, match="--gpus-per-worker 1: this Ray cluster has 0 GPUs.*no autoscaler"):
        fit(Request(1, 1.0, 1.0), [CPU_NODE], None)
    with pytest.raises(ConfigError, match="--workers-per-trial 8: .*can place 4 and has no autoscaler; use "
                                          "--workers-per-trial 4 or fewer"):
        fit(Request(8, 1.0), [CPU_NODE], None)
    with pytest.raises(ConfigError, match="--workers 8: the run needs 8 workers"):  # `train --workers` said "one trial"
        fit(Request(8, 1.0, workers_flag="--workers", who="the run"), [CPU_NODE], None)
    gpu_type = ({"CPU": 8.0, "GPU": 1.0}, 4)
    assert fit(Request(2, 1.0, 1.0), [CPU_NODE], [gpu_type]) == "later"  # two GPU nodes can be added
    with pytest.raises(ConfigError, match="with its autoscaler 4"):
        fit(Request(6, 1.0, 1.0), [CPU_NODE], [gpu_type])
    with pytest.raises(ConfigError, match="at most 1 on one node"):
        fit(Request(1, 1.0, 2.0), [CPU_NODE], [gpu_type])  # 2 GPUs per worker on 1-GPU nodes: never


def test_node_types_that_rays_autoscaler_publishes_are_read(monkeypatch):
    """KubeRay and `ray up` (autoscaler v2) publish their node groups in the GCS, where Ray Train reads
    them; a head with no launcher file (a KubeRay pod) still sees the GPU nodes it may get."""
    import ray
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_put

    from shortft import resources

    monkeypatch.delenv(resources.AUTOSCALING_CONFIG_ENV, raising=False)
    monkeypatch.setattr(resources, "LAUNCHER_CONFIG", "/nonexistent/ray_bootstrap_config.yaml")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert resources.autoscaler_node_types() is None  # a local Ray: no autoscaler
        config = autoscaler_pb2.ClusterConfig()
        group = config.node_group_configs.add()
        group.name, group.max_count = "gpu-group", 8
        group.resources.update({"CPU": 8, "GPU": 1})
        _internal_kv_put(ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(), config.SerializeToString(),
                         namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode())
        assert resources.autoscaler_node_types() == [({"CPU": 8.0, "GPU": 1.0}, 8)]
        assert resources.check(Request(2, 1.0, 1.0)) == "later"
    finally:
        ray.shutdown()


def _one_line_exit_2(args, cwd=ROOT):
    t0 = time.time()
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert time.time() - t0 < 30
    return lines[0]


@pytest.mark.parametrize("flags,expected", [(["--gpus-per-worker", "1"], "--gpus-per-worker 1: this Ray cluster has 0 GPUs"),
                                            (["--workers-per-trial", "8"], "--workers-per-trial 8:")])
def test_sweep_on_a_cpu_only_local_ray_fails_fast(tmp_path, flags, expected):
    line = _one_line_exit_2(["tune/sweep.py", "--smoke-test", "--num-samples", "1", "--storage-path",
                             str(tmp_path / "s"), "--no-mlflow", *flags])
    assert expected in line


def test_train_with_gpu_workers_on_a_cpu_only_machine_fails_fast(tmp_path):
    line = _one_line_exit_2(["-m", "shortft.cli", "train", "--config", "tiny", "--workers", "2", "--gpu",
                             "--storage-path", str(tmp_path / "s"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"],
                            cwd=tmp_path)  # its ./runs/tiny: not one another test's run may hold
    assert "--gpu: this Ray cluster has 0 GPUs" in line and "drop --gpu" in line
    assert not (tmp_path / "runs").exists()  # runs/tiny/ stayed behind (its lock file and Ray record)
    from mlflow.tracking import MlflowClient  # refused before anything was made: no dangling RUNNING run
    assert all(not c.search_runs([e.experiment_id]) for c in [MlflowClient(f"sqlite:///{tmp_path}/m.db")]
               for e in c.search_experiments())


@pytest.mark.slow
def test_a_trial_that_can_only_fit_later_waits_then_ends_as_error(tmp_path):
    """A (fake) autoscaler could add a GPU node, so the sweep says once that it waits; the node never
    comes, and after --resource-wait-s the trial ends as ERROR with that reason; the sweep finishes."""
    import os

    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient

    autoscaler = tmp_path / "ray_bootstrap_config.yaml"
    autoscaler.write_text("max_workers: 2\navailable_node_types:\n  gpu:\n    resources: {CPU: 8, GPU: 1}\n"
                          "    max_workers: 2\n")
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "SHORTFT_AUTOSCALING_CONFIG": str(autoscaler)}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, str(ROOT / "tune" / "sweep.py"), "--smoke-test", "--num-samples", "1",
                        "--gpus-per-worker", "1", "--resource-wait-s", "5", "--name", "wait",
                        "--storage-path", str(tmp_path / "s")], cwd=work, capture_output=True, text=True,
                       timeout=600, env=env)
    out = p.stdout + p.stderr
    assert out.count("its autoscaler can add them: waiting") == 1, out[-3000:]
    assert p.returncode == 1 and "1 trial(s) failed: t001" in out, out[-3000:]  # no best trial, but it ended
    assert "\n  t001: --resource-wait-s 5: the 1 worker(s) of 1 CPU + 1 GPU were not placed" in p.stderr  # its reason
    (row,) = pq.read_table(work / "runs" / "sweeps" / "wait" / "results.parquet").to_pylist()
    assert row["status"] == "ERROR"
    assert row["error"].startswith("--resource-wait-s 5: the 1 worker(s) of 1 CPU + 1 GPU were not placed within 5 s")
    c = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    (run,) = [r for r in c.search_runs([c.get_experiment_by_name("shortft-sweeps").experiment_id])
              if "mlflow.parentRunId" in r.data.tags]
    assert run.info.status == "FAILED" and run.data.tags["shortft.error"] == row["error"]


def test_a_cluster_address_nothing_answers_at_is_one_line_in_seconds(monkeypatch, capsys, tmp_path):
    """`tune/sweep.py --address 127.0.0.1:1` (or a stale RAY_ADDRESS) waited silently for over 3 minutes."""
    import socket
    import threading
    import time

    from shortft import resources
    from shortft.config import ConfigError

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(resources, "ANSWER_WAIT_S", 2.0)  # 30 s: a head still starting answers within it
    t0 = time.time()
    for address, env in ((f"127.0.0.1:{port}", None), (None, f"127.0.0.1:{port}"), (None, f"ray://127.0.0.1:{port}")):
        if env:
            monkeypatch.setenv("RAY_ADDRESS", env)  # ray:// here was Ray's "Invalid address format" traceback
        with pytest.raises(ConfigError, match=rf"^Ray cluster address \S+:{port}: nothing answers at \S+:{port} \("
                                              r".* after 2 s; start Ray there"):
            resources.connect(address=address)
    assert time.time() - t0 < 20
    assert "note: nothing answers at" in capsys.readouterr().err
    # the sweep's line named the address as Ray rewrote it (127.0.0.1 as this node's IP), not the one given
    from shortft.sweep import run_sweep

    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(ConfigError, match=rf"^Ray cluster address 127\.0\.0\.1:{port}: nothing answers at \S+:{port}"):
        run_sweep("toy", smoke_test=True, tracking_uri=None, address=f"127.0.0.1:{port}", storage_path=str(tmp_path))
    server = socket.socket()  # a head that starts listening while the driver waits (`ray up`, then the sweep)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    starts = threading.Timer(1.5, lambda: (server.bind(("0.0.0.0", port)), server.listen()))
    starts.start()
    try:
        resources.check_answers(f"127.0.0.1:{port}", wait_s=10)  # Ray reaches 127.0.0.1 at the node's IP
    finally:
        starts.join()
        server.close()


def test_a_sweep_name_that_is_no_folder_name_is_refused_before_anything_is_written(tmp_path):
    from shortft.config import ConfigError
    from shortft.sweep import run_sweep

    for name in ("../x", "a/b", ".."):
        with pytest.raises(ConfigError, match=r"^--name=.*: a name is one folder's name"):
            run_sweep("toy", 1, name=name, storage_path=str(tmp_path / "ray"), tracking_uri=None)
    assert not (tmp_path / "ray").exists()


def test_a_storage_path_that_is_a_file_is_named_as_one(tmp_path):
    from shortft.config import ConfigError
    from shortft.ray_storage import check_storage_path

    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match=r"^storage path .*/f: a file, not a folder; pass --storage-path"):
        check_storage_path(str(tmp_path / "f"))  # was "not writable (File exists)"
    with pytest.raises(ConfigError, match=r"^storage path .*/f/sub: not writable \(Not a directory\); pass --storage"):
        check_storage_path(str(tmp_path / "f" / "sub"))
    check_storage_path(str(tmp_path / "new" / "ray"))  # missing: made to be checked, then removed (a refused sweep
    assert not (tmp_path / "new").exists()  # left it empty)


def test_a_storage_path_with_credentials_in_it_is_refused_without_printing_them():
    """pyarrow takes `s3://KEY:SECRET@bucket/...`: the sweep printed it on its first line and stored it with its
    settings (shortft_sweep.json), and every trial's config carried it."""
    from shortft.config import ConfigError
    from shortft.ray_storage import check_storage_path

    with pytest.raises(ConfigError) as e:
        check_storage_path("s3://AKIAEXAMPLE:s3cr3t@my-bucket/shortft/sweeps")
    assert "s3cr3t" not in str(e.value) and "AKIAEXAMPLE" not in str(e.value)
    assert str(e.value).startswith("storage path s3://...@my-bucket/shortft/sweeps: holds credentials")
