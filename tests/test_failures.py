"""Failures that must lose nothing: a checkpoint write that fails, the fp16 loss scale across a resume."""

import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import shortft
from shortft import checkpoint
from shortft.config import ConfigError
from shortft.guard import NonFiniteError
from shortft.memory import OutOfMemory


def test_a_full_disk_during_a_checkpoint_stops_the_run_and_keeps_the_previous(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg("train.steps=4", "train.checkpoint_every=2", "chain.steps=4", "chain.segments=2",
                   f"train.output_dir={tmp_path}/run")
    real_save = torch.save

    def save_until_step_4(obj, path, *args, **kwargs):
        if "step_000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save_until_step_4)
    with pytest.raises(checkpoint.CheckpointWriteError, match="step 4 .*No space left.*step_000002 is intact"):
        shortft.train(cfg)
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    root = tmp_path / "run/checkpoints"
    assert [p.name for p in checkpoint.list_checkpoints(root)] == ["step_000002"]
    assert not list(root.glob(".tmp-*"))  # the half-written one is gone
    assert shortft.train(cfg, resume=True).steps == 4  # the previous checkpoint loads and the run finishes


def test_cli_reports_a_failed_checkpoint_write_in_one_line(tmp_path, tiny_dir):
    code = ("import errno, sys, torch; from shortft import checkpoint; real = torch.save\n"
            "def fail(obj, path, *a, **k):\n"
            "    if 'step_000002' in str(path): raise OSError(errno.ENOSPC, 'No space left on device', str(path))\n"
            "    return real(obj, path, *a, **k)\n"
            "checkpoint.torch.save = fail\n"
            "from shortft.cli import main; sys.exit(main(sys.argv[1:]))")
    p = subprocess.run([sys.executable, "-c", code, "train", "train.steps=2", "train.checkpoint_every=2",
                        "chain.steps=4", "chain.segments=2", f"model.pretrained={tiny_dir}",
                        f"train.output_dir={tmp_path}/run", "--no-mlflow"], capture_output=True, text=True, timeout=300)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 1 and len(lines) == 1 and "No space left" in lines[0] and "Traceback" not in p.stderr, p.stderr


def _limited(size: int):
    """In the child: files may not grow past `size` bytes (write() fails with EFBIG, as on a full disk)."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


@pytest.mark.parametrize("limit,why", [(100_000, "torch.save could not write"), (8_000, "File too large (os error 27)")])
def test_a_checkpoint_the_disk_refuses_is_one_line_with_the_real_writers(tmp_path, tiny_dir, limit, why):
    """The test above stands torch.save in with one that raises OSError; on a full disk the real one raises a
    RuntimeError with no errno, and safetensors its own error: a traceback, the half-written checkpoint left."""
    run = ["train", "train.checkpoint_every=1", "chain.steps=4", "chain.segments=2", f"model.pretrained={tiny_dir}",
           f"train.output_dir={tmp_path}/run", "--no-mlflow", "eval.every=0"]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    first = subprocess.run([sys.executable, "-m", "shortft.cli", *run, "train.steps=1"], capture_output=True,
                           text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    p = subprocess.run([sys.executable, "-m", "shortft.cli", *run, "train.steps=2", "--resume"], capture_output=True,
                       text=True, timeout=300, env=env, preexec_fn=lambda: _limited(limit))
    told = ("resumed from", "shortft: sample grid not written")  # the grid before it: a warning, the run went on
    lines = [line for line in p.stderr.splitlines() if line.strip() and not line.startswith(told)]
    root = tmp_path / "run" / "checkpoints"
    assert p.returncode == 1 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert lines[0].startswith(f"shortft: error: checkpoint of step 2 not written to {root}: ") and why in lines[0]
    assert lines[0].endswith("free on that disk; step_000001 is intact, resume from it with --resume"), lines[0]
    assert not list(root.glob(".tmp-*")) and [c.name for c in checkpoint.list_checkpoints(root)] == ["step_000001"]


def test_a_sample_grid_the_disk_refuses_is_a_warning_and_the_steps_checkpoint_is_written(make_cfg, tmp_path,
                                                                                        monkeypatch, capsys):
    """The grid is written before the step's checkpoint: a full disk there lost the step (a traceback)."""
    import shortft.evaluate

    def full(images, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shortft.evaluate, "save_grid", full)
    cfg = make_cfg("train.steps=2", "train.checkpoint_every=2", "eval.every=2", "chain.steps=4", "chain.segments=2")
    assert shortft.train(cfg).steps == 2
    assert (f"sample grid not written to {cfg.output_dir}/samples/step_000002.png: No space left on device; the run "
            "goes on") in capsys.readouterr().err
    assert [c.name for c in checkpoint.list_checkpoints(cfg.output_dir / "checkpoints")] == ["step_000002"]


def test_a_second_process_in_a_run_folder_waits_for_the_first_then_is_refused(tmp_path, tiny_dir, monkeypatch,
                                                                             capsys):
    """Two `shortft train` in one folder (a resume started beside a running run, a requeued job while the old
    one still writes) trained side by side: each pruned the other's checkpoints and their steps went into one
    MLflow run. A new run was refused only once the first had a checkpoint."""
    from shortft import run_lock
    from shortft.cli import main

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from shortft import run_lock\n"
                               f"with run_lock.held({str(run)!r}):\n    print('held', flush=True); "
                               "time.sleep(float(sys.argv[1]))", "600"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv(run_lock.WAIT_ENV, "1")
        uri = f"sqlite:///{tmp_path}/m.db"
        args = ["train", "--config", "tiny", f"model.pretrained={tiny_dir}", "train.steps=1", "chain.steps=4",
                "chain.segments=2", f"train.output_dir={run}", "--tracking-uri", uri]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[0].startswith(f"shortft: train.output_dir {run} is in use by another run (pid {holder.pid} on ")
        assert err[-1].startswith(f"shortft: error: train.output_dir {run} is in use by another run (pid {holder.pid} "
                                  "on ") and err[-1].endswith(
            f"waited 1 s ({run_lock.WAIT_ENV}) for it to end: stop it, or set name=<new name> (or train.output_dir) to "
            "start another"), err
        from mlflow.tracking import MlflowClient

        assert not [r for e in MlflowClient(uri).search_experiments()
                    for r in MlflowClient(uri).search_runs([e.experiment_id])]  # refused before its MLflow run
    finally:
        holder.kill()
        holder.wait()
    # the lock ends with its process, however it ended (here: SIGKILL); a process that ends while waited for
    # is followed at once (a requeued job after the old one wrote its last checkpoint)
    short = subprocess.Popen([sys.executable, "-c", "import time; from shortft import run_lock\n"
                              f"with run_lock.held({str(run)!r}):\n    print('held', flush=True); time.sleep(2)"],
                             stdout=subprocess.PIPE, text=True)
    assert short.stdout.readline().strip() == "held"
    monkeypatch.setenv(run_lock.WAIT_ENV, "60")
    assert main([*args[:-2], "--no-mlflow"]) == 0
    short.wait()


# PyTorch's allocator report, in the form torch.OutOfMemoryError carries it on a CUDA card
CUDA_OOM = ("CUDA out of memory. Tried to allocate 1.25 GiB. GPU 0 has a total capacity of 23.52 GiB of which 1.18 GiB "
            "is free. Process 2752205 has 3.10 GiB memory in use. Including non-PyTorch memory, this process has 19.22 "
            "GiB memory in use. Of the allocated memory 16.63 GiB is allocated by PyTorch, and 2.12 GiB is reserved by "
            "PyTorch but unallocated. If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF="
            "expandable_segments:True to avoid fragmentation.  See documentation for Memory Management  "
            "(https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)")


@pytest.mark.parametrize("where", ["step", "evaluation"])
def test_out_of_gpu_memory_is_one_line_naming_the_settings_that_lower_the_peak(tmp_path, tiny_dir, where):
    """A card too small for the config ended the run in a page of traceback whose last line was PyTorch's
    allocator report, naming no setting of this project. The error is raised where the GPU raises it: inside
    the second step's chain (or its evaluation), after the first step's checkpoint."""
    target = "micro_batch_loss" if where == "step" else "evaluate"
    code = (f"import sys, torch, shortft.loop as loop; real = loop.{target}; calls = []\n"
            "def oom(*a, **k):\n"
            "    calls.append(1)\n"
            f"    if len(calls) == 2: raise torch.OutOfMemoryError({CUDA_OOM!r})\n"
            "    return real(*a, **k)\n"
            f"loop.{target} = oom\n"
            "from shortft.cli import main; sys.exit(main(sys.argv[1:]))")
    p = subprocess.run([sys.executable, "-c", code, "train", "train.steps=3", "train.checkpoint_every=1", "eval.every=1",
                        "chain.steps=4", "chain.segments=2", "train.batch_size=4", f"model.pretrained={tiny_dir}",
                        f"train.output_dir={tmp_path}/run", "--no-mlflow"], capture_output=True, text=True, timeout=300)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 1 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    at = "in step 2" if where == "step" else "in the evaluation at step 2"
    fixes = ("model.dtype=bfloat16 (the frozen weights in half the memory), chain.checkpointing=true (each call "
             "recomputed in backward), model.gradient_checkpointing=true, model.vae_checkpointing=true, "
             "train.batch_size=2 train.grad_accum=2 (the same images per step), model.vae_batch_size=1 (one image per "
             "decode)") if where == "step" else ("model.dtype=bfloat16 (the frozen weights in half the memory), "
                                                 "eval.batch_size=4, model.vae_batch_size=1 (one image per decode)")
    assert lines[0] == (f"shortft: error: out of GPU memory {at} (asked for 1.25 GiB with 1.18 GiB of 23.52 GiB free; "
                        f"another process holds 3.10 GiB); to lower the peak: {fixes}; PyTorch held memory it could "
                        "not hand out: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True; the checkpoints written so far "
                        "are kept")
    assert [c.name for c in checkpoint.list_checkpoints(tmp_path / "run/checkpoints")] == ["step_000001"]


def test_out_of_gpu_memory_in_shortft_eval_is_one_line(tiny_dir):
    code = ("import sys, torch, shortft.sample as sample\n"
            f"def oom(*a, **k): raise torch.OutOfMemoryError({CUDA_OOM!r})\n"
            "sample.evaluate_trained = oom\n"
            "from shortft.cli import main; sys.exit(main(sys.argv[1:]))")
    p = subprocess.run([sys.executable, "-c", code, "eval", f"model.pretrained={tiny_dir}", "chain.steps=4"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        "shortft: error: out of GPU memory in the evaluation (asked for 1.25 GiB with 1.18 GiB of 23.52 GiB free; "
        "another process holds 3.10 GiB); to lower the peak: model.dtype=bfloat16 (the frozen weights in half the "
        "memory), eval.batch_size=4, model.vae_batch_size=1 (one image per decode); PyTorch held memory it could not "
        "hand out: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"], p.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.xdist_group("ray")  # a Ray Train run: with the other tests that start Ray (see test_sweep.py)
def test_a_workers_one_line_error_reaches_the_user_as_that_line(tmp_path, tiny_dir):
    """`--workers N`: a worker's one-line error (here the loop's non-finite stop; out of GPU memory, a
    refused checkpoint and a failed checkpoint write take the same way) ended the command in the driver's
    traceback around Ray Train's WorkerGroupError, after Ray's echo of the worker's own. Ray Train's
    restart (--max-failures 1, the default) trained to the same stop again, and its failure policy logged
    the worker's traceback twice per decision (69 lines before the line); the group is now not restarted."""
    p = subprocess.run([sys.executable, "-m", "shortft.cli", "train", "--config", "tiny", f"model.pretrained={tiny_dir}",
                        "train.steps=4", "chain.steps=4", "chain.segments=2", "train.lr=1e30", "train.grad_clip=0",
                        "train.max_bad_steps=1", f"train.output_dir={tmp_path}/run", "--no-mlflow", "--workers", "1",
                        "--storage-path", str(tmp_path / "ray")],
                       capture_output=True, text=True, timeout=300)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and lines[-1] == (
        "shortft: error: step 2 had a non-finite loss or gradient; lower train.lr (now 1e+30) or set "
        "train.grad_clip (0: no clipping)"), p.stderr[-3000:]
    assert "shortft/cli.py" not in p.stderr and "<frozen runpy>" not in p.stderr, p.stderr[-3000:]  # no driver traceback
    assert "Error in training function" not in p.stderr  # the worker's own echo of what the controller reports
    assert "Traceback" not in p.stderr and "[FailurePolicy]" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.count("Attempting to start training worker group") == 1, p.stderr[-3000:]  # no restart
    assert len(lines) < 15, p.stderr[-3000:]
    assert "step 2 had a non-finite loss or gradient" in (tmp_path / "run" / "failed.json").read_text()


def test_ray_trains_failure_policy_raises_a_final_failure_at_once_and_retries_the_rest():
    import pickle

    from ray.train import FailureConfig
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    from shortft.ray_policy import FinalRaises

    shared = OutOfMemory("out of GPU memory beside another process")
    shared.beside_others = True

    def decision(*errors):
        failures = {rank: pickle.loads(pickle.dumps(UserExceptionWithTraceback(e, f"Traceback ...\n{e}")))
                    for rank, e in enumerate(errors)}  # as the controller gets them
        return FinalRaises(FailureConfig(max_failures=1)).make_decision(WorkerGroupError("...", failures))

    assert decision(NonFiniteError("step 2 had a non-finite loss")) is FailureDecision.RAISE
    assert decision(RuntimeError("gloo: connection reset"), ConfigError("x: bad")) is FailureDecision.RAISE
    assert decision(RuntimeError("killed")) is FailureDecision.RETRY  # a crash: Ray's own policy, restarts
    assert decision(shared) is FailureDecision.RETRY  # the other process may have left by then


def test_a_failure_a_retry_cannot_change_is_raised_again_at_once_within_its_attempt(tmp_path, capsys):
    from shortft import attempts
    from shortft.memory import explained

    ran = []

    def attempt(name, error):
        with attempts.once(tmp_path, name):
            ran.append(name)
            raise error

    with pytest.raises(NonFiniteError):
        attempt("a1", NonFiniteError("3 steps in a row had a non-finite loss"))
    with pytest.raises(NonFiniteError, match="^3 steps in a row had a non-finite loss$"):
        attempt("a1", RuntimeError("not reached"))
    assert ran == ["a1"] and "shortft: not retried" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="killed"):  # another attempt (a resume) runs; a crash is not final
        attempt("a2", RuntimeError("killed"))
    assert ran == ["a1", "a2"] and attempts.recorded(tmp_path, "a2") is None
    cfg = shortft.load_config("tiny")
    report = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
              "1.06 GiB is free. {}Including non-PyTorch memory, this process has 60.05 GiB memory in use.")
    for others, retried in (("", False), ("Process 4242 has 18.00 GiB memory in use. ", True)):
        with pytest.raises(OutOfMemory) as e, explained(cfg, "in step 3", "step"):
            raise torch.OutOfMemoryError(report.format(others))
        assert attempts.final(e.value) is not retried  # beside another process, a retry may fit once it leaves
    with pytest.raises(ConfigError), attempts.once(tmp_path, None):  # no attempt: nothing recorded
        raise ConfigError("bad")
    assert attempts.recorded(tmp_path, "a1") is not None
    with attempts.once(tmp_path, "a3"):  # a resume that succeeds leaves no record of the failure it got past
        pass
    assert not (tmp_path / attempts.FILE).exists()


def test_out_of_gpu_memory_offers_only_the_settings_not_already_made():
    from shortft.memory import settings

    cfg = shortft.load_config("sd15")  # checkpointed UNet blocks and decoder, bf16, one image per decode
    assert settings(cfg, "step") == ["chain.checkpointing=true (each call recomputed in backward)"]
    assert settings(shortft.load_config("sd15", ["chain.checkpointing=true"]), "step") == []
    assert settings(cfg, "loading") == [] and settings(cfg, "sampling") == ["eval.batch_size=2"]
    assert settings(shortft.load_config("toy", ["train.batch_size=3"]), "step")[-2] == "train.batch_size=1 train.grad_accum=3 (the same images per step)"


def test_out_of_cpu_memory_is_one_line_too(tmp_path):
    """`lora.rank=1000000000000` on the CPU ended in the allocator's RuntimeError traceback (status 1)."""
    from shortft.memory import OutOfMemory, explained

    cfg = shortft.load_config("toy")
    with pytest.raises(OutOfMemory, match=r"^out of CPU memory loading the models \(asked for 1048576.0 GiB of the "
                                          r"machine's [\d.]+ GiB\); to lower the peak: model.dtype=bfloat16"):
        with explained(cfg, "loading the models", "loading"):
            torch.empty(2**50, dtype=torch.uint8)
    with pytest.raises(OutOfMemory) as e, explained(cfg, "loading the models", "loading"):
        torch.empty(2**50, dtype=torch.uint8)
    assert e.value.beside_others  # other processes may hold the machine's memory: retried, as before
    # and so where a Ray Train worker's line is found again in the driver (it was made final there)
    from shortft.memory import OutOfMemory as Told

    assert Told.from_line(str(e.value)).beside_others and not Told.from_line("out of GPU memory in step 3 (...)").beside_others
    assert Told.from_line("out of GPU memory in step 3 (asked for 2 GiB with 1 GiB of 80 GiB free; another process "
                          "holds 30 GiB)").beside_others
    from shortft.distributed import _one_line_error

    told = _one_line_error(RuntimeError(f"Traceback (most recent call last):\n  ...\nshortft.memory.OutOfMemory: {e.value}"))
    assert isinstance(told, Told) and told.beside_others and str(told) == str(e.value)
    with pytest.raises(RuntimeError, match="other"), explained(cfg, "loading the models", "loading"):
        raise RuntimeError("other")  # any other error as it was
    p = subprocess.run([sys.executable, "-m", "shortft.cli", "train", "--config", "toy", "--no-mlflow",
                        "lora.rank=1000000000000", f"train.output_dir={tmp_path}/run"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].startswith("shortft: error: out of CPU memory "
                                                                              "loading the models"), p.stderr
    assert "Traceback" not in p.stderr


def test_resuming_from_a_path_that_is_no_checkpoint_is_one_line_before_the_models_load(make_cfg, tmp_path, monkeypatch):
    """`--resume PATH` with a wrong path, or the run folder instead of its checkpoint, was a FileNotFoundError
    for state.json after the models had loaded."""
    from shortft import loop

    shortft.train(make_cfg("train.steps=2", "train.checkpoint_every=1"))
    monkeypatch.setattr(loop, "load_models", lambda cfg: pytest.fail("the models loaded first"))
    run = tmp_path / "run"
    for given, told in [(tmp_path / "nope", "no such folder; give a checkpoints/step_NNNNNN folder, or --resume "
                                            "alone for the latest under train.output_dir"),
                        (run, f"not a checkpoint (no state.json); the latest checkpoint under it is "
                              f"{run / 'checkpoints' / 'step_000002'}")]:
        with pytest.raises(ConfigError) as e:
            loop.train(make_cfg("train.steps=4"), resume=str(given))
        assert str(e.value) == f"--resume {given}: {told}"
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "state.json").write_text('{"step": 2')  # was read after the models had loaded
    with pytest.raises(ConfigError, match=rf"^checkpoint {cut}: state.json unreadable \(JSONDecodeError"):
        loop.train(make_cfg("train.steps=4"), resume=str(cut))


def test_the_fp16_loss_scale_survives_a_checkpoint(make_cfg, tmp_path):
    from shortft.models import load_models

    cfg = make_cfg("chain.steps=4", "chain.segments=2")
    models = load_models(cfg)
    params = [p for n, p in models.unet.named_parameters() if "lora_" in n]
    optimizer = torch.optim.AdamW(params)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)
    scaler.scale(torch.tensor(1.0))  # the scale tensor is made on first use
    scaler.update(new_scale=torch.tensor(64.0))
    path = checkpoint.save(tmp_path / "ck", 1, models.unet, list(models.adapters), optimizer, {}, {}, 2, scaler)
    restored = torch.amp.GradScaler("cpu", enabled=True)
    checkpoint.load(path, models.unet, list(models.adapters), optimizer, restored)
    assert restored.get_scale() == 64.0


class _FlakyClient:
    """An MLflow client that is down for the calls in `down` (by call number) and records the rest."""

    def __init__(self, down):
        self.down, self.n, self.done = set(down), 0, []

    def __getattr__(self, method):
        def call(*args, **kwargs):
            self.n += 1
            if self.n in self.down:
                raise ConnectionError("server gone")
            self.done.append((method, kwargs.get("metrics", args[1:2])))
            return []
        return call


def test_tracking_failures_are_queued_retried_and_never_stop_training(tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    from shortft.mlflow_logger import MlflowLogger

    log = MlflowLogger("http://127.0.0.1:9", "run1")
    log.client = _FlakyClient(down=range(3, 6))  # calls 3-5 fail: the server is away for a while
    log.logged_up_to, log.RETRY_S = 0, 0.0
    log._log("update_run", "run1", status="RUNNING")
    for step in range(1, 7):
        log.on_step(step, {"loss": float(step), "step": step}, {})
    logged = [kw[0].step for m, kw in log.client.done if m == "log_batch"]
    assert logged == [1, 2, 3, 4, 5, 6]  # every step, in order, once the server was back
    log.on_end(SimpleNamespace(lora_dir=tmp_path, output_dir=tmp_path))
    assert capsys.readouterr().err == ""  # nothing lost

    log = MlflowLogger("http://127.0.0.1:9", "run2")
    log.client, log.logged_up_to, log.MAX_PENDING = _FlakyClient(down=range(1, 10**6)), 0, 3
    for step in range(1, 6):
        log.on_step(step, {"loss": 1.0, "lr": 0.1}, {})
    log.on_end(SimpleNamespace(lora_dir=tmp_path, output_dir=tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("shortft: mlflow: 10 metric values and 2 artifact upload(s) of run "
                                               "run2 were not logged to http://127.0.0.1:9 (ConnectionError")
    assert len(log.pending) <= 5 and log.dropped == 8  # bounded: the oldest metrics were dropped


def _train_with_server(tmp_path, tiny_dir, port: int, name: str, steps: int, *flags: str, every: int = 0):
    return subprocess.Popen([sys.executable, "-m", "shortft.cli", "train", "--config", "tiny",
                             f"model.pretrained={tiny_dir}", f"train.steps={steps}", "chain.steps=4",
                             "chain.segments=2", f"train.checkpoint_every={every or steps}",
                             f"train.output_dir={tmp_path / name}", "--tracking-uri", f"http://127.0.0.1:{port}", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(run_dir, step: int, proc) -> None:
    import time

    deadline = time.time() + 300
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= step:
            return
        time.sleep(0.1)
    err = proc.communicate(timeout=60)[1] if proc.poll() is not None else ""
    pytest.fail(f"the run never reached step {step}: {proc.poll()=}: {err[-3000:]}")


def test_resuming_with_another_worker_count_is_refused_in_one_line(make_cfg, tmp_path):
    from shortft.config import ConfigError
    from shortft.loop import train

    cfg = make_cfg("train.steps=2", "train.checkpoint_every=2", "chain.steps=4", "chain.segments=2")
    shortft.train(cfg)
    latest = tmp_path / "run" / "checkpoints" / "step_000002"
    with pytest.raises(ConfigError) as e:
        train(cfg, resume=str(latest), world_size=2)  # refused before any collective call
    assert str(e.value) == (f"resume: the checkpoint {latest} was written by 1 worker(s), this run has 2; resume "
                            "with --workers 1 (the global batch and every rank's data order depend on the worker count)")
    # The same through `--workers 2 --resume`: Ray has no run to resume (it was never a Ray run), and
    # would start again from step 0 over this run's files; refused before Ray starts.
    import ray

    from shortft.distributed import train_with_ray
    with pytest.raises(ConfigError) as e:
        train_with_ray(cfg, 2, resume=True, storage_path=str(tmp_path / "ray"), tracking_uri=None)
    assert str(e.value).startswith(f"resume: {tmp_path / 'ray'} holds no run ") and str(e.value).endswith(
        f"and {latest} is a checkpoint of 1 worker(s); resume it in one process (no --workers), or, if --workers 1 "
        "wrote it, with the --storage-path it was written to")
    assert not ray.is_initialized() and (latest / "state.json").is_file()
    # A Ray run of two workers resumed with one: refused by the workers once Ray had started and the models had
    # loaded (26 s); now from the storage path's latest checkpoint, before Ray starts
    ray_run = tmp_path / "ray2" / "x" / "step_000002"
    shutil.copytree(latest, ray_run)
    (ray_run / "state.json").write_text(json.dumps({**json.loads((latest / "state.json").read_text()), "world_size": 2}))
    with pytest.raises(ConfigError, match=re.escape(f"the checkpoint {ray_run} was written by 2 worker(s), this run "
                                                    "has 1; resume with --workers 2")):
        train_with_ray(cfg, 1, resume=True, storage_path=str(tmp_path / "ray2"), tracking_uri=None, name="x")
    assert not ray.is_initialized()
    # A checkpoint two workers wrote: `train --resume --dry-run` said it would resume from it, the run refused.
    from types import SimpleNamespace

    from shortft.cli import resume_line

    state = json.loads((latest / "state.json").read_text())
    (latest / "state.json").write_text(json.dumps({**state, "world_size": 2}))
    with pytest.raises(ConfigError, match=r"was written by 2 worker\(s\), this run has 1; resume with --workers 2"):
        resume_line(cfg, SimpleNamespace(resume=True, workers=0, overrides=[], config=None))


def test_a_workers_resume_of_a_run_the_storage_path_lacks_says_it_starts_from_step_0(make_cfg, tmp_path, monkeypatch,
                                                                                      capsys):
    """A one-process resume with nothing to resume says "no checkpoint ...; starting from step 0"; one with
    --workers (a mistyped name, another storage path) started at step 0 without a word."""
    from shortft import distributed
    from shortft.distributed import train_with_ray

    def started(**kwargs):
        raise RuntimeError("Ray would start here")

    monkeypatch.setattr(distributed.resources, "connect", started)
    monkeypatch.setattr("ray.is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="Ray would start here"):
        train_with_ray(make_cfg(), 2, resume=True, storage_path=str(tmp_path / "ray"), tracking_uri=None, name="typo")
    assert f"shortft: note: {tmp_path / 'ray'} holds no run typo to resume; starting from step 0" in capsys.readouterr().err


def test_a_resume_names_the_settings_changed_since_its_checkpoint_and_refuses_those_its_loras_do_not_fit(
        make_cfg, tmp_path, capsys):
    """Out of GPU memory, a run is told which settings lower the peak and that its checkpoints are kept: a
    resume with them went on without a word, and one with another lora.rank or chain.segments died in the
    LoRA load ('does not fit this UNet's adapters (Error(s) in loading state_dict ...)', or 'no
    pytorch_lora_weights.safetensors there') after overwriting the run's config.yaml with the refused one."""
    import yaml

    from shortft.config import ConfigError

    base = ("chain.steps=4", "chain.segments=2", "train.checkpoint_every=1")
    shortft.train(make_cfg(*base, "train.steps=2"))
    capsys.readouterr()
    assert shortft.train(make_cfg(*base, "train.steps=3", "chain.checkpointing=true", "train.lr=2e-3"),
                         resume=True).steps == 3
    assert "resume: settings changed since the checkpoint: chain.checkpointing false -> true, train.lr 0.003 -> 0.002" \
        in capsys.readouterr().err  # train.steps, a run's length, is not named
    # Said and done: the optimizer's saved param groups brought the old lr back with its moments.
    assert [r["lr"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())] == \
        [3e-3, 3e-3, 2e-3]
    for change, was in (("lora.rank=8", "lora.rank=4"), ("chain.segments=4", "chain.segments=2")):
        with pytest.raises(ConfigError) as e:
            shortft.train(make_cfg(*base, "train.steps=4", "chain.checkpointing=true", change), resume=True)
        assert str(e.value) == (f"resume: the checkpoint {tmp_path}/run/checkpoints/step_000003 was written with "
                                f"{was}; this run has {change}, which its LoRAs do not fit; resume with the "
                                "checkpoint's values, or start a new run (another train.output_dir)")
        assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["lora"]["rank"] == 4
    # The same base model at another path (moved, copied, another machine's): resumed, with a line saying so.
    import shutil

    copy = tmp_path / "model-moved"
    shutil.copytree(make_cfg().model.pretrained, copy)
    assert shortft.train(make_cfg(*base, "train.steps=4", "chain.checkpointing=true", f"model.pretrained={copy}"),
                         resume=True).steps == 4
    assert (f'model.pretrained "{make_cfg().model.pretrained}" -> "{copy}" (the same UNet architecture; the LoRAs load '
            "where their shapes fit)") in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.xdist_group("ray")  # Ray Train runs: with the other tests that start Ray (see test_sweep.py)
def test_a_two_worker_run_outlives_the_tracking_server_and_resumes_with_two_workers_only(mlflow_server, tmp_path,
                                                                                       tiny_dir):
    """Two runs at once, each through its own gate to one real server: for "away", a `--workers 2`
    run, the server goes at step 2 for good; for "back", a run in one process (the same logger; a
    second Ray Train job would double the test's time), from step 2 until it tried to log and failed.
    Both finish with exit 0 and complete checkpoints and metrics.jsonl; "away" says in one line what
    was not logged, "back" logs every step. Then the 2-worker checkpoint, resumed in one process, is
    refused in one line (the documented result: the global batch and the data order depend on the
    worker count)."""
    import json
    import time

    from mlflow.tracking import MlflowClient

    from tests.conftest import TcpGate

    gates = {name: TcpGate(mlflow_server.port) for name in ("away", "back")}
    steps = {"away": 6, "back": 20}
    procs = {"away": _train_with_server(tmp_path, tiny_dir, gates["away"].port, "away", 6, "--workers", "2",
                                        "--storage-path", str(tmp_path / "ray"), every=2),
             "back": _train_with_server(tmp_path, tiny_dir, gates["back"].port, "back", 20, every=10)}
    try:
        # "back" first: in one process it reaches step 2 while "away" is still starting Ray
        _wait_for_step(tmp_path / "back", 2, procs["back"])
        gates["back"].close()
        deadline = time.time() + 120
        while gates["back"].cut == 0 and procs["back"].poll() is None and time.time() < deadline:
            time.sleep(0.05)  # the run has tried to log while the server was away
        gates["back"].open()
        assert procs["back"].poll() is None, "the run ended before the server came back"
        _wait_for_step(tmp_path / "away", 2, procs["away"])
        gates["away"].close()
        outs = {name: p.communicate(timeout=600) for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    for name, (out, err) in outs.items():
        assert procs[name].returncode == 0, err[-3000:]
        done = [json.loads(line)["step"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert sorted(set(done)) == list(range(1, steps[name] + 1)), (name, done)
        assert {p.name for p in (tmp_path / name / "checkpoints").iterdir()} >= {f"step_{steps[name]:06d}"}
        assert (tmp_path / name / "lora").is_dir() and gates[name].cut > 0, (name, gates[name].cut, err[-3000:])
    lost = [line for line in outs["away"][1].splitlines() if "mlflow" in line.lower()]
    assert len(lost) == 1 and "were not logged to" in lost[0], outs["away"][1][-3000:]
    assert "/shortft/" not in outs["away"][1]  # no traceback of ours (Ray may log its own, on a loaded machine)
    assert {p.name for p in (tmp_path / "away" / "checkpoints").iterdir()} >= {"step_000004", "step_000006"}
    assert "were not logged" not in outs["back"][1]
    client = MlflowClient(f"http://127.0.0.1:{mlflow_server.port}")
    key = str((tmp_path / "back").resolve())  # a one-process run's key: its output folder
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("shortft").experiment_id])
              if r.data.tags.get("shortft.run_key") == key]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, 21))

    # The 2-worker checkpoint, resumed in one process (no --workers): one line, exit 2, nothing trained.
    p = subprocess.run([sys.executable, "-m", "shortft.cli", "train", "--config", "tiny", f"model.pretrained={tiny_dir}",
                        "train.steps=6", "chain.steps=4", "chain.segments=2", "train.checkpoint_every=2",
                        f"train.output_dir={tmp_path / 'away'}", "--no-mlflow", "--resume"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "was written by 2 worker(s), this run has 1; resume with --workers 2" in p.stderr, p.stderr


@pytest.mark.parametrize("kind", ["local", "file://"])
def test_a_run_whose_first_attempt_stopped_before_a_checkpoint_is_no_run_to_refuse_or_resume(tmp_path, kind):
    """A `--workers` run whose worker died before its first checkpoint leaves Ray's marker alone in its storage
    folder: the same command again was refused for good ("run ... already exists; pass --resume"), where
    --resume started at step 0 anyway. (Seen with SHORTFT_FAIL_AT_STEP=2, checkpoints every 2 and
    --max-failures 0; the same command then trains steps 1-4 under the same name.)"""
    from shortft.ray_storage import RAY_MARKER, run_exists

    (tmp_path / "bucket" / "tried").mkdir(parents=True)
    (tmp_path / "bucket" / "tried" / RAY_MARKER).write_text("")
    (tmp_path / "bucket" / "taken" / "step_000002").mkdir(parents=True)
    storage = str(tmp_path / "bucket") if kind == "local" else f"file://{tmp_path}/bucket"
    assert not run_exists(storage, "tried") and run_exists(storage, "taken") and not run_exists(storage, "none")


@pytest.mark.parametrize("kind", ["local", "file://"])
def test_a_new_distributed_run_refuses_a_name_that_exists_on_any_storage(make_cfg, tmp_path, kind):
    """Checked before Ray starts: local paths directly, URIs (s3://, gs://, file://) through pyarrow."""
    import ray

    from shortft.config import ConfigError
    from shortft.distributed import train_with_ray

    (tmp_path / "bucket" / "taken" / "step_000002").mkdir(parents=True)
    storage = str(tmp_path / "bucket") if kind == "local" else f"file://{tmp_path}/bucket"
    with pytest.raises(ConfigError) as e:
        train_with_ray(make_cfg(), 2, storage_path=storage, tracking_uri=None, name="taken")
    assert str(e.value) == (f"run taken already exists in {storage}; pass --resume to continue it, or set "
                            "name=<new name> to start another")
    assert not ray.is_initialized()


def test_two_runs_that_create_the_same_experiment_at_once_both_start(tmp_path, monkeypatch):
    """Found with two `--workers 2` runs started together against one server: the second create of the
    experiment failed with RESOURCE_ALREADY_EXISTS and a traceback. Here the other run creates it
    between this one's look-up and its create."""
    from shortft import tracking

    uri = f"sqlite:///{tmp_path}/m.db"
    made = tracking.experiment_id(uri, "shortft")
    real = tracking.client

    def racing(u):
        c = real(u)
        look, looked = c.get_experiment_by_name, []
        c.get_experiment_by_name = lambda name: None if not looked.append(name) and len(looked) == 1 else look(name)
        return c

    monkeypatch.setattr(tracking, "client", racing)
    assert tracking.experiment_id(uri, "shortft") == made


def test_an_experiment_deleted_in_the_mlflow_ui_is_one_line_with_the_way_back(tmp_path, capsys):
    """MLflow finds a deleted experiment by name and refuses runs in it: `create_run` raised
    "The experiment ... must be in the 'active' state" in a traceback."""
    from shortft import tracking
    from shortft.cli import main

    uri = f"sqlite:///{tmp_path}/m.db"
    gone = tracking.experiment_id(uri, "gone")
    tracking.client(uri).delete_experiment(gone)
    code = main(["train", "--config", "toy", "--tracking-uri", uri, "--experiment", "gone", "train.steps=1",
                 f"train.output_dir={tmp_path}/run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err), err
    assert err[-1] == (f"shortft: error: MLflow experiment 'gone' in {uri} was deleted; restore it (MLFLOW_TRACKING_URI={uri} mlflow "
                       f"experiments restore -x {gone}) or pass another --experiment"), err


def test_a_slow_tracking_server_is_waited_for_and_a_refusing_one_fails_at_once(monkeypatch):
    """Seen in CI: under load the on-prem head's MLflow server took over 5 s to answer /health and the
    sweep stopped with "unreachable". A server that takes the connection is now waited for; one that
    refuses it still fails at once, in one line."""
    import socket
    import time

    from shortft import tracking
    from shortft.config import ConfigError
    from tests.conftest import _free_port

    silent = socket.socket()  # listens, never answers: connections are taken, reads time out
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    monkeypatch.setattr(tracking, "HEALTH_WAIT_S", 7.0)
    t0 = time.time()
    with pytest.raises(ConfigError, match="MLflow server unreachable .*timed out"):
        tracking.check_tracking_uri(f"http://127.0.0.1:{silent.getsockname()[1]}")
    assert time.time() - t0 >= 7.0  # waited, then one line
    silent.close()
    t0 = time.time()
    with pytest.raises(ConfigError, match="MLflow server unreachable") as e:
        tracking.check_tracking_uri(f"http://127.0.0.1:{_free_port()}")
    assert time.time() - t0 < 2 and "\n" not in str(e.value)


def test_a_database_store_mlflow_cannot_open_is_one_line_naming_where_its_uri_came_from(monkeypatch, capfd):
    """A database URI without its driver installed (`postgresql://` without psycopg) and Databricks without
    its credentials passed the check and ended in a traceback at the first MLflow call; a bad
    $MLFLOW_TRACKING_URI was told to pass another --tracking-uri, which was never passed."""
    from shortft import tracking
    from shortft.cli import main
    from shortft.config import ConfigError

    for uri, why in (("mssql://me@127.0.0.1:1/mlflow", "MLflow cannot use it (ModuleNotFoundError: No module named "),
                     ("databricks", "MLflow cannot use it (MlflowException: ")):
        with pytest.raises(ConfigError, match=re.escape(f"tracking URI {uri}: {why}")) as e:
            tracking.check_tracking_uri(uri)
        assert "\n" not in str(e.value)
    capfd.readouterr()
    assert main(["train", "--config", "tiny", "train.steps=1", "--tracking-uri", "databricks"]) == 2
    err = capfd.readouterr().err.strip().splitlines()  # and MLflow's own warning line not before it
    assert len(err) == 1 and "MLflow cannot use it" in err[0], err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "foo://bar")
    assert main(["train", "--config", "tiny", "train.steps=1"]) == 2
    assert capfd.readouterr().err.startswith("shortft: error: tracking URI 'foo://bar' (from $MLFLOW_TRACKING_URI): use")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///no/such/folder/mlflow.db")
    with pytest.raises(ConfigError, match=r"\(from \$MLFLOW_TRACKING_URI\): directory no/such/folder does not exist or "
                                          "is not writable; set MLFLOW_TRACKING_URI to another or pass --tracking-uri"):
        tracking.check_tracking_uri("sqlite:///no/such/folder/mlflow.db")


OPEN_STORE_AT_ONCE = '''
import sys, time
from pathlib import Path
from mlflow.tracking import MlflowClient  # imported before the wait: both open the store at once
from shortft.tracking import client
Path(sys.argv[2]).touch()
while not Path(sys.argv[3]).exists():
    time.sleep(0.001)
print(len(client(sys.argv[1]).search_experiments()))
'''


def test_two_processes_opening_a_new_sqlite_store_at_once_both_succeed(tmp_path):
    """Two `shortft train` started together in one folder open the default sqlite:///mlflow.db at once.
    MLflow builds a new store's tables by running its migrations; with plain MlflowClients one of the
    two failed with a traceback ('table _alembic_tmp_model_versions already exists'; seen in CI between
    two CLI tests, and 4 times in 4 tries of this race). Each round starts both, lets them import
    MLflow, then releases them together."""
    for round_ in range(2):
        db, go = tmp_path / f"r{round_}" / "mlflow.db", tmp_path / f"go{round_}"
        db.parent.mkdir()
        ready = [tmp_path / f"ready{round_}-{i}" for i in range(2)]
        procs = [subprocess.Popen([sys.executable, "-c", OPEN_STORE_AT_ONCE, f"sqlite:///{db}", str(r), str(go)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in ready]
        while not all(r.exists() for r in ready) and all(p.poll() is None for p in procs):
            time.sleep(0.01)
        go.touch()
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0 and out.strip() == "1", err[-2000:]


def test_a_runs_artifacts_go_next_to_its_sqlite_store_whatever_the_working_directory(tmp_path, monkeypatch):
    """MLflow puts a SQLite store's artifacts under ./mlruns of the working directory of whichever process
    first creates the experiment: a run against sqlite:////data/mlflow.db started from the checkout wrote
    its LoRA, samples and config into the checkout (seen: a test left mlruns/1/ there). The project's
    experiments keep them in mlruns/<experiment> next to the store."""
    from pathlib import Path

    from shortft import tracking

    store, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    store.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    uri = f"sqlite:///{store}/mlflow.db"
    run_id = tracking.ensure_run(uri, "a/b experiment", "key", "name")
    c = tracking.client(uri)
    (tmp_path / "x.txt").write_text("x")
    c.log_artifact(run_id, str(tmp_path / "x.txt"))
    assert not any(elsewhere.iterdir())
    assert [p.relative_to(store) for p in store.rglob("x.txt")] == [Path("mlruns/a_b_experiment") / run_id / "artifacts/x.txt"]


def test_ctrl_c_in_eval_or_sample_says_interrupted_and_in_train_how_to_continue(monkeypatch, capsys, tmp_path):
    """`eval` and `sample` told to resume with --resume, a flag they do not have (nothing to resume); `train`
    interrupted before its first step said `--resume` alone, which drops the command's overrides."""
    from shortft import cli, sample
    from shortft.interrupt import Interrupted

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_eval", interrupted)
    monkeypatch.setattr(sample, "run_sample", interrupted)
    monkeypatch.setattr(cli, "run_train", interrupted)
    assert cli.main(["eval", "--config", "tiny"]) == 130
    assert capsys.readouterr().err == "shortft: interrupted\n"
    assert cli.main(["sample", "--config", "tiny", "--lora", str(tmp_path), "--prompt", "a red circle"]) == 130
    assert capsys.readouterr().err == "shortft: interrupted\n"
    assert cli.main(["train", "--config", "tiny", "name=my run", "train.steps=60", "--no-mlflow"]) == 130
    assert capsys.readouterr().err == ("shortft: interrupted; continue with: shortft train --config tiny 'name=my run' "
                                       "train.steps=60 --no-mlflow --resume\n")
    # stopped before it wrote a checkpoint of its own (its set-up, the lock's wait): the checkpoint it was given
    # is where it goes on (without it, a run resumed from another run's step 35 started again at step 0)
    assert cli.main(["train", "--config", "tiny", "name=fork", "--resume", "runs/ref/checkpoints/step_000035"]) == 130
    assert capsys.readouterr().err == ("shortft: interrupted; continue with: shortft train --config tiny name=fork "
                                       "--resume runs/ref/checkpoints/step_000035\n")

    def stopped(*a, **k):  # after a step and its checkpoint: that one, the run's latest, is where it goes on
        raise Interrupted("SIGINT after step 36; checkpoint runs/fork/checkpoints/step_000036; continue with --resume",
                          130)

    monkeypatch.setattr(cli, "run_train", stopped)
    assert cli.main(["train", "--config", "tiny", "name=fork", "--resume=runs/ref/checkpoints/step_000035"]) == 130
    assert capsys.readouterr().err.endswith("continue with: shortft train --config tiny name=fork --resume\n")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_ends_the_step_in_progress_with_a_checkpoint_that_resumes(tiny_dir, tmp_path, sig, code):
    """Before, the signal ended the process wherever it was: every step since the last periodic checkpoint
    (train.checkpoint_every, here none) was lost, and SIGTERM (a scheduler's, a spot node's) printed nothing."""
    args = [sys.executable, "-m", "shortft.cli", "train", "--config", "tiny", f"model.pretrained={tiny_dir}",
            "chain.steps=4", "chain.segments=2", "train.steps=400", "train.checkpoint_every=0", "train.log_every=1",
            "eval.every=0", f"train.output_dir={tmp_path}/run", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in p.stdout:
        if line.startswith("step 3/400"):
            break
    p.send_signal(sig)
    out, err = p.communicate(timeout=300)
    last = err.strip().splitlines()[-1]
    step = int(last.split(" after step ")[1].split(";")[0])
    checkpoint = tmp_path / "run" / "checkpoints" / f"step_{step:06d}"
    assert p.returncode == code and step >= 3, err[-3000:]
    # the whole command to continue with: `--resume` alone dropped the run's overrides (train.steps=60 became 200)
    assert last == (f"shortft: interrupted: {sig.name} after step {step}; checkpoint {checkpoint}; continue with: "
                    + shlex.join(["shortft", *args[3:], "--resume"])), last
    assert f"shortft: {sig.name}: stopping after this step, with a checkpoint" in err
    assert f"\n\nshortft: {sig.name}: stopping" not in "\n" + err  # a blank line first: past a terminal's ^C only
    assert "Creating initial MLflow database tables" not in err  # MLflow's INFO lines on a new store's first use
    assert checkpoint.is_dir() and not (tmp_path / "run" / "lora").exists()
    assert _status(tmp_path) == ("KILLED", f"{sig.name} after step {step}; checkpoint {checkpoint}; continue with "
                                           "--resume")  # it showed as RUNNING
    r = subprocess.run(args[:-2] + ["train.steps=" + str(step + 2), *args[-2:], "--resume"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and f"resumed from {checkpoint} at step {step}" in r.stderr, r.stderr[-3000:]
    assert f"step {step + 2}/{step + 2}" in r.stdout and (tmp_path / "run" / "lora").is_dir()
    assert _status(tmp_path) == ("FINISHED", None)


def _status(tmp_path) -> tuple[str, str | None]:
    """The status and error line of the one MLflow run in tmp_path/mlflow.db."""
    from shortft import tracking

    client = tracking.client(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return run.info.status, run.data.tags.get("shortft.error")


def test_a_run_that_fails_is_marked_failed_in_mlflow_with_its_line(tiny_dir, tmp_path, capsys):
    """A run that stopped on an error showed as RUNNING in the MLflow UI for ever."""
    from shortft.cli import main

    code = main(["train", "--config", "tiny", f"model.pretrained={tiny_dir}", "train.steps=4", "chain.steps=4",
                 "chain.segments=2", "train.lr=1e30", "train.grad_clip=0", "train.max_bad_steps=1",
                 f"train.output_dir={tmp_path}/run", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and line.startswith("shortft: error: step 2 had a non-finite loss"), line
    assert _status(tmp_path) == ("FAILED", line.removeprefix("shortft: error: "))


@pytest.mark.parametrize("sig, code, workers", [(signal.SIGINT, 130, 2), (signal.SIGTERM, 143, 1)])
def test_ctrl_c_of_a_workers_run_stops_every_worker_after_the_same_step_with_a_checkpoint(tiny_dir, tmp_path, sig,
                                                                                          code, workers):
    """Ray Train's own SIGINT handler aborted the run (SIGTERM killed the driver): the workers died mid-step, the controller's last
    report was lost with its checkpoint (checkpoints every 5 steps, step 20 reported: the resume started
    at step 15), and the command ended in Ray's SystemExit(1). Now every worker stops after the same step,
    rank 0's checkpoint of it is reported, and the resume starts there."""
    args = [sys.executable, "-m", "shortft.cli", "train", "--config", "tiny", f"model.pretrained={tiny_dir}",
            "chain.steps=4", "chain.segments=2", "train.steps=400", "train.checkpoint_every=0", "train.log_every=1",
            "eval.every=0", f"train.output_dir={tmp_path}/run", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
            "--workers", str(workers), "--storage-path", "ray"]  # relative: was a pyarrow traceback
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in p.stdout:
        if "step 2/400" in line:
            break
    p.send_signal(sig)
    out, err = p.communicate(timeout=300)
    last = err.strip().splitlines()[-1]
    assert p.returncode == code, err[-3000:]
    found = re.fullmatch(rf"shortft: interrupted: {sig.name}: Ray Train run (\S+) stopped after step (\d+); checkpoint "
                         rf"(\S+); continue with: {re.escape(shlex.join(['shortft', *args[3:], '--resume']))}", last)
    assert found, last
    name, step, ckpt = found[1], int(found[2]), Path(found[3])
    assert ckpt == tmp_path / "ray" / name / f"step_{step:06d}" and ckpt.is_dir()
    assert f"shortft: {sig.name}: the workers stop after this step, with a checkpoint (again to abort now)" in err
    assert "Reporting training result" not in err  # Ray Train's INFO line per report and rank, metrics and all
    assert not (tmp_path / "run" / "lora").exists()
    assert _status(tmp_path) == ("KILLED", f"{sig.name}: Ray Train run {name} stopped after step {step}; checkpoint "
                                           f"{ckpt}; continue with --resume --workers {workers}")
    if workers == 1:  # the resume is the same after either signal: once, where rank 0 alone says it resumed
        return
    r = subprocess.run(args[:-6] + [f"train.steps={step + 2}", *args[-6:], "--resume"], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and r.stderr.count(f"resumed from {ckpt} at step {step}") == 1, r.stderr[-3000:]  # rank 0's
    assert f"step {step + 2}/{step + 2}" in r.stdout and (tmp_path / "run" / "lora").is_dir()
    assert _status(tmp_path) == ("FINISHED", None)

def test_the_mlflow_status_of_a_run_that_ends_badly_and_of_a_refused_resume(tmp_path, capsys):
    """A fresh run that fails is FAILED; an interrupted one KILLED; a resume refused with a ConfigError (another
    worker count) leaves the run as it was (it was marked FAILED, though nothing of it had failed); a dead
    tracking server costs seconds (MLflow's own retries: minutes) and never hides the run's own error."""
    import time

    from shortft import run_status, tracking
    from shortft.interrupt import Interrupted

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = tracking.client(uri)

    def state(run_id):
        run = client.get_run(run_id)
        return run.info.status, run.data.tags.get(run_status.ERROR_TAG)

    fresh, resumed = tracking.ensure_run(uri, "e", "fresh", "fresh"), tracking.ensure_run(uri, "e", "resumed", "resumed")
    with pytest.raises(ConfigError), run_status.kept(uri, fresh):
        raise ConfigError("reward.weights.x: unknown reward 'x'")
    assert state(fresh) == ("FAILED", "reward.weights.x: unknown reward 'x'")
    with pytest.raises(Interrupted), run_status.kept(uri, resumed):
        raise Interrupted("SIGINT after step 3; checkpoint c; continue with --resume", 130)
    assert state(resumed) == ("KILLED", "SIGINT after step 3; checkpoint c; continue with --resume")
    with pytest.raises(ConfigError), run_status.kept(uri, resumed):
        assert state(resumed) == ("RUNNING", None)
        raise ConfigError("resume: the checkpoint c was written by 1 worker(s), this run has 2")
    assert state(resumed) == ("KILLED", "SIGINT after step 3; checkpoint c; continue with --resume")
    t0 = time.time()
    with pytest.raises(NonFiniteError), run_status.kept("http://127.0.0.1:9", "r1"):
        raise NonFiniteError("step 2 had a non-finite loss")
    assert time.time() - t0 < 30 and "shortft: mlflow: run r1 not marked FAILED" in capsys.readouterr().err


def test_an_unreadable_checkpoint_gives_way_to_the_one_before_it_on_resume(make_cfg, tmp_path, capfd):
    """A latest checkpoint cut short (a copy to shared storage that stopped, a disk error) ended `--resume`
    in safetensors' traceback ("invalid header length"), and Ray Train, which always resumes from its
    latest, could not resume the run at all."""
    import shutil

    from shortft.checkpoint import Fallback

    small = ["chain.steps=4", "chain.segments=2", "train.checkpoint_every=2", "eval.every=0", "train.keep_checkpoints=3",
             "train.steps=6"]
    straight = {r["step"]: r["loss"] for r in shortft.train(make_cfg(*small)).history}
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.rmtree(ckpts / "step_000006")  # as if it had stopped after step 4
    cut = sorted((ckpts / "step_000004" / "lora").rglob("*.safetensors"))[-1]  # the first adapter loads before it
    cut.write_bytes(cut.read_bytes()[:100])
    capfd.readouterr()
    with pytest.raises(ConfigError, match=rf"^LoRA {cut}: unreadable \(.*\); the file is cut short or of another kind$"):
        shortft.train(make_cfg(*small), resume=ckpts / "step_000004")  # a path: that one only
    result = shortft.train(make_cfg(*small), resume=True)
    err = capfd.readouterr().err
    assert f"; resuming from {ckpts / 'step_000002'}, the checkpoint before it" in err, err
    assert f"resumed from {ckpts / 'step_000002'} at step 2" in err and result.steps == 6
    assert {r["step"]: r["loss"] for r in result.history} == straight  # exact: as if nothing had been cut
    (ckpts / "step_000006" / "state.json").write_text('{"step": 6')  # cut short
    result = shortft.train(make_cfg(*small[:-1], "train.steps=8"), resume=Fallback(ckpts / "step_000006"))  # Ray's
    err = capfd.readouterr().err
    assert f"resume: checkpoint {ckpts / 'step_000006'}: state.json unreadable (JSONDecodeError" in err, err
    assert f"resumed from {ckpts / 'step_000004'} at step 4" in err and result.steps == 8
    optimizer = ckpts / "step_000008" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:8000])
    with pytest.raises(ConfigError, match=r"^checkpoint .*step_000008/optimizer.pt: not a torch checkpoint \(OSError"):
        shortft.train(make_cfg(*small[:-1], "train.steps=10"), resume=ckpts / "step_000008")  # was torch's traceback
    # whole, but not what a run writes (another program's, a hand edit): KeyError 'param_groups' in a traceback
    for blob, why in (({"optimizer": {}, "rng": {}}, "KeyError: 'param_groups'"), ([1, 2], "not a dict")):
        torch.save(blob, optimizer)
        with pytest.raises(ConfigError, match=rf"^checkpoint .*step_000008/optimizer.pt: not what a run writes \({why}"):
            shortft.train(make_cfg(*small[:-1], "train.steps=10"), resume=ckpts / "step_000008")
    result = shortft.train(make_cfg(*small[:-1], "train.steps=10"), resume=True)  # the one before it, said
    assert f"resumed from {ckpts / 'step_000006'} at step 6" in capfd.readouterr().err and result.steps == 10

def test_a_sweep_trials_unreadable_tune_copy_gives_way_to_its_run_folder_and_ranks_that_disagree_stop(
        make_cfg, tmp_path, capfd, monkeypatch):
    """A trial resumes from Tune's copy of its checkpoint (checkpoint_NNNNNN, in a scratch folder) where it is
    newer than the run folder's; cut short, the copy gives way to the run folder's checkpoint before it.
    Ranks that resumed from different steps (one went back, the others did not) stop in one line."""
    import shutil

    from shortft import loop
    from shortft.sweep.in_trial import _fallback

    small = ["chain.steps=4", "chain.segments=2", "train.checkpoint_every=2", "eval.every=0", "train.keep_checkpoints=3",
             "train.steps=6"]
    straight = {r["step"]: r["loss"] for r in shortft.train(make_cfg(*small)).history}
    ckpts = tmp_path / "run" / "checkpoints"
    tune_copy = tmp_path / "scratch" / "checkpoint_000002"
    shutil.copytree(ckpts / "step_000006", tune_copy)
    shutil.rmtree(ckpts / "step_000006")  # the node that wrote it is gone; Tune's copy is the newest
    cut = sorted((tune_copy / "lora").rglob("*.safetensors"))[-1]
    cut.write_bytes(cut.read_bytes()[:100])
    capfd.readouterr()
    cfg = make_cfg(*small)
    result = shortft.train(cfg, resume=_fallback(cfg, tune_copy))
    err = capfd.readouterr().err
    assert f"resume: LoRA {cut}: unreadable" in err and f"resuming from {ckpts / 'step_000004'}, the checkpoint" in err
    assert {r["step"]: r["loss"] for r in result.history} == straight and result.steps == 6
    monkeypatch.setattr(loop, "same_on_all", lambda value, device, world_size: False)
    with pytest.raises(ConfigError, match=rf"^resume: the workers found different checkpoints \(this one "
                                          rf"{re.escape(str(ckpts / 'step_000006'))} at step 6\); check the storage"):
        shortft.train(make_cfg(*small[:-1], "train.steps=8"), resume=True)


def test_the_checkpoints_a_resume_tries_in_order(tmp_path):
    """By step as a number (step_1000000 sorted before step_999999 by name); Tune's copy of a trial's
    checkpoint (checkpoint_NNNNNN, in a scratch folder) gives way to the run folder's older ones."""
    from shortft.checkpoint import Fallback, candidates

    root = tmp_path / "checkpoints"
    for step in (999999, 1000000, 2):
        (root / f"step_{step:06d}").mkdir(parents=True)
        (root / f"step_{step:06d}" / "state.json").write_text(f'{{"step": {step}}}')
    (root / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's, beside its checkpoints
    newest = root / "step_1000000"
    assert candidates(True, root) == [newest, root / "step_999999", root / "step_000002"]
    assert candidates(Fallback(root / "step_999999"), root) == [root / "step_999999", root / "step_000002"]
    assert candidates(newest, root) == [newest]
    tune_copy = tmp_path / "scratch" / "checkpoint_000003"
    assert candidates(Fallback(tune_copy, (root / "step_000002", root / "step_999999")), root) == [
        tune_copy, root / "step_999999", root / "step_000002"]


def test_a_checkpoint_file_that_is_not_readable_here_is_no_damage_and_no_fallback(tmp_path, monkeypatch):
    """A file the process may not read (another user's, a mount's permissions) may well be whole: it stops
    the resume in one line naming the file, where damage (Unreadable) would send it a checkpoint back."""
    import safetensors.torch
    import torch

    from shortft import lora, safe_load

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    (tmp_path / "optimizer.pt").write_bytes(b"whole")
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"whole")
    monkeypatch.setattr(torch, "load", denied)
    monkeypatch.setattr(safetensors.torch, "load_file", denied)
    for read, line in ((lambda: safe_load.load(tmp_path / "optimizer.pt", "checkpoint"),
                        f"checkpoint {tmp_path / 'optimizer.pt'}: not readable here (Permission denied)"),
                       (lambda: lora.read_lora_file(tmp_path),
                        f"LoRA {tmp_path / 'pytorch_lora_weights.safetensors'}: not readable here (Permission denied)")):
        with pytest.raises(ConfigError) as told:
            read()
        assert str(told.value) == line and not isinstance(told.value, checkpoint.Unreadable)


GRID_ON_A_FULL_DISK = '''
import resource, signal, sys, torch
from pathlib import Path
from shortft.evaluate import save_grid
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))
images = torch.zeros(4, 3, 64, 64)  # a PNG of about 5 KB: inside one write buffer, so the write fails at close
images[:, :, :16, :16] = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
try:
    save_grid(images, Path(sys.argv[1]))
except OSError as e:
    print("refused:", e)
'''


def test_a_sample_grid_the_disk_cuts_short_leaves_no_file(tmp_path):
    """PIL wrote the grid in place, and removes what it wrote when its encoder fails but not when the file's
    last buffer fails at close: a disk that filled up there left a cut PNG, which the loop took for written
    (`is_file`) and logged to MLflow."""
    path = tmp_path / "samples" / "step_000002.png"
    p = subprocess.run([sys.executable, "-c", GRID_ON_A_FULL_DISK, str(path)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and p.stdout.startswith("refused: "), p.stdout + p.stderr[-2000:]
    assert list(path.parent.iterdir()) == []


def test_a_resume_keeps_the_runs_stages_result_and_the_other_line_of_checkpoints(make_cfg, tmp_path, capsys):
    """A longer train.steps on resume put a progressive run back into stage 1 (its LoRA frozen, its moments
    dropped); a resume of a finished run wrote result.json again with no evaluation; a metrics.jsonl line
    cut short made every resume a JSONDecodeError; a resume from an earlier checkpoint kept the later
    ones, whose step numbers made pruning remove the checkpoint just written; a new run took over a
    finished run's folder whose checkpoints were removed."""
    base = ("chain.steps=4", "chain.segments=2", "eval.every=0")

    def rows():
        return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]

    shortft.train(make_cfg(*base, "train.steps=3", "train.checkpoint_every=3"))
    assert [r["stage"] for r in rows()] == [1, 1, 2]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "lo')  # killed as it wrote
    shortft.train(make_cfg(*base, "train.steps=5", "train.checkpoint_every=1"), resume=True)
    assert [r["stage"] for r in rows()] == [1, 1, 2, 2, 2]  # stage 2 stretched over the longer run
    assert "line 4 is cut short or not JSON; left out" in capsys.readouterr().err
    capsys.readouterr()
    again = shortft.train(make_cfg(*base, "train.steps=5"), resume=True)
    assert "resume: step 5 of train.steps=5 (or the budget) reached; nothing left to train" in capsys.readouterr().err
    assert again.eval == json.loads((tmp_path / "run" / "result.json").read_text())["eval"] != {}
    assert result["eval"].keys() == again.eval.keys()
    # From step 3 again, another seed: steps 4 and 5 of the line left are renamed, not pruned over.
    ckpts = tmp_path / "run" / "checkpoints"
    assert [p.name for p in checkpoint.list_checkpoints(ckpts)] == ["step_000004", "step_000005"]
    shutil.copytree(ckpts / "step_000004", tmp_path / "step_000003")  # an earlier checkpoint, kept elsewhere
    (tmp_path / "step_000003" / "state.json").write_text(json.dumps(
        {**json.loads((ckpts / "step_000004" / "state.json").read_text()), "step": 3}))
    shutil.copytree(tmp_path / "step_000003", ckpts / "step_000003")
    shortft.train(make_cfg(*base, "train.steps=4", "train.seed=1", "train.keep_checkpoints=1"),
                  resume=ckpts / "step_000003")
    assert [p.name for p in checkpoint.list_checkpoints(ckpts)] == ["step_000004"]
    assert json.loads((ckpts / "step_000004" / "state.json").read_text())["config"]["train.seed"] == 1
    assert sorted(p.name for p in ckpts.glob("left-*")) == ["left-step_000004", "left-step_000005"]
    assert "resume: step_000005 was after step_000003: renamed" in capsys.readouterr().err
    shutil.rmtree(ckpts)
    # A config that names the folder itself (a run's or a sweep trial's config.yaml): name= would not move it
    with pytest.raises(ConfigError, match=r"holds a finished run \(result.json, lora/\); set train.output_dir=<another "
                                          r"folder> to start another \(this config's train.output_dir names the folder "
                                          r"itself, without \{name\}: name= does not move it\)"):
        shortft.train(make_cfg(*base, "train.steps=1", "name=other"))
    with pytest.raises(ConfigError, match=r"holds a finished run \(result.json, lora/\); set name=<new name> \(or "):
        shortft.train(make_cfg(*base, "train.steps=1", f"train.output_dir={tmp_path}/{{name}}", "name=run"))


def test_a_run_killed_past_its_result_is_not_called_finished_and_its_last_loras_are_evaluated(make_cfg, tmp_path,
                                                                                                capsys):
    """A finished run trained on (`--resume train.steps=4`) and killed after step 3's checkpoint was called
    finished (its result.json of step 2); resumed with its first train.steps=2 it wrote result.json for step 3
    with the evaluation of step 2's LoRAs, and said it as `done: ... eval {...}`."""
    from shortft.cli import main
    from shortft.evaluate import scalars
    from shortft.loop import Callback

    class Killed(Callback):
        def on_step(self, step, metrics, artifacts):
            if step == 3:
                raise RuntimeError("killed")

    base = ("chain.steps=4", "chain.segments=1", "eval.every=0", "train.checkpoint_every=1")
    first = shortft.train(make_cfg(*base, "train.steps=2")).eval
    with pytest.raises(RuntimeError, match="killed"):
        shortft.train(make_cfg(*base, "train.steps=4"), [Killed()], resume=True)
    with pytest.raises(ConfigError, match=r"holds a run \(checkpoints to step 3; its result.json is of step 2\); "
                                          r"pass --resume to continue it"):
        shortft.train(make_cfg(*base, "train.steps=4"))
    capsys.readouterr()
    result = shortft.train(make_cfg(*base, "train.steps=2"), resume=True)
    assert ("nothing left to train; its last evaluation was of step 2: evaluating step 3's LoRAs"
            in capsys.readouterr().err)
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["steps"] == 3 and saved["eval"] == result.eval != first
    assert main(["eval", "--config", "tiny", "--lora", str(tmp_path / "run" / "lora"), *base,
                 f"model.pretrained={make_cfg().model.pretrained}"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):]) == scalars(result.eval)  # `shortft eval` of the run's LoRAs


def test_a_checkpoint_is_on_the_disk_before_it_is_published_and_the_one_before_it_pruned(make_cfg, tmp_path,
                                                                                         monkeypatch):
    """Nothing was fsynced: the rename that publishes a checkpoint, and the pruning after it, could outrun
    its bytes, and a power or node loss left a checkpoint of empty files with the one before it gone. A
    second Ctrl-C during a save left its temporary folder for good."""
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / ".tmp-step_000007").mkdir()  # cut short by a second Ctrl-C in an earlier process
    shortft.train(make_cfg("chain.steps=4", "chain.segments=2", "train.steps=2", "train.checkpoint_every=1",
                           "train.keep_checkpoints=1", "eval.every=0"))
    assert not list(ckpts.glob(".tmp-*"))
    tmp = str(ckpts / ".tmp-step_000002")
    files = [s for s in synced if s.startswith(tmp + "/")]
    assert {Path(s).name for s in files} >= {"state.json", "optimizer.pt", "pytorch_lora_weights.safetensors"}
    assert synced.index(tmp) > max(synced.index(s) for s in files)  # the files, then their folder
    assert str(ckpts) in synced[synced.index(tmp):]  # then the rename, before the pruning


def test_a_finished_runs_loras_are_replaced_whole(tmp_path, monkeypatch):
    """A finished run resumed for more steps wrote its adapters one by one over the old: a kill (or a full
    disk) between two left a folder of both steps, which `sample --lora` loaded without a word, and an
    adapter the new run does not have stayed."""
    from shortft import lora_save

    def save(unet, names, out_dir, plan):  # the adapters one by one, as save_loras writes them
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            if name == "full":
                raise OSError(errno.ENOSPC, "No space left on device")
            (out_dir / name).write_text(str(plan["step"]))

    monkeypatch.setattr(lora_save, "save_loras", save)
    out = tmp_path / "lora"
    lora_save.save_loras_whole(None, ["segment_1", "segment_2"], out, {"step": 1})
    lora_save.save_loras_whole(None, ["segment_1"], out, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"] and [p.name for p in out.iterdir()] == ["segment_1"]
    assert (out / "segment_1").read_text() == "2"
    with pytest.raises(OSError):
        lora_save.save_loras_whole(None, ["segment_1", "full"], out, {"step": 3})
    assert [(p.name, p.read_text()) for p in out.iterdir()] == [("segment_1", "2")]  # the last whole one
    assert [p.name for p in tmp_path.iterdir()] == ["lora"]  # and not the half that filled the disk


def test_a_sweeps_files_cut_short_are_one_line_or_made_again(tmp_path, capsys):
    """base.json and shortft_sweep.json, cut short (a full disk as they were written), stopped every
    `--resume` with a JSONDecodeError traceback."""
    from shortft.sweep import baseline, saved

    (tmp_path / "base.json").write_text('{"eval/objective": 0.')
    assert baseline.read_base(tmp_path / "base.json") is None
    assert "base.json is unreadable (JSONDecodeError); evaluating the untrained model again" in capsys.readouterr().out
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / saved.FILE).write_text('{"space": "to')
    with pytest.raises(ConfigError, match=r"^sweep 's': its settings \(.*shortft_sweep.json\) are cut short or "
                                          r"unreadable; remove that file and resume with the flags the sweep "
                                          r"started with, or start it again under another --name$"):
        saved.settle({}, str(tmp_path), "s", resume=True)


_STOP_AT_TORCH = """
import sys

class CtrlC:  # the user's Ctrl-C as torch imports (seconds on a CPU machine)
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt

sys.meta_path.insert(0, CtrlC())
"""


@pytest.mark.parametrize("start,line", [
    ("import shortft; sys.exit(shortft.console())", "shortft: interrupted while starting"),
    ("import runpy; sys.argv = ['tune/sweep.py']; runpy.run_path('tune/sweep.py', run_name='__main__')",
     "tune/sweep.py: interrupted while starting"),
])
def test_a_ctrl_c_while_the_commands_import_is_one_line(start, line):
    """`shortft train ...` or `python tune/sweep.py` interrupted in their first seconds printed the traceback of
    the import torch was in."""
    from importlib.metadata import entry_points

    if "console" in start:
        assert entry_points(group="console_scripts")["shortft"].value == "shortft:console"  # what `shortft` runs
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", _STOP_AT_TORCH + start], cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert (done.returncode, done.stderr.strip()) == (130, line), done.stderr[-2000:]
