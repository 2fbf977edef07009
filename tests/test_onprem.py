"""`ray up` + `ray submit clusters/onprem.yaml tune/sweep.py` + `ray down`, for real, on this machine.

The test starts its own SSH server on 127.0.0.1 (a free port, a throwaway key), which stands for a GPU
box the user owns, points a copy of clusters/onprem.yaml at it and runs the commands the file's header
prints, with Ray's token authentication on. Ray's on-prem launcher always dials port 22, so its
`ssh_proxy_command` carries the connection to the test's port. The SSH sessions get their own $HOME
(sshd's SetEnv), so nothing is written into the real user's home; in it, `shortft-env` is this test's
own virtualenv, already holding the project (the file's `pip install` needs the network, so the
install marker is laid down as a finished install leaves it). Everything Ray keeps on disk goes under
the test's directory (RAY_TMPDIR). Where it may (root, util-linux's unshare), the sshd runs in a PID
namespace of its own, as on another machine: the `ray stop` that `ray up` and `ray down` run there
sees only that machine's processes, so Ray tests on the other pytest worker go on undisturbed. At the
end no process and no file of the test is left.
"""

import getpass
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import _free_port

# With test_clusters.py: the tests that start multi-node clusters run one after another, beside the
# other Ray tests (tests/test_sweep.py says why that is safe).
pytestmark = [pytest.mark.xdist_group("clusters"), pytest.mark.slow]
UNSHARE = shutil.which("unshare")

ROOT = Path(__file__).resolve().parents[1]
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
TOOLS = {"sshd": SSHD, "ssh": shutil.which("ssh"), "ssh-keygen": shutil.which("ssh-keygen"),
         "rsync": shutil.which("rsync")}
RELAY = """import os, socket, sys, threading
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
def up():
    while b := os.read(0, 1 << 16):
        s.sendall(b)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while b := s.recv(1 << 16):
    os.write(1, b)
"""


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def machine():
    """An sshd on 127.0.0.1:<free port> whose sessions have HOME=<base>/remote; yields the paths."""
    missing = [name for name, path in TOOLS.items() if not path or not os.access(path, os.X_OK)]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{', '.join(missing)} missing: .ci/run installs openssh-server and rsync")
        pytest.skip(f"needs {', '.join(missing)} (apt install openssh-server rsync)")
    # A short base path: Ray's sockets live under RAY_TMPDIR and Unix socket paths stop at 107 bytes.
    base = Path(tempfile.mkdtemp(prefix="sft", dir="/tmp"))
    remote, local, rt = base / "remote", base / "local", base / "rt"
    for d in (remote, local, rt):
        d.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / "host_key")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / "user_key")], check=True)
    shutil.copy(base / "user_key.pub", base / "authorized_keys")
    port = _free_port()
    (base / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {base}/host_key\nAuthorizedKeysFile {base}/authorized_keys\n"
        f"PidFile {base}/sshd.pid\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        f"PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
        f"SetEnv HOME={remote} RAY_TMPDIR={rt}\n")
    # sshd starts a session in the user's home from the password database; the bashrc brings Ray's
    # login shells to the $HOME this machine stands for (a real node starts there).
    # MLFLOW_WORKERS=1: one uvicorn worker for MLflow on this small test machine (the file's default is 4).
    (remote / ".bashrc").write_text('cd "$HOME"\nexport MLFLOW_WORKERS=1\n')
    (remote / "shortft-env").symlink_to(sys.prefix)
    shutil.copy(ROOT / "pyproject.toml", remote / ".shortft-installed.toml")
    (base / "relay.py").write_text(RELAY)
    made_run_dir = not Path("/run/sshd").exists()  # sshd's privilege separation directory
    if made_run_dir:
        Path("/run/sshd").mkdir(mode=0o755)
    own_pids = [UNSHARE, "--pid", "--fork", "--mount-proc", "--kill-child"] if UNSHARE and os.geteuid() == 0 else []
    if not own_pids and os.environ.get("CI"):
        pytest.fail("unshare (util-linux) as root is needed: without a PID namespace `ray stop` stops every Ray test")
    sshd = subprocess.Popen([*own_pids, SSHD, "-D", "-e", "-f", str(base / "sshd_config")],
                            stderr=open(base / "sshd.log", "w"))
    try:
        deadline = time.time() + 10
        while not _listening(port):
            assert sshd.poll() is None and time.time() < deadline, (base / "sshd.log").read_text()
            time.sleep(0.1)
        yield {"base": base, "remote": remote, "local": local, "rt": rt, "port": port, "sshd": sshd.pid}
    finally:
        import psutil

        for p in [*psutil.Process(sshd.pid).children(), psutil.Process(sshd.pid)]:  # the namespace's init first:
            p.kill()  # the kernel ends every process left in its namespace with it
        sshd.wait(timeout=30)
        if made_run_dir:
            shutil.rmtree("/run/sshd", ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def _cluster_file(m: dict, name: str, mlflow_port: int, ray_port: int) -> Path:
    """A copy of clusters/onprem.yaml pointed at the test's machine: its address, user, key and ports."""
    text = (ROOT / "clusters" / "onprem.yaml").read_text()
    text = text.replace("5000", str(mlflow_port)).replace("6379", str(ray_port))
    text = text.replace("/mnt/shared/shortft/sweeps", str(m["base"] / "shared"))
    config = yaml.safe_load(text)
    config["cluster_name"] = name
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["auth"] = {"ssh_user": getpass.getuser(), "ssh_private_key": str(m["base"] / "user_key"),
                      "ssh_proxy_command": f"{sys.executable} {m['base'] / 'relay.py'} {m['port']}"}
    path = m["base"] / "onprem.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _processes_of(m: dict) -> list[str]:
    """Processes started on the test's machine: every SSH session has HOME=<remote>, and whatever Ray
    or MLflow starts from one inherits it."""
    import psutil

    found = []
    server = {m["sshd"], *(c.pid for c in psutil.Process(m["sshd"]).children())}  # the listener (in unshare)
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.info["pid"] in server:
                continue
            if p.environ().get("HOME") == str(m["remote"]) or str(m["base"]) in " ".join(p.info["cmdline"] or []):
                found.append(f"{p.info['pid']} {' '.join(p.info['cmdline'] or [])[:200]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def test_ray_up_submit_down_on_an_onprem_cluster(machine):
    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient

    name = f"sft-{os.getpid()}"
    mlflow_port, ray_port = _free_port(), _free_port()
    config = _cluster_file(machine, name, mlflow_port, ray_port)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(HOME=str(machine["local"]), RAY_TMPDIR=str(machine["rt"]), TMPDIR=str(machine["rt"]),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")

    def ray(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(["ray", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 or not check, f"ray {args[0]}: {r.stdout[-3000:]}{r.stderr[-3000:]}"
        return r

    ray("get-auth-token", "--generate")  # the header's first step: ~/.ray/auth_token on the user's machine
    token = (machine["local"] / ".ray" / "auth_token").read_text().strip()
    outputs = []
    try:
        outputs.append(ray("up", "-y", str(config)))
        r = ray("submit", str(config), "tune/sweep.py", "--", "--smoke-test", "--num-samples", "1", "--name", "onprem")
        outputs.append(r)
        assert "sweep onprem: 1 trials" in r.stdout, r.stdout[-3000:]

        remote = machine["remote"]
        rows = pq.read_table(remote / "runs" / "sweeps" / "onprem" / "results.parquet").to_pylist()
        assert len(rows) == 1 and rows[0]["status"] == "DONE", rows
        assert (machine["base"] / "shared" / "onprem" / "tuner.pkl").is_file()  # SHORTFT_STORAGE_PATH
        c = MlflowClient(f"http://127.0.0.1:{mlflow_port}")  # the head's server, as `ray attach -p` shows it
        runs = c.search_runs([c.get_experiment_by_name("shortft-sweeps").experiment_id])
        children = [x for x in runs if "mlflow.parentRunId" in x.data.tags]
        assert len(runs) - len(children) == 1 and len(children) == 1
        assert {x.data.tags["mlflow.parentRunId"] for x in children} == {x.info.run_id for x in runs} - {
            x.info.run_id for x in children}
        assert all("loss" in x.data.metrics and "eval/objective" in x.data.metrics for x in children)
        # the untrained model, evaluated by a Ray task on a node that runs trials, its row and metrics home
        assert "| untrained | BASE |" in (remote / "runs" / "sweeps" / "onprem" / "results.md").read_text()
        parent = next(x for x in runs if "mlflow.parentRunId" not in x.data.tags)
        assert 0 < parent.data.metrics["base/objective"] < 1 and parent.data.metrics["base/seconds"] > 0
        assert "grids/base.png" in {a.path for a in c.list_artifacts(parent.info.run_id, "grids")}
        assert (remote / "mlflow" / "mlflow.db").is_file()  # the head's disk, not the driver's cwd
        # the token stays in its two files: not in the output, the runs, the tables or Ray's storage
        assert all(token not in o.stdout + o.stderr for o in outputs)
        holders = {p for p in machine["base"].rglob("*") if p.is_file() and not p.is_symlink()
                   and p.stat().st_size < 50_000_000 and token.encode() in p.read_bytes()}
        assert holders <= {machine["local"] / ".ray" / "auth_token", remote / ".ray" / "auth_token"}, holders
        assert all(token not in str(x.data.params) + str(x.data.tags) for x in runs)
    finally:  # the header's last two steps; checked below, so that a failure above is the one reported
        stopped = ray("exec", str(config), "bash ~/shortft/clusters/mlflow-server.sh stop", check=False)
        down = ray("down", "-y", str(config), check=False)
        # Ray's SSH connection-sharing sockets, kept in /tmp whatever TMPDIR says (command_runner.py)
        user_dir = Path("/tmp") / f"ray_ssh_{hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]}"
        shutil.rmtree(user_dir / hashlib.sha256(name.encode()).hexdigest()[:10], ignore_errors=True)
        if user_dir.is_dir() and not any(user_dir.iterdir()):
            user_dir.rmdir()
    assert stopped.returncode == 0 and down.returncode == 0, stopped.stderr[-2000:] + down.stderr[-2000:]
    deadline = time.time() + 30
    while (left := _processes_of(machine)) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, left
    assert not _listening(mlflow_port) and not _listening(ray_port)
    assert not [p for d in (Path("/tmp"), Path.home()) for p in d.glob(f"*{name}*")]
