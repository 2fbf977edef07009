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

import json
import os
import shutil
import signal
import tempfile
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from shortft import attempts, checkpoint, new_run, raised, resources, run_record, run_status, run_store, tracking
from shortft.config import Config, ConfigError, from_dict, to_dict
from shortft.guard import NonFiniteError
from shortft.interrupt import SIGNALS, Interrupted
from shortft.loop import Callback
from shortft.mlflow_logger import MlflowLogger
from shortft.mlflow_relay import start_relay
from shortft.memory import OutOfMemory
from shortft.progress import warn
from shortft.ray_reports import BEST_AND_LATEST, FAULT_MARKER, FaultInjector, RayReport, fault_request, readable
from shortft.ray_stop import StopChannel, polled
from shortft.run_lock import FolderInUse
from shortft.ray_storage import (check_resumed_workers, check_storage_path, name_in_storage, resolve_storage_path,
                                 run_exists)


def _quiet_report_lines() -> None:
    """Ray Train logs every report at INFO with its whole metrics dict (an evaluation's per-sample scores
    included), once per rank: hundreds of long lines in a run. Its logger is named by its file, so
    `ray.train`'s log level misses it; our step lines say the same. A failing worker also logs its
    traceback (`Error in training function`), which the controller's failure report and the error the
    driver gets repeat: that one goes too."""
    import logging

    logging.getLogger("ray.train.v2._internal.util").setLevel(logging.CRITICAL)
    try:
        from ray.train.v2._internal.execution import context  # listed in sweep/ray_compat.py
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _worker(config: dict) -> None:
    import ray.train
    import torch

    from shortft.loop import train

    _quiet_report_lines()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = from_dict(Config, config["cfg"])
    if config["use_gpu"]:
        cfg.model.device = str(ray.train.torch.get_device())
    else:
        torch.set_num_threads(max(1, config["threads"]))
    resume: bool | checkpoint.Fallback = False
    ckpt = ray.train.get_checkpoint()
    # from s3:// or gs://, a copy (an SDXL checkpoint: 4 GiB), kept until training ends, however it ends
    local = Path(tempfile.mkdtemp(prefix=f"shortft-resume-{rank}-")) if ckpt is not None else None
    callbacks: list[Callback] = []
    if config["tracking_uri"] and rank == 0:  # before the report: it may be the trial's last act in a sweep
        callbacks.append(MlflowLogger(config["tracking_uri"], config["run_id"], rank, config["relay"],
                                               cfg.output_dir / "metrics.jsonl"))
    callbacks.append(RayReport(rank, cfg.eval.every, cfg.train.checkpoint_every, cfg.train))
    if config.get("fail_at"):
        callbacks.append(FaultInjector(rank, config["fail_at"], config["fail_rank"], Path(config["fail_marker"])))
    stop_file = config.get("stop_file") if rank == 0 else None  # rank 0 reads it; the step's all-reduce tells the rest
    try:
        if ckpt is not None:  # Ray's latest, or the one before if it is unreadable
            resume = checkpoint.Fallback(readable(ckpt, local))
        with polled(stop_file) if stop_file else nullcontext(None) as asked:
            with attempts.once(cfg.output_dir, config.get("attempt")):  # Ray Train's restart of a final failure: at once
                train(cfg, callbacks, resume=resume, rank=rank, world_size=world, asked=asked,
                      new_run_checked=True)
    except Interrupted:  # the driver asked; the step's checkpoint is reported. Ending normally: no restart
        pass
    finally:  # also when training raises: each restart of the group made another copy
        if local is not None:
            shutil.rmtree(local, ignore_errors=True)


def _aborted(sig: signal.Signals | None, name: str, workers: int) -> Interrupted:
    """The line of a run Ray Train aborted (a second signal, or a stop request that could not be written)."""
    sig = sig or signal.SIGINT
    return Interrupted(f"{sig.name}: Ray Train run {name} aborted; continue it with --resume --workers {workers} (from "
                       "the latest checkpoint Ray Train recorded)", 128 + int(sig))


def lean_trainer(base: type, stop: StopChannel | None = None) -> type:
    """`base` (TorchTrainer) without Ray Train's dataset callback when the job has no datasets (ours
    never has): that callback starts a DatasetManager actor, one more process start per job (seconds on
    a small machine, per sweep trial). If a later Ray renames the hook, this is the plain trainer.
    With `stop`, Ctrl-C or SIGTERM while `fit` waits (main thread) asks the workers to stop after the
    step in progress (`ray_stop`) in place of Ray Train's abort. A failure that a retry cannot change is
    raised at once, without Ray's restart and its logged tracebacks (`ray_policy`)."""

    class LeanTrainer(base):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if getattr(self, "datasets", None):
                return callbacks
            return [c for c in callbacks if type(c).__name__ != "DatasetsCallback"]

        def _register_sigint_handler(self, controller):
            if stop is None:
                return super()._register_sigint_handler(controller)
            stop.handle(controller)

        def _initialize_and_run_controller(self, **kwargs):
            try:
                from shortft.ray_policy import FinalRaises  # Ray's private names: listed in sweep/ray_compat.py
            except ImportError:  # moved in a later Ray: its own policy (restart, then attempts.once)
                return super()._initialize_and_run_controller(**kwargs)
            kwargs["failure_policy"] = FinalRaises(self.run_config.failure_config)
            return super()._initialize_and_run_controller(**kwargs)

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
    """The one-line error a worker raised (ConfigError, Unreadable, NonFiniteError, CheckpointWriteError,
    OutOfMemory), found in the error Ray Train raises around it (the worker's traceback, ending in `module.Type: line`),
    as itself; the CLI prints it as one line. None for anything else."""
    known = {cls.__name__: cls for cls in (ConfigError, checkpoint.Unreadable, NonFiniteError,
                                           checkpoint.CheckpointWriteError, OutOfMemory, FolderInUse)}
    kind, line = raised.found(error) or (None, None)
    if kind == OutOfMemory.__name__:  # retried as in one process where others held the memory
        return OutOfMemory.from_line(line)
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
                   check_resources: bool = True, keep_best: bool = False) -> RayTrainResult:
    """Fine-tune with Ray Train over `workers` workers. tracking_uri "" = default, None = no MLflow.
    `callbacks` are Ray Train callbacks (the sweep passes one that reports evaluations to Tune).
    `resource_wait_s`: give up (ResourceWaitError) if the worker group is not placed within that many
    seconds; None = Ray's default (retry every 60 s, forever). `check_resources`: False where the
    caller (a sweep's driver) has checked the request already. `keep_best`: the storage path keeps the
    best-evaluated checkpoint and the latest (a sweep's trial), not the latest `train.keep_checkpoints`."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if workers < 1:
        raise ConfigError(f"--workers {workers}: must be >= 1 for Ray Train (0 runs in-process)")
    if tracking_uri == "":  # the default; a resume's: the store the run started in
        tracking_uri, _, note = run_store.settle(cfg.output_dir, None, experiment, resume)
        if note:
            warn(f"shortft: note: {note}")
    if tracking_uri:
        tracking_uri = tracking.resolve_uri(tracking_uri)
    kept, own = run_record.recorded(cfg.output_dir, "ray")
    if storage_path is None and resume and own and isinstance(kept.get("storage_path"), str):
        storage_path = kept["storage_path"]  # where the run started, from any working folder
        if storage_path != resolve_storage_path(None):
            warn(f"shortft: note: resuming from the run's storage path {storage_path} (--storage-path to name another)")
    storage_path = resolve_storage_path(storage_path)
    check_storage_path(storage_path)
    name = name or name_in_storage(cfg, storage_path, resume)
    exists = run_exists(storage_path, name)
    if exists and not resume:
        raise ConfigError(f"run {name} already exists in {storage_path}; pass --resume to continue it, or set "
                          "name=<new name> to start another")
    if resume and exists:
        check_resumed_workers(storage_path, name, workers)
    if not resume:
        # a run of one process there: the workers would write beside it
        new_run.check_new_run(cfg.output_dir, cfg.train.output_dir, cfg.train.steps)
    local = checkpoint.latest(cfg.output_dir / "checkpoints") if resume and not exists else None
    if local is not None:  # Ray would start from step 0 and write over that run: say so instead
        written_by = json.loads((local / "state.json").read_text()).get("world_size", 1)
        how = (f"with --workers {written_by} and the --storage-path it was written to" if written_by > 1 else
               "in one process (no --workers), or, if --workers 1 wrote it, with the --storage-path it was written to")
        raise ConfigError(f"resume: {storage_path} holds no run {name} for Ray to resume, and {local} is a checkpoint "
                          f"of {written_by} worker(s); resume it {how}")
    if resume and not exists:  # as a resume in one process says it (a mistyped name started at 0 without a word)
        warn(f"shortft: note: {storage_path} holds no run {name} to resume; starting from step 0")
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
                                          gpu_flag="--gpu", gpu_fix="drop --gpu", who="the run"))
    run_record.remember(cfg.output_dir, "ray", {"name": name, "storage_path": storage_path})  # found after a move
    own_run = bool(tracking_uri and not run_id)  # a sweep's trial run is the sweep's to close
    if own_run:  # found again from any folder, and after the run folder moved
        run_id = run_store.open_run(tracking_uri, experiment, name, name, cfg, reuse=resume, workers=workers)
        run_store.remember(cfg.output_dir, tracking_uri, experiment, run_id)
    with run_status.kept(tracking_uri if own_run else None, run_id):  # KILLED or FAILED if it raises
        relay = start_relay(tracking_uri) if tracking_uri else None  # found again if the sweep started it
        if resource_wait_s:  # Ray Train reads it in its controller, which gets it from this process's environment
            os.environ[WORKER_GROUP_START_TIMEOUT_ENV] = str(resource_wait_s)
        os.environ.setdefault(POLL_INTERVAL_ENV, POLL_INTERVAL_S)
        fail_at, fail_rank = fault_request()  # read here: workers on other nodes lack this environment
        stop = StopChannel(storage_path, name)
        asks = threading.current_thread() is threading.main_thread()  # signals reach it; not a sweep's trial
        if asks:
            stop.clear()
        loop_config = {
            "cfg": to_dict(cfg), "use_gpu": use_gpu, "threads": threads or max(1, int(cpus)),
            "tracking_uri": tracking_uri, "run_id": run_id, "relay": relay, "fail_at": fail_at, "fail_rank": fail_rank,
            "fail_marker": str(Path(cfg.train.output_dir) / FAULT_MARKER), "attempt": attempts.new_attempt(),
            "stop_file": stop.where if asks else None,
        }
        trainer = lean_trainer(TorchTrainer, stop if asks else None)(
            _worker,
            train_loop_config=loop_config,
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={
                "CPU": cpus, **({"GPU": gpus_per_worker} if use_gpu else {})}),
            run_config=RunConfig(name=name, storage_path=storage_path,
                                 # a worker group that was not placed in time is retried forever unless this is 0
                                 failure_config=FailureConfig(max_failures=max_failures,
                                                              controller_failure_limit=0 if resource_wait_s else -1),
                                 checkpoint_config=CheckpointConfig(**BEST_AND_LATEST) if keep_best else
                                 CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                                 callbacks=callbacks or []),
        )
        handlers = {s: signal.getsignal(s) for s in SIGNALS} if asks else {}  # fit replaces SIGINT's (StopChannel)
        try:
            result = trainer.fit()
        except SystemExit:  # a second Ctrl-C aborted the run; fit then ends in Ray's SystemExit(1)
            raise _aborted(stop.signal, name, workers) from None
        except Exception as e:
            told = _one_line_error(e)
            if told is not None:  # a worker's own one-line error (a refused checkpoint, out of GPU memory, ...)
                raise told from None
            if stop.signal is not None:  # aborted after a stop was asked: the controller died under fit
                raise _aborted(stop.signal, name, workers) from None
            if resource_wait_s and _placement_timed_out(e):
                raise ResourceWaitError(
                    f"--resource-wait-s {resource_wait_s:g}: the {workers} worker(s) of {cpus:g} CPU"
                    + (f" + {gpus_per_worker:g} GPU" if use_gpu else "")
                    + f" were not placed within {resource_wait_s:g} s (the cluster never had them free)") from None
            raise
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
        if stop.signal is not None and (result.metrics or {}).get("interrupted"):  # the workers stopped as asked
            raise Interrupted(f"{stop.signal.name}: Ray Train run {name} stopped after step {result.metrics['step']}; "
                              f"checkpoint {result.checkpoint.path if result.checkpoint else None}; continue with "
                              f"--resume --workers {workers}", 128 + int(stop.signal))
        return RayTrainResult(name, storage_path, Path(cfg.train.output_dir), run_id, dict(result.metrics or {}),
                              result.checkpoint.path if result.checkpoint else None)
