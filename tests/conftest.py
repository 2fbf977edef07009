"""Shared fixtures: a tiny SD pipeline built from configs under a fixed seed (never downloaded)."""

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one thread per torch process (this one and the ones it starts), else
    # OpenMP threads of both workers spin against each other.
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

import shortft
from shortft import builtin


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    # Built-in models go to a per-session cache, so tests never read a user's cache.
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("SHORTFT_CACHE")
    os.environ["SHORTFT_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("SHORTFT_CACHE", None)
    else:
        os.environ["SHORTFT_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_dir(_cache):
    return builtin.resolve("builtin:tiny")


@pytest.fixture
def make_cfg(tmp_path, tiny_dir):
    """tiny config with overrides, writing under this test's tmp dir."""

    def make(*overrides, config="tiny"):
        return shortft.load_config(config, [f"model.pretrained={tiny_dir}", f"train.output_dir={tmp_path}/run",
                                            "train.log_every=100", *overrides])

    torch.manual_seed(0)
    return make


def lora_state(unet) -> dict:
    return {k: v.detach().clone() for k, v in unet.named_parameters() if "lora_" in k}


def frozen_state(*modules) -> dict:
    out = {}
    for i, m in enumerate(modules):
        out.update({f"{i}.{k}": v.detach().clone() for k, v in m.state_dict().items() if "lora_" not in k})
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (`.port`); `.stop()` takes it away, `.start()` brings it back
    on the same port and store."""

    def __init__(self, tmp_path):
        self.port, self.tmp_path, self.process = _free_port(), tmp_path, None

    def start(self) -> None:
        import subprocess
        import sys
        import time
        import urllib.request

        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.tmp_path}/server.db",
             "--artifacts-destination", str(self.tmp_path / "server-artifacts")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 180  # a loaded 2-core machine can take a minute
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2).read()
                return
            except OSError:
                if self.process.poll() is not None:
                    pytest.fail(f"mlflow server exited with {self.process.returncode}")
                time.sleep(0.25)
        pytest.fail("mlflow server did not come up in 180 s")

    def stop(self) -> None:
        import signal

        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except Exception:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1, started by the test and stopped after it."""
    server = MlflowServer(tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.stop()
