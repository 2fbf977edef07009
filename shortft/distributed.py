"""Ray Train: the same training loop as `shortft train`, as a TorchTrainer over N workers.

Each worker runs `shortft.loop.train` with its rank: the batch is sharded by rank, LoRA gradients and
metrics are averaged over ranks (gloo on CPU, NCCL on GPU), rank 0 writes files and logs to MLflow,
and every worker reports the checkpoint, evaluation and last steps to Ray Train (with rank 0's
checkpoint when one was written).
A restarted worker group resumes from the latest reported checkpoint (`FailureConfig.max_failures`).

    from shortft.distributed import train_with_ray
    result = train_with_ray(cfg, workers=2)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from shortft import attempts, checkpoint, raised, resources, tracking
from shortft.config import Config, ConfigError, from_dict, to_dict
from shortft.guard import NonFiniteError
from shortft.interrupt import Interrupted
from shortft.loop import Callback
from shortft.mlflow_relay import start_relay
from shortft.memory import OutOfMemory
from shortft.ray_reports import FAULT_MARKER, FaultInjector, RayReport, fault_request, readable


def run_name(cfg: Config) -> str:
    """The Ray run of `cfg`'s run folder: `--resume` finds it whatever settings changed since (a longer
    `train.steps`, the settings an out-of-memory line offers), as a run in one process is its folder.
    The name was a digest of the whole config: any changed setting named another run, and the resume
    was refused."""
    digest = hashlib.sha1(str(cfg.output_dir.resolve()).encode()).hexdigest()[:8]
    return f"{cfg.name}-{digest}"


def name_in_storage(cfg: Config, storage_path: str, resume: bool) -> str:
    """`run_name(cfg)`; on `resume`, a run that an earlier version named by its config digest (the
    same config) where only that one is in the storage path."""
    name = run_name(cfg)
    if resume and not _run_exists(storage_path, name):
        digest = hashlib.sha1(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:8]
        if _run_exists(storage_path, f"{cfg.name}-{digest}"):
            return f"{cfg.name}-{digest}"
    return name


def default_storage_path() -> str:
    return str(Path("ray_results").resolve())


STORAGE_CHECK_S = 30.0  # a remote storage path that has not answered by then is not usable from here


def check_storage_path(path: str) -> None:
    """Fail before any worker starts if checkpoints could not be written there."""
    if "://" in path:
        import threading

        import pyarrow.fs

        failed: list[BaseException] = []

        def probe() -> None:
            try:
                fs, root = pyarrow.fs.FileSystem.from_uri(path)
                fs.create_dir(root, recursive=True)
            except Exception as e:  # any failure means: not usable from here
                failed.append(e)

        # pyarrow's GCS client retries an unreachable endpoint for minutes (seen: over 60 s offline)
        asking = threading.Thread(target=probe, daemon=True)
        asking.start()
        asking.join(STORAGE_CHECK_S)
        if asking.is_alive():
            raise ConfigError(f"storage path {path}: no answer within {STORAGE_CHECK_S:g} s; check the network, the "
                              "URI and credentials, or pass another --storage-path")
        if failed:
            e = failed[0]
            raise ConfigError(f"storage path {path}: not writable ({type(e).__name__}: {e}); check the URI and "
                              "credentials or pass another --storage-path") from None
        return
    p = Path(path).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"storage path {path}: not writable ({e.strerror or e}); pass --storage-path to a "
                          "writable directory (or s3://..., an NFS mount on clusters)") from None


def _run_exists(storage_path: str, name: str) -> bool:
    if "://" in storage_path:
        import pyarrow.fs

        fs, root = pyarrow.fs.FileSystem.from_uri(storage_path)
        return fs.get_file_info(f"{root}/{name}").type != pyarrow.fs.FileType.NotFound
    d = Path(storage_path).expanduser() / name
    return d.is_dir() and any(d.iterdir())


def _worker(config: dict) -> None:
    import ray.train
    import torch

    from shortft.loop import train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = from_dict(Config, config["cfg"])
    if config["use_gpu"]:
        cfg.model.device = str(ray.train.torch.get_device())
    else:
        torch.set_num_threads(max(1, config["threads"]))
    resume: bool | str = False
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        local = Path(tempfile.mkdtemp(prefix=f"shortft-resume-{rank}-"))
        resume = str(readable(ckpt, local))
    callbacks: list[Callback] = []
    if config["tracking_uri"] and rank == 0:  # before the report: it may be the trial's last act in a sweep
        callbacks.append(tracking.MlflowLogger(config["tracking_uri"], config["run_id"], rank, config["relay"],
                                               cfg.output_dir / "metrics.jsonl"))
    callbacks.append(RayReport(rank, cfg.eval.every, cfg.train.checkpoint_every, cfg.train))
    if config.get("fail_at"):
        callbacks.append(FaultInjector(rank, config["fail_at"], config["fail_rank"], Path(config["fail_marker"])))
    with attempts.once(cfg.output_dir, config.get("attempt")):  # Ray Train's restart of a final failure: at once
        train(cfg, callbacks, resume=resume, rank=rank, world_size=world)
    if resume:
        shutil.rmtree(local, ignore_errors=True)


def lean_trainer(base: type) -> type:
    """`base` (TorchTrainer) without Ray Train's dataset callback when the job has no datasets (ours
    never has): that callback starts a DatasetManager actor, one more process start per job (seconds on
    a small machine, per sweep trial). If a later Ray renames the hook, this is the plain trainer."""

    class LeanTrainer(base):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if getattr(self, "datasets", None):
                return callbacks
            return [c for c in callbacks if type(c).__name__ != "DatasetsCallback"]

    return LeanTrainer


@dataclass
class RayTrainResult:
    run_name: str
    storage_path: str
    output_dir: Path
    run_id: str | None
    metrics: dict
    checkpoint_path: str | None


WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
# Ray Train's controller takes one report per poll, every 2 s by default, and a worker's `report` waits
# for it: every step (all are reported) took at least 2 s. Read by the controller, which Ray Train gives
# the environment of the process that fits the trainer (this one), wherever it runs.
POLL_INTERVAL_ENV, POLL_INTERVAL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"


def _one_line_error(error: Exception) -> Exception | None:
    """The one-line error a worker raised (ConfigError, NonFiniteError, CheckpointWriteError, OutOfMemory),
    found in the error Ray Train raises around it (the worker's traceback, ending in `module.Type: line`),
    as itself; the CLI prints it as one line. None for anything else."""
    known = {cls.__name__: cls for cls in (ConfigError, NonFiniteError, checkpoint.CheckpointWriteError, OutOfMemory)}
    kind, line = raised.found(error) or (None, None)
    return known[kind](line) if kind in known else None


class ResourceWaitError(RuntimeError):
    """A Ray Train job whose workers were not placed within `--resource-wait-s`."""


def _placement_timed_out(error: BaseException) -> bool:
    # Ray Train V2 raises a ControllerError around a WorkerGroupStartupTimeoutError (names, not private imports).
    seen = 0
    while error is not None and seen < 10:
        if "WorkerGroupStartupTimeout" in type(error).__name__ or "WorkerGroupStartupTimeout" in type(
                getattr(error, "controller_failure", None)).__name__:
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def train_with_ray(cfg: Config, workers: int, use_gpu: bool = False, storage_path: str | None = None,
                   max_failures: int = 0, tracking_uri: str | None = "", experiment: str = tracking.DEFAULT_EXPERIMENT,
                   resume: bool = False, cpus_per_worker: float | None = None, run_id: str | None = None,
                   name: str | None = None, threads: int | None = None, gpus_per_worker: float = 1.0,
                   callbacks: list | None = None, resource_wait_s: float | None = None,
                   check_resources: bool = True) -> RayTrainResult:
    """Fine-tune with Ray Train over `workers` workers. tracking_uri "" = default, None = no MLflow.
    `callbacks` are Ray Train callbacks (the sweep passes one that reports evaluations to Tune).
    `resource_wait_s`: give up (ResourceWaitError) if the worker group is not placed within that many
    seconds; None = Ray's default (retry every 60 s, forever). `check_resources`: False where the
    caller (a sweep's driver) has checked the request already."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if workers < 1:
        raise ConfigError(f"--workers {workers}: must be >= 1 for Ray Train (0 runs in-process)")
    if tracking_uri == "":
        tracking_uri = tracking.default_tracking_uri()
    if tracking_uri:
        tracking_uri = tracking.resolve_uri(tracking_uri)
    storage_path = storage_path or default_storage_path()
    check_storage_path(storage_path)
    name = name or name_in_storage(cfg, storage_path, resume)
    exists = _run_exists(storage_path, name)
    if exists and not resume:
        raise ConfigError(f"run {name} already exists in {storage_path}; pass --resume to continue it, or set "
                          "name=<new name> to start another")
    local = checkpoint.latest(cfg.output_dir / "checkpoints") if resume and not exists else None
    if local is not None:  # Ray would start from step 0 and write over that run: say so instead
        written_by = json.loads((local / "state.json").read_text()).get("world_size", 1)
        how = (f"with --workers {written_by} and the --storage-path it was written to" if written_by > 1 else
               "in one process (no --workers), or, if --workers 1 wrote it, with the --storage-path it was written to")
        raise ConfigError(f"resume: {storage_path} holds no run {name} for Ray to resume, and {local} is a checkpoint "
                          f"of {written_by} worker(s); resume it {how}")
    # Files written by rank 0 go to an absolute path, whatever the worker's working directory.
    cfg = from_dict(Config, to_dict(cfg))
    cfg.train.output_dir = str(cfg.output_dir.resolve())
    if not ray.is_initialized():  # a local Ray: its workers inherit this process's environment
        resources.connect(log_to_driver=True, logging_config=ray.LoggingConfig(log_level="ERROR"))
    cpus = cpus_per_worker
    if cpus is None:
        cpus = 1.0 if use_gpu else max(0.1, min(1.0, float(ray.cluster_resources().get("CPU", 1)) / workers))
    if check_resources:  # before anything is made (an MLflow run, the relay) and before the group waits
        resources.check(resources.Request(workers, cpus, gpus_per_worker if use_gpu else 0.0, workers_flag="--workers",
                                          gpu_flag="--gpu", gpu_fix="drop --gpu"))
    if tracking_uri and not run_id:
        run_id = tracking.ensure_run(tracking_uri, experiment, name, name, cfg)
    relay = start_relay(tracking_uri) if tracking_uri else None  # found again if the sweep started it
    if resource_wait_s:  # Ray Train reads it in its controller, which gets it from this process's environment
        os.environ[WORKER_GROUP_START_TIMEOUT_ENV] = str(resource_wait_s)
    os.environ.setdefault(POLL_INTERVAL_ENV, POLL_INTERVAL_S)
    fail_at, fail_rank = fault_request()  # read here: workers on other nodes lack this environment
    loop_config = {
        "cfg": to_dict(cfg), "use_gpu": use_gpu, "threads": threads or max(1, int(cpus)), "tracking_uri": tracking_uri,
        "run_id": run_id, "relay": relay, "fail_at": fail_at, "fail_rank": fail_rank,
        "fail_marker": str(Path(cfg.train.output_dir) / FAULT_MARKER), "attempt": attempts.new_attempt(),
    }
    trainer = lean_trainer(TorchTrainer)(
        _worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus, **({"GPU": gpus_per_worker} if use_gpu else {})}),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             # a worker group that was not placed in time is retried forever unless this is 0
                             failure_config=FailureConfig(max_failures=max_failures,
                                                          controller_failure_limit=0 if resource_wait_s else -1),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                             callbacks=callbacks or []),
    )
    try:
        result = trainer.fit()
    except SystemExit:  # Ray Train's own Ctrl-C handler aborted the run; fit then ends in Ray's SystemExit(1)
        raise Interrupted(f"SIGINT: Ray Train run {name} aborted; continue it with --resume --workers {workers} (from "
                          "the latest checkpoint Ray Train recorded)", 130) from None
    except Exception as e:
        told = _one_line_error(e)
        if told is not None:  # a worker's own one-line error (a refused checkpoint, out of GPU memory, ...)
            raise told from None
        if resource_wait_s and _placement_timed_out(e):
            raise ResourceWaitError(
                f"--resource-wait-s {resource_wait_s:g}: the {workers} worker(s) of {cpus:g} CPU"
                + (f" + {gpus_per_worker:g} GPU" if use_gpu else "") + f" were not placed within {resource_wait_s:g} s "
                "(the cluster never had them free)") from None
        raise
    return RayTrainResult(name, storage_path, Path(cfg.train.output_dir), run_id, dict(result.metrics or {}),
                          result.checkpoint.path if result.checkpoint else None)
