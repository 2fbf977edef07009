"""Cluster definitions pass Ray's own validation; the sweep runs on a real multi-node Ray cluster
(on this one machine) with trials on the non-head node, and refuses local storage there."""

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

# With test_onprem.py: the tests that start multi-node clusters run one after another, beside the other
# Ray tests (tests/test_sweep.py says why that is safe).
pytestmark = pytest.mark.xdist_group("clusters")

ray = pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = sorted((ROOT / "clusters").glob("*.yaml"))


def test_every_cluster_yaml_is_checked():
    assert {p.name for p in CLUSTERS} == {"gpu.yaml", "kuberay.yaml", "onprem.yaml"}


def _validated(path: Path) -> dict:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the file as written, no defaults filled in
    validate_config(prepare_config(config))  # and as `ray up` sees it
    return config


def test_launcher_config_passes_ray_validation():
    config = _validated(ROOT / "clusters" / "gpu.yaml")
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    gpu_types = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    assert gpu_types and all(t["min_workers"] == 0 for t in gpu_types)
    assert any("pip install" in c and "/home/ray/shortft" in c for c in config["setup_commands"])
    # MLflow through clusters/mlflow-server.sh (127.0.0.1 only; returns once it answers), artifacts in the bucket
    assert any("MLFLOW_ARTIFACTS=s3://" in c and "mlflow-server.sh start" in c for c in config["head_start_ray_commands"])
    assert "0.0.0.0" not in " ".join(config["head_start_ray_commands"])
    env = " ".join(config["docker"]["run_options"])
    assert "SHORTFT_STORAGE_PATH=s3://" in env and "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in env
    # token authentication for every node and the driver: the mode in every container, the token file shipped
    assert "--env RAY_AUTH_MODE=token" in env and "/home/ray/.ray/auth_token" in config["file_mounts"]


def test_onprem_config_passes_ray_validation():
    """The file `ray up` reads as shipped; tests/test_onprem.py brings a copy of it up for real."""
    config = _validated(ROOT / "clusters" / "onprem.yaml")
    assert config["provider"]["type"] == "local" and {"head_ip", "worker_ips"} <= set(config["provider"])
    assert {"ssh_user", "ssh_private_key"} <= set(config["auth"])
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # every shell Ray opens on a node (ray start on head and workers, and the driver `ray submit`
    # starts) sources the file that sets token authentication, MLflow and the shared storage
    setup = " ".join(config["setup_commands"])
    assert "'export RAY_AUTH_MODE=token'" in setup and "> ~/.shortft.sh" in setup
    assert "echo 'source ~/.shortft.sh' >> ~/.bashrc" in setup
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in setup and "SHORTFT_STORAGE_PATH=" in setup
    assert any("pip install" in c and "~/shortft" in c for c in config["setup_commands"])
    assert any("mlflow-server.sh start 5000" in c for c in config["head_start_ray_commands"])


def test_rayjob_has_the_kuberay_shape():
    job = yaml.safe_load((ROOT / "clusters" / "kuberay.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert "tune/sweep.py" in spec["entrypoint"] and "--address auto" in spec["entrypoint"]
    # MLflow in a session of its own (Ray kills the job's process group at its end), waited for, not `sleep 5`
    assert "mlflow-server.sh start && python" in spec["entrypoint"] and "sleep" not in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"] == {"mode": "token"}  # the operator sets the mode and token in every pod
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    # the head pod's name has random parts (the RayJob's cluster, then the pod): port-forward finds it by label
    (label,) = [f"{k}={v}" for k, v in head["template"]["metadata"]["labels"].items()]
    for text in ((ROOT / "clusters" / "kuberay.yaml").read_text(), (ROOT / "docs" / "clusters.md").read_text()):
        assert f"kubectl port-forward $(kubectl get pod -l {label} -o name) 5000:5000" in text
    assert head["template"]["spec"]["containers"][0]["image"]
    workers = cluster["workerGroupSpecs"]
    assert workers and all(w["groupName"] and w["template"]["spec"]["containers"] for w in workers)
    assert all(c["resources"]["limits"].get("nvidia.com/gpu") for w in workers for c in w["template"]["spec"]["containers"])
    assert all(pod["serviceAccountName"] for pod in [head["template"]["spec"], *(w["template"]["spec"] for w in workers)])


def test_a_kuberay_head_knows_the_gpu_nodes_it_may_get_and_sweeps_on_all_of_them(monkeypatch):
    """The RayJob's head has no GPU and its GPU group starts at 0 replicas; Ray 2.60's autoscaler publishes
    no node groups on KubeRay, and a head pod has no launcher file: the sweep found 0 GPUs and no
    autoscaler, and stopped with status 2. On gpu.yaml (GPU nodes from 0 too) it ran one trial at a time."""
    from shortft import resources
    from shortft.resources import Request

    job = yaml.safe_load((ROOT / "clusters" / "kuberay.yaml").read_text())
    cluster = job["spec"]["rayClusterSpec"]
    (env,) = [e for e in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
              if e["name"] == resources.AUTOSCALING_CONFIG_ENV]
    monkeypatch.setenv(resources.AUTOSCALING_CONFIG_ENV, env["value"])
    monkeypatch.setattr(resources, "_published_node_types", lambda: pytest.fail("the env var comes first"))
    groups = {w["groupName"]: w for w in cluster["workerGroupSpecs"]}
    declared = yaml.safe_load(env["value"])["available_node_types"]
    assert declared.keys() == groups.keys()
    for name, t in declared.items():  # the same nodes as the worker groups
        limits = groups[name]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert t["max_workers"] == groups[name]["maxReplicas"]
        assert t["resources"] == {"CPU": int(limits["cpu"]), "GPU": int(limits["nvidia.com/gpu"])}
    request = Request(1, 1.0, 1.0)
    assert resources.fit(request, [{"CPU": 0.0}], resources.autoscaler_node_types()) == "later"
    monkeypatch.setattr(resources, "_alive_nodes", lambda request: [{"CPU": 0.0}])
    assert resources.trials_at_most(request) == 8  # not 1: every GPU node the group may get
    monkeypatch.setattr(resources, "_alive_nodes", lambda request: [{"CPU": 0.0}, {"CPU": 8.0, "GPU": 1.0}])
    assert resources.trials_at_most(Request(2, 1.0, 1.0)) == 4  # 9 GPU nodes at most, 2 per trial


TOKEN = secrets.token_hex(16)
AUTH = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR")


@pytest.fixture(scope="module")
def two_nodes():
    """A head with no CPUs for trials (as in clusters/gpu.yaml) and one worker node, with Ray's token
    authentication on, as every cluster file sets it up. The nodes and every driver this module starts
    inherit RAY_AUTH_MODE=token and the token from this process's environment while it lasts."""
    from ray._private.authentication_test_utils import reset_auth_token_state
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.pop(k, None) for k in AUTH}
    # Its own Ray temp dir (short: socket paths stop at 107 bytes): a plain ray.init() in a test on the
    # other pytest worker looks for "the latest cluster" in /tmp/ray and must not find this one.
    tmp = tempfile.mkdtemp(prefix="r2n", dir="/tmp")
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN, RAY_TMPDIR=tmp)
    reset_auth_token_state()
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        worker = cluster.add_node(num_cpus=4)
        cluster.wait_for_nodes()
        yield cluster, cluster.head_node.node_id, worker.node_id
        cluster.shutdown()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_auth_token_state()
        shutil.rmtree(tmp, ignore_errors=True)


def _sweep(work: Path, address: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    work.mkdir(exist_ok=True)
    (work / "sweep.py").write_bytes((ROOT / "tune" / "sweep.py").read_bytes())
    e = {**os.environ, **(env or {})}
    e.pop("RAY_ADDRESS", None)
    for key in [k for k, v in e.items() if v is None]:  # env={"X": None}: X unset for this driver
        e.pop(key)
    return subprocess.run([sys.executable, "sweep.py", "--address", address, "--smoke-test", *args], cwd=work,
                          capture_output=True, text=True, env=e, timeout=900)


def test_local_storage_on_a_multi_node_cluster_is_refused(two_nodes, tmp_path):
    cluster, _, _ = two_nodes
    r = _sweep(tmp_path / "work", cluster.address, "--storage-path", str(tmp_path / "local"))
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "local directory" in err[0] and "s3://" in err[0], r.stderr[-2000:]
    assert "Trial" not in r.stdout
    assert not (tmp_path / "local").exists() or not any((tmp_path / "local").iterdir())


@pytest.mark.slow
def test_smoke_sweep_on_a_two_node_cluster_places_trials_on_the_worker(two_nodes, tmp_path):
    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient

    cluster, head_id, worker_id = two_nodes
    shared = tmp_path / "shared"  # stands for an NFS mount: the same path on every node
    work = tmp_path / "work"
    r = _sweep(work, cluster.address, "--num-samples", "1", "--name", "multi", "--storage-path", str(shared),
               env={"SHORTFT_SHARED_STORAGE": "1"})  # one trial: tests/test_onprem.py submits two
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = pq.read_table(work / "runs" / "sweeps" / "multi" / "results.parquet").to_pylist()
    assert len(rows) == 1
    assert {row["node_id"] for row in rows} == {worker_id} != {head_id}
    assert (shared / "multi" / "tuner.pkl").is_file()
    # the untrained model's evaluation ran on the worker too (the head has no CPUs for it); what it
    # returned was written on the driver's side
    assert "| untrained | BASE |" in (work / "runs" / "sweeps" / "multi" / "results.md").read_text()
    assert (work / "runs" / "sweeps" / "multi" / "grids" / "base.png").stat().st_size > 0
    # a one-worker trial trains in its Tune trial: its checkpoints go to the shared storage through Tune
    assert list((shared / "multi").glob("*/checkpoint_*/state.json"))
    c = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("shortft-sweeps").experiment_id])
    children = [x for x in runs if "mlflow.parentRunId" in x.data.tags]
    assert len(runs) - len(children) == 1 and len(children) == 1
    assert all("loss" in x.data.metrics for x in children)  # logged from the worker node, through the relay
    assert all(x.data.tags["shortft.host_cpu"].endswith(" CPUs") for x in children)
    # The cluster's token never leaves the environment: not in the output, the runs, Ray's storage or the table.
    assert TOKEN not in r.stdout + r.stderr
    assert [str(p) for p in tmp_path.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()] == []
    assert all(TOKEN not in str(x.data.params) + str(x.data.tags) for x in runs)


def test_a_driver_without_the_clusters_token_is_refused_in_one_line(two_nodes, tmp_path):
    cluster, _, _ = two_nodes
    r = _sweep(tmp_path / "work", cluster.address, "--storage-path", str(tmp_path / "s"),
               env={"RAY_AUTH_MODE": None, "RAY_AUTH_TOKEN": None})
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[0].startswith(f"error: the Ray cluster at {cluster.address} requires token authentication and "
                               "refused this driver (RAY_AUTH_MODE unset); export RAY_AUTH_MODE=token"), lines[0]
