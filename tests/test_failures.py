"""Failures that must lose nothing: a checkpoint write that fails, the fp16 loss scale across a resume."""

import errno
import subprocess
import sys

import pytest
import torch

import shortft
from shortft import checkpoint


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

    from shortft.tracking import MlflowLogger

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


def _train_with_server(tmp_path, tiny_dir, port: int, name: str, steps: int):
    return subprocess.Popen([sys.executable, "-m", "shortft.cli", "train", "--config", "tiny",
                             f"model.pretrained={tiny_dir}", f"train.steps={steps}", "chain.steps=4",
                             "chain.segments=2", f"train.checkpoint_every={steps}",
                             f"train.output_dir={tmp_path / name}", "--tracking-uri", f"http://127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(run_dir, step: int, proc) -> None:
    import time

    deadline = time.time() + 300
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= step:
            return
        time.sleep(0.1)
    pytest.fail(f"the run never reached step {step}: {proc.poll()=}")


@pytest.mark.slow
def test_the_tracking_server_going_away_mid_run_does_not_stop_training(mlflow_server, tmp_path, tiny_dir):
    import json

    from mlflow.tracking import MlflowClient

    from tests.conftest import TcpGate

    # The run reaches the real server through a gate the test cuts at a known step: a server restart
    # takes from seconds to minutes on a loaded machine, the gate takes none.
    gate = TcpGate(mlflow_server.port)

    # 1. The server goes away at step 2 and stays away: the run finishes, one line says what was lost.
    proc = _train_with_server(tmp_path, tiny_dir, gate.port, "away", 6)
    _wait_for_step(tmp_path / "away", 2, proc)
    gate.close()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    lines = [line for line in err.splitlines() if "mlflow" in line.lower()]
    assert len(lines) == 1 and "were not logged to" in lines[0] and "Traceback" not in err, err[-3000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "away" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == list(range(1, 7))
    assert (tmp_path / "away" / "checkpoints" / "step_000006").is_dir() and (tmp_path / "away" / "lora").is_dir()

    # 2. It goes away from step 2 to step 4 and comes back: everything is logged after all.
    gate.open()
    proc = _train_with_server(tmp_path, tiny_dir, gate.port, "back", 8)
    _wait_for_step(tmp_path / "back", 2, proc)
    gate.close()
    _wait_for_step(tmp_path / "back", 4, proc)
    gate.open()
    assert proc.poll() is None, "the run ended before the server came back"
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "were not logged" not in err, err[-3000:]
    assert gate.cut > 0  # the run did try to log while the server was away
    client = MlflowClient(f"http://127.0.0.1:{mlflow_server.port}")
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("shortft").experiment_id])
              if r.info.run_name == "tiny" and str(tmp_path / "back") in r.data.tags.get("shortft.run_key", "")]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, 9))
    assert run.info.status == "FINISHED"


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
