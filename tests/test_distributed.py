"""Ray Train layer: equivalence with one process, fault tolerance, MLflow logging, bad input."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import shortft
from shortft import tracking
from shortft.distributed import train_with_ray
from shortft.ray_reports import FAIL_AT_STEP_ENV
from tests.conftest import kill_with_env

# Tests that start Ray run one after another on one pytest-xdist worker (`ray stop` in one of them
# would stop another's cluster); the other worker takes the rest.
pytestmark = pytest.mark.xdist_group("ray")

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_cluster():
    from shortft import resources

    # As the library starts one: with its dashboard. Ray Train's cleaner asks the state API it serves, at
    # the address this cluster advertises; a Ray without one advertises 127.0.0.1:8265 all the same, and
    # another Ray's dashboard there answered "no such actor" (the cleaner then killed a running job's
    # workers: test_worker_death... failed so in a CI run beside the sweep tests' local Rays).
    resources.connect(num_cpus=4, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_ray_started_later_on_the_machine_is_not_asked_about_this_clusters_actors(ray_cluster):
    """Ray Train's placement-group cleaner, a detached actor of every multi-worker run, asks the state API
    whether its controller lives, at the address it finds on the machine. Once another Ray was started
    there (`ray start`), that was the other cluster, which has no such actor: the cleaner removed a
    running job's placement group and its workers died (a two-worker run failed so beside the cluster
    tests; reproduced by starting a Ray mid-run). The state API it asks is the dashboard this cluster
    advertises; a cluster without one advertises 127.0.0.1:8265 all the same, and another Ray's dashboard
    there answered for it. The other Ray here takes that port where it is free. The cleaner's own
    question, from a detached actor."""
    import socket

    import ray.experimental.internal_kv as kv
    from ray._common.utils import get_ray_address_file
    from ray._private import ray_constants

    advertised = kv._internal_kv_get(ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD)
    host, port = advertised.decode().rsplit(":", 1)
    with socket.socket() as s:
        free = s.connect_ex((host, int(port))) != 0
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR", "RAY_GCS_SERVER_PORT")}
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--port=0", "--num-cpus=0",
                    "--include-dashboard=true", f"--dashboard-port={port if free else 0}", "--disable-usage-stats"],
                   env={**env, "SHORTFT_TEST_OTHER_RAY": "1"}, check=True, capture_output=True, timeout=120)
    other = open(get_ray_address_file(None)).read()

    @ray.remote(num_cpus=0)
    class Cleaner:
        def ask(self):
            from ray.train.v2._internal.state.util import is_actor_alive

            return os.environ.get("RAY_ADDRESS"), is_actor_alive(actor_id=ray.get_runtime_context().get_actor_id(),
                                                                 timeout=10)

    try:
        cleaner = Cleaner.options(lifetime="detached").remote()
        address, alive = ray.get(cleaner.ask.remote(), timeout=120)
        ray.kill(cleaner)
    finally:
        kill_with_env("SHORTFT_TEST_OTHER_RAY", "1")
        if os.path.exists(get_ray_address_file(None)) and open(get_ray_address_file(None)).read() == other:
            os.remove(get_ray_address_file(None))
    assert alive is True, alive  # None: "no such actor", the other cluster's answer
    assert address == ray.get_runtime_context().gcs_address != other


def _lora(out_dir):
    d = os.path.join(out_dir, "lora")
    names = json.load(open(os.path.join(d, "shortft_lora.json")))["adapters"]
    return {f"{n}/{k}": v for n in names
            for k, v in load_file(os.path.join(d, n, "pytorch_lora_weights.safetensors")).items()}


def _rows(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


SMALL = ["chain.steps=6", "chain.segments=2", "eval.samples_per_prompt=1"]


@pytest.mark.slow
# The per-rank draws (`draws.draw_batch`) are shared by every method; what a method draws per sample after
# them (draft_lv's re-noise) is checked rank by rank in test_chain.py, without a Ray cluster.
@pytest.mark.parametrize("method", ["shortft"])
def test_two_workers_equal_one_process_with_twice_the_batch(ray_cluster, make_cfg, tmp_path, method):
    one = shortft.train(make_cfg(*SMALL, f"chain.method={method}", "train.steps=1", "train.batch_size=4",
                                 f"train.output_dir={tmp_path}/one"))
    cfg = make_cfg(*SMALL, f"chain.method={method}", "train.steps=1", "train.batch_size=2",
                   f"train.output_dir={tmp_path}/two")
    two = train_with_ray(cfg, workers=2, storage_path=str(tmp_path / "ray"), tracking_uri=None, cpus_per_worker=1)
    a, b = _lora(one.output_dir), _lora(two.output_dir)
    delta_a = torch.cat([a[k].flatten() for k in sorted(a)])
    delta_b = torch.cat([b[k].flatten() for k in sorted(a)])
    assert (delta_a - delta_b).norm() / delta_a.norm() <= 1e-5
    # the all-reduced gradient and loss, as reported by the step, match the single process's
    ra, rb = _rows(one.output_dir)[0], _rows(two.output_dir)[0]
    assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-5)
    assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)


@pytest.mark.slow
def test_worker_death_restarts_from_checkpoint_and_logs_each_step_once(ray_cluster, make_cfg, tmp_path, monkeypatch):
    common = [*SMALL, "train.steps=5", "train.batch_size=1", "train.checkpoint_every=1", "chain.method=alignprop"]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    straight = train_with_ray(make_cfg(*common, f"train.output_dir={tmp_path}/straight"), workers=2,
                              storage_path=str(tmp_path / "ray"), tracking_uri=None, cpus_per_worker=1,
                              name="straight")
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "3")
    cfg = make_cfg(*common, f"train.output_dir={tmp_path}/faulty")
    faulty = train_with_ray(cfg, workers=2, storage_path=str(tmp_path / "ray"), tracking_uri=uri, max_failures=1,
                            cpus_per_worker=1, experiment="fault")
    assert (tmp_path / "faulty/.fault-injected").read_text() == "3"  # the worker did die
    a, b = _lora(straight.output_dir), _lora(faulty.output_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    client = tracking.client(uri)
    exp = client.get_experiment_by_name("fault")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    for key in ("loss", "grad_norm", "reward/symmetry"):
        steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, key)]
        assert sorted(steps) == list(range(1, 6)), key


@pytest.mark.slow
def test_a_ray_run_resumes_with_changed_settings_as_a_run_in_one_process_does(ray_cluster, make_cfg, tmp_path,
                                                                              monkeypatch):
    """A Ray run was named by a digest of its whole config: `--resume` with a longer `train.steps` (or a
    setting an out-of-memory line offers) named another run, found none, and was refused with the advice
    to resume in one process. The name is the run folder's now: the resume goes on (the worker names
    what changed), and one whose LoRAs would not fit is refused as in one process."""
    import yaml

    from shortft.config import ConfigError

    common = [*SMALL, "train.batch_size=1", "train.checkpoint_every=1", f"train.output_dir={tmp_path}/run"]
    kw = dict(workers=1, storage_path=str(tmp_path / "ray"), tracking_uri=None, cpus_per_worker=1)
    first = train_with_ray(make_cfg(*common, "train.steps=2"), **kw)
    # the checkpoint named is the one in the storage path, not a temporary copy of it
    with pytest.raises(ConfigError, match=re.escape(f"resume: the checkpoint {tmp_path / 'ray' / first.run_name}/step_"
                                                    "000002 was written with lora.rank=4; this run has lora.rank=8")):
        train_with_ray(make_cfg(*common, "train.steps=3", "lora.rank=8"), resume=True, **kw)
    more = train_with_ray(make_cfg(*common, "train.steps=3", "chain.checkpointing=true"), resume=True, **kw)
    assert more.run_name == first.run_name and more.metrics["step"] == 3
    assert [row["step"] for row in _rows(more.output_dir)] == [1, 2, 3]
    written = yaml.safe_load((more.output_dir / "config.yaml").read_text())
    assert written["train"]["steps"] == 3 and written["chain"]["checkpointing"] is True
    # a moved run folder is still that Ray run (named by the folder's path, it was "no run ... to resume"),
    # resumed from another working folder without --storage-path: the storage path the run started with
    (tmp_path / "run").rename(tmp_path / "moved")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    moved = train_with_ray(make_cfg(*common, "train.steps=4", f"train.output_dir={tmp_path}/moved"), resume=True,
                           **{**kw, "storage_path": None})
    assert moved.run_name == first.run_name and moved.metrics["step"] == 4 and not list(Path.cwd().iterdir())
    assert [row["step"] for row in _rows(moved.output_dir)] == [1, 2, 3, 4]


def test_a_ray_run_is_named_by_its_run_folder_and_a_run_named_by_its_config_still_resumes(make_cfg, tmp_path):
    import hashlib

    from shortft.ray_storage import name_in_storage, run_name
    from shortft.config import to_dict

    cfg = make_cfg("train.steps=2")
    assert run_name(cfg) == run_name(make_cfg("train.steps=3", "chain.checkpointing=true"))
    assert run_name(cfg) != run_name(make_cfg(f"train.output_dir={tmp_path}/other"))
    storage = tmp_path / "ray"
    assert name_in_storage(cfg, str(storage), resume=True) == run_name(cfg)  # nothing there: the new name
    legacy = f"{cfg.name}-" + hashlib.sha1(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:8]
    (storage / legacy / "step_000002").mkdir(parents=True)
    assert name_in_storage(cfg, str(storage), resume=True) == legacy
    assert name_in_storage(cfg, str(storage), resume=False) == run_name(cfg)
    # a folder that moved here keeps the name it ran under; a copy whose original is still there does not
    from shortft import run_record

    (storage / "ran-under" / "step_000001").mkdir(parents=True)
    for original, exists in ((tmp_path / "gone", False), (tmp_path, True)):
        run_record.remember(cfg.output_dir, "ray", {"name": "ran-under"})
        record = json.loads((cfg.output_dir / run_record.FILE).read_text())
        (cfg.output_dir / run_record.FILE).write_text(json.dumps({**record, "folder": str(original)}))
        assert (name_in_storage(cfg, str(storage), resume=True) == "ran-under") is not exists


@pytest.mark.parametrize("rank", [0, 1])
def test_ray_train_gets_the_checkpoint_evaluation_and_last_steps_only(monkeypatch, tmp_path, rank):
    """Each report waits for the controller's next poll: a 13-step run with evaluations every 4 and
    checkpoints every 6 steps reports steps 4, 6, 8, 12 and 13 on every rank (the same steps: Ray Train
    needs that), rank 0 with its checkpoints, each with the mean seconds of all steps so far."""
    from types import SimpleNamespace

    import ray.train  # a submodule: `ray.train` is only an attribute once imported (alone, this test ran first)

    from shortft.ray_reports import RayReport

    reports = []
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node"))
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None, checkpoint_dir_name=None:
                        reports.append((metrics, checkpoint_dir_name)))
    cb = RayReport(rank, eval_every=4, checkpoint_every=6)
    for step in range(1, 14):
        saved = step % 6 == 0 or step == 13
        artifacts = {"checkpoint": tmp_path} if rank == 0 and saved else {}
        cb.on_step(step, {"step": step, "seconds_per_step": float(step), "peak_memory_mb": 100.0 - step}, artifacts)
    cb.on_end(None)
    assert [m["step"] for m, _ in reports] == [4, 6, 8, 12, 13]
    assert [name for _, name in reports] == ([None, "step_000006", None, "step_000012", "step_000013"] if rank == 0
                                             else [None] * 5)
    assert reports[0][0]["mean_seconds_per_step"] == 2.5 and reports[-1][0]["mean_seconds_per_step"] == 7.0
    assert all(m["peak_memory_mb"] == 99.0 and m["node_id"] == "node" for m, _ in reports)
    cb.on_end(None)  # the last step is not reported twice
    assert len(reports) == 5

    # Given the run's settings, a last step on the schedule waits for the end of the run (LoRA saved,
    # MLflow told): in a sweep, Tune may stop the trial at that report and kill its workers.
    from shortft.space import trial_config

    reports.clear()
    cb = RayReport(rank, eval_every=4, checkpoint_every=6, train=trial_config("toy", {"train.steps": 12}, {}).train)
    for step in range(1, 13):
        cb.on_step(step, {"step": step, "seconds_per_step": 1.0, "peak_memory_mb": 1.0}, {})
    assert [m["step"] for m, _ in reports] == [4, 6, 8]
    cb.on_end(None)
    assert [m["step"] for m, _ in reports] == [4, 6, 8, 12]


@pytest.mark.parametrize("flag,value,word", [("--storage-path", "/proc/no-such/dir", "storage path"),
                                             ("--tracking-uri", "http://127.0.0.1:9", "tracking URI")])
def test_bad_storage_or_tracking_fails_before_workers_start(tmp_path, flag, value, word):
    args = [sys.executable, "-m", "shortft.cli", "train", "--config", "tiny", "--workers", "2", flag, value]
    if flag != "--tracking-uri":
        args += ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    p = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and word in lines[0] and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "ray_results").exists()


def test_a_remote_storage_path_that_does_not_answer_is_one_line_in_bounded_time(monkeypatch):
    """pyarrow's GCS client retried an unreachable gs:// path for more than a minute before any error."""
    import time

    import pyarrow.fs

    from shortft import ray_storage
    from shortft.config import ConfigError

    monkeypatch.setattr(ray_storage, "STORAGE_CHECK_S", 0.5)
    class Unanswered:  # pyarrow's own FileSystem is an immutable type
        @staticmethod
        def from_uri(uri):
            time.sleep(30)

    monkeypatch.setattr(pyarrow.fs, "FileSystem", Unanswered)
    t0 = time.time()
    with pytest.raises(ConfigError, match=r"^storage path gs://b/sweeps: no answer within 0.5 s; check the network"):
        ray_storage.check_storage_path("gs://b/sweeps")
    assert time.time() - t0 < 5


@pytest.mark.slow
def test_cli_two_workers_on_toy_config_logs_everything_to_mlflow(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    p = subprocess.run([sys.executable, "-m", "shortft.cli", "train", "--config", "toy", "--workers", "2",
                        "--tracking-uri", uri, "--storage-path", str(tmp_path / "ray"), "--experiment", "cli",
                        "train.steps=6", "chain.steps=10", "chain.segments=2", "train.batch_size=1",
                        "eval.samples_per_prompt=1", "eval.every=0", f"train.output_dir={tmp_path}/out"],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path,
                       env={**os.environ, "RAY_num_cpus": "4"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "mlflow ui --backend-store-uri" in p.stdout
    assert "PreemptionWatcher" not in p.stderr  # Ray's core-worker error line of every local `--workers` run
    done = next(line for line in p.stdout.splitlines() if line.startswith("done: run "))
    folder = Path(done.rpartition("; checkpoints in ")[2])  # the run's own folder, not the storage path's root
    assert folder.parent == tmp_path / "ray" and sorted(folder.glob("checkpoint_*")), done
    client = tracking.client(uri)
    runs = client.search_runs([client.get_experiment_by_name("cli").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["chain.method"] == "shortft" and run.data.params["lora.rank"] == "8"
    assert run.data.tags["shortft.workers"] == "2"  # its params alone are a one-process run's of half the batch
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    # Between two steps the workers wait for Ray Train's controller to take the report: by default it
    # polls every 2 s, which held every step to at least 2 s (distributed.POLL_INTERVAL_ENV)
    logged = [m.timestamp / 1000 for m in client.get_metric_history(run.info.run_id, "loss")]
    seconds = [m.value for m in client.get_metric_history(run.info.run_id, "seconds_per_step")]
    waits = [b - a - s for a, b, s in zip(logged, logged[1:-1], seconds[1:-1])]  # the last step also saves
    assert sorted(waits)[len(waits) // 2] < 1.0, waits
    assert "eval/toy_judge_accuracy" in run.data.metrics
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"samples", "lora", "config.yaml"} <= top
    assert [a.path for a in client.list_artifacts(run.info.run_id, "samples")] == ["samples/step_000006.png"]
    lora = {a.path for a in client.list_artifacts(run.info.run_id, "lora")}
    assert "lora/segment_1" in lora and "lora/shortft_lora.json" in lora


def test_the_trainer_starts_no_dataset_manager_without_datasets():
    """Ray Train's dataset callback starts a DatasetManager actor even for a job with no datasets: one
    process start per job that the project's jobs (no datasets) drop; every other callback stays."""
    from ray.train.torch import TorchTrainer

    from shortft.distributed import lean_trainer

    def names(trainer):
        return [type(c).__name__ for c in trainer._create_default_callbacks()]

    plain = TorchTrainer(lambda: None)
    lean = lean_trainer(TorchTrainer)(lambda: None)
    assert "DatasetsCallback" in names(plain)
    assert names(lean) == [n for n in names(plain) if n != "DatasetsCallback"]


REWARD_MODULE = '''
from shortft.rewards import register


@register("{name}")
def mean_pixel(scale: float = 1.0):
    return lambda images, prompts: scale * images.mean(dim=(1, 2, 3))
'''


@pytest.mark.slow
def test_a_reward_term_of_the_users_own_trains_in_ray_workers(ray_cluster, make_cfg, tmp_path, monkeypatch):
    """A term registered by `import my_rewards` in the driver was unknown in the workers ("unknown reward",
    the run failed): they import only shortft. Named in `reward.modules` (a file, relative to where the
    config is read), every process imports it."""
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE.format(name="users_mean_pixel"))
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg(*SMALL, "train.steps=1", "reward.modules=[my_rewards.py]", "reward.weights.users_mean_pixel=1",
                   "reward.options.users_mean_pixel.scale=2")
    assert cfg.reward.modules == [str(tmp_path / "my_rewards.py")]  # made absolute: workers run elsewhere
    result = train_with_ray(cfg, workers=1, storage_path=str(tmp_path / "ray"), tracking_uri=None, cpus_per_worker=1)
    assert result.metrics["step"] == 1 and math.isfinite(result.metrics["reward/users_mean_pixel"])


def test_the_stop_request_of_a_workers_run_goes_through_the_storage_path(tmp_path):
    """The driver's Ctrl-C writes the request; rank 0's poller sees it within a second; a resume clears it.
    A storage URI with a query (MinIO's endpoint_override) once had the file's path appended to the query."""
    import time

    from shortft.ray_stop import StopChannel, _opened, polled

    assert _opened(StopChannel("s3://b/p?endpoint_override=localhost:9000&scheme=http", "run").where)[1] == (
        "b/p/run/.shortft-stop")
    channel = StopChannel(str(tmp_path / "ray"), "run")
    with polled(channel.where, every=0.05) as asked:
        time.sleep(0.2)
        assert asked() == 0
        channel.ask(15)
        t0 = time.time()
        while not asked() and time.time() - t0 < 5:
            time.sleep(0.05)
        assert asked() == 15
    channel.clear()
    with polled(channel.where, every=0.05) as asked:
        time.sleep(0.2)
        assert asked() == 0


def test_a_stop_request_that_cannot_be_written_aborts_the_run_with_the_reason(tmp_path, monkeypatch, capsys):
    """The workers cannot be asked (the storage unreachable, credentials expired): the first Ctrl-C aborts
    the run as Ray Train's own handler would, and says why, in place of waiting for a stop that never comes."""
    import signal
    import time

    import ray

    from shortft.interrupt import SIGNALS
    from shortft.ray_stop import StopChannel

    (tmp_path / "file").write_text("")  # the storage path's parent is a file: no folder can be made there
    aborted = []

    class Controller:
        class abort:
            @staticmethod
            def remote():
                aborted.append(time.time())
                return "ref"

    monkeypatch.setattr(ray, "get", lambda ref: ref)
    handlers = {s: signal.getsignal(s) for s in SIGNALS}
    channel = StopChannel(str(tmp_path / "file" / "ray"), "run")
    try:
        channel.handle(Controller())
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        t0 = time.time()
        while not aborted and time.time() - t0 < 10:
            time.sleep(0.05)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    err = capsys.readouterr().err
    assert aborted and channel.signal == signal.SIGTERM, err
    assert "shortft: SIGTERM: the workers stop after this step" in err
    assert f"shortft: the stop request could not be written to {tmp_path / 'file' / 'ray'} (" in err
    assert err.rstrip().endswith(": aborting the run now"), err


def test_a_workers_copy_of_a_remote_checkpoint_is_removed_when_its_training_fails(make_cfg, tmp_path, monkeypatch):
    """A worker resuming from s3:// copies the checkpoint to a temporary folder (an SDXL one: 4 GiB), removed
    only when training ended well: each restart of a failing group left another copy."""
    import tempfile
    import types

    import ray.train

    import shortft.loop
    from shortft import distributed
    from shortft.config import to_dict

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    class Remote:  # a checkpoint on another filesystem: the worker copies it
        filesystem = None

        def to_directory(self, path):
            (Path(path) / "state.json").write_text("{}")
            return path

    context = types.SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1)
    monkeypatch.setattr(ray.train, "get_context", lambda: context)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: Remote())

    def fails(cfg, callbacks, resume, **kw):
        assert list(scratch.glob("shortft-resume-0-*/state.json"))  # the copy, there while training
        raise RuntimeError("a crash")

    monkeypatch.setattr(shortft.loop, "train", fails)
    config = {"cfg": to_dict(make_cfg()), "use_gpu": False, "threads": 1, "tracking_uri": None}
    with pytest.raises(RuntimeError, match="a crash"):
        distributed._worker(config)
    assert not list(scratch.iterdir())


_BUILD_AS_RANK = """
import os, sys
import torch
import torch.distributed as dist

def build(rank):
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
    if rank == 1:  # a Ray Train worker of rank 1 that reached the cache first
        os.environ["SHORTFT_CACHE"] = sys.argv[1]
        from shortft.builtin import resolve
        resolve("builtin:tiny")
    dist.barrier()
    dist.destroy_process_group()

torch.multiprocessing.start_processes(build, nprocs=2, start_method="fork")
"""


def test_a_builtin_model_built_by_a_worker_of_rank_1_is_whole_and_a_broken_cache_is_rebuilt(tmp_path, monkeypatch):
    """transformers writes a model's weights on rank 0 alone once a process group exists: the first
    `--workers 2` run of a machine could leave ~/.cache/shortft/tiny-v1 with an empty text_encoder/ (rank 1's
    build won the race), and every later run of builtin:tiny, in one process too, failed to load it."""
    from shortft import builtin

    done = subprocess.run([sys.executable, "-c", _BUILD_AS_RANK, str(tmp_path / "cache"), str(tmp_path / "rdv")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    built = tmp_path / "cache" / "tiny-v1"
    assert sorted(p.name for p in (built / "text_encoder").iterdir()) == ["config.json", "model.safetensors"]
    for f in (built / "text_encoder").iterdir():  # a cache that bug left (text_encoder/ empty): built again
        f.unlink()
    monkeypatch.setenv("SHORTFT_CACHE", str(tmp_path / "cache"))
    assert builtin.resolve("builtin:tiny") == str(built) and builtin.complete(built)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["tiny-v1"]  # nothing set aside is left
