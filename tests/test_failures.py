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
