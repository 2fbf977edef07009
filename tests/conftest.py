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


def pytest_configure(config):
    # The Ray tests share one xdist group so that two Ray clusters never start side by side. pytest 9.2
    # ignores the group that xdist 3.8 sets (it writes `item._nodeid`), which lets them: refuse early.
    if getattr(config.option, "dist", "no") == "loadgroup":
        major, minor = (int(x) for x in pytest.__version__.split(".")[:2])
        if (major, minor) >= (9, 2):
            raise pytest.UsageError(f"pytest {pytest.__version__} drops xdist_group marks: "
                                    "pip install 'pytest<9.2' (as the dev extra pins)")


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
        given = {o.split("=", 1)[0].strip() for o in overrides}  # the test's own value, without a default before it
        defaults = [f"model.pretrained={tiny_dir}", f"train.output_dir={tmp_path}/run", "train.log_every=100"]
        return shortft.load_config(config, [*(d for d in defaults if d.split("=", 1)[0] not in given), *overrides])

    torch.manual_seed(0)
    return make


def lora_state(unet) -> dict:
    return {k: v.detach().clone() for k, v in unet.named_parameters() if "lora_" in k}


def frozen_state(*modules) -> dict:
    out = {}
    for i, m in enumerate(modules):
        out.update({f"{i}.{k}": v.detach().clone() for k, v in m.state_dict().items() if "lora_" not in k})
    return out


def kill_with_env(key: str, value: str) -> None:
    """Kills the processes whose environment has key=value: the leftovers of one Ray a test started
    (never `ray stop`: it stops every Ray on the machine, other tests' too)."""
    import psutil

    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(key) == value:
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass


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


class TcpGate:
    """A TCP forwarder on 127.0.0.1 (`.port`) to `target_port`. `.close()` cuts every open connection and
    every new one (a server that went away, instantly and at a known moment; `.cut` counts the
    connections it refused), `.open()` lets them through again."""

    def __init__(self, target_port: int):
        import socket
        import threading

        self.target, self.is_open, self.cut, self.live = target_port, True, 0, []
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                if not self.is_open:
                    self.cut += 1
                    client.close()
                    continue
                upstream = socket.create_connection(("127.0.0.1", self.target))
                self.live += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst) -> None:
        import socket

        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        import socket

        with self.lock:
            self.is_open = False
            for s in self.live:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.live.clear()

    def open(self) -> None:
        with self.lock:
            self.is_open = True


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1, started by the test and stopped after it."""
    server = MlflowServer(tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.stop()
