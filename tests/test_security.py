"""Files others can write are never unpickled; a checkpoint with code in it is refused in one line."""

import json
import re
import subprocess
import sys

import pytest
import torch

import shortft
from shortft.config import ConfigError


class _Payload:
    """What a hostile optimizer.pt could hold: unpickling it would write `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _poison(checkpoint_dir, marker):
    blob = torch.load(checkpoint_dir / "optimizer.pt", weights_only=True)
    blob["optimizer"]["extra"] = _Payload(marker)
    torch.save(blob, checkpoint_dir / "optimizer.pt")


def test_a_checkpoint_that_would_run_code_is_refused(make_cfg, tmp_path):
    cfg = make_cfg("train.steps=4", "train.checkpoint_every=2", "chain.steps=4", "chain.segments=2",
                   f"train.output_dir={tmp_path}/run")
    shortft.train(cfg)
    latest = tmp_path / "run/checkpoints/step_000004"
    marker = tmp_path / "pwned"
    _poison(latest, marker)
    with pytest.raises(ConfigError, match="refused"):
        shortft.train(cfg, resume=str(latest))
    assert not marker.exists()
    p = subprocess.run([sys.executable, "-m", "shortft.cli", "train", "--config", "tiny",
                        f"model.pretrained={cfg.model.pretrained}", "train.steps=4", "chain.steps=4",
                        "chain.segments=2", f"train.output_dir={tmp_path}/run", "--resume", str(latest), "--no-mlflow"],
                       capture_output=True, text=True, timeout=300)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "refused" in lines[0] and "Traceback" not in p.stderr, p.stderr
    assert not marker.exists()


@pytest.mark.parametrize("link", [".shortft.lock", "metrics.jsonl", "samples/.tmp-step_000004.png"])
def test_a_resume_refuses_a_run_folder_that_holds_a_symbolic_link(make_cfg, tmp_path, link):
    """A received run folder (or one on shared storage) with `metrics.jsonl -> ~/.bashrc`: the resume appended
    its rows there; a linked `.shortft.lock` had its target replaced by the lock's JSON."""
    cfg = make_cfg("train.steps=4", "train.checkpoint_every=2", "chain.steps=4", "chain.segments=2")
    shortft.train(cfg)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (cfg.output_dir / link).unlink(missing_ok=True)
    (cfg.output_dir / link).symlink_to(victim)
    more = make_cfg("train.steps=6", "train.checkpoint_every=2", "chain.steps=4", "chain.segments=2")
    with pytest.raises(ConfigError, match=f"{link}: a symbolic link \\(to {victim}\\); a run folder holds none"):
        shortft.train(more, resume=True)
    assert victim.read_text() == "precious\n"


def test_whole_file_writes_replace_a_planted_temporary_link(tmp_path):
    """The temporary file of a whole-or-nothing write, planted as a link, was written through."""
    from shortft.evaluate import save_grid
    from shortft.out_paths import write_whole

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("samples.json", "grid.png"):
        (tmp_path / f".tmp-{name}").symlink_to(victim)
    write_whole(tmp_path / "samples.json", "{}")
    save_grid(torch.zeros(1, 3, 4, 4), tmp_path / "grid.png")
    assert victim.read_text() == "precious" and (tmp_path / "samples.json").read_text() == "{}"
    assert not any(p.is_symlink() for p in tmp_path.iterdir())


def test_reports_from_a_shared_folder_write_nothing_outside_it_nor_through_links(tmp_path):
    """`compare.py --report-only` of a folder someone else wrote: an arm named `../../x` in rows.jsonl had its
    grid copied to x.png outside it, and report.md, the plot, a sweep's results.parquet, results.md and
    best_config.yaml were written through links planted under their names. And a planted samples.json
    had `sample --out` delete any .png it listed."""
    from shortft.sample import INDEX, clear_earlier
    from shortft.sweep.compare_report import write_report
    from shortft.sweep.results import write_table

    victim, run = tmp_path / "victim.txt", tmp_path / "run"
    victim.write_text("precious")
    (run / "samples").mkdir(parents=True)
    (run / "samples" / "step_000002.png").write_bytes(b"\x89PNG planted")
    row = {"arm": "../escaped", "lr_trials": 1, "chosen": True, "lr": 1e-3, "seed": 0, "run_dir": str(run),
           "final": {"eval/objective": 0.5, "step": 2, "calls_total": 4}, "evals": []}
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "rows.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ConfigError, match=re.escape("line 1: arm='../escaped': a name is one folder's name")):
        write_report(out / "rows.jsonl")
    assert not (tmp_path / "escaped.png").exists()
    (out / "rows.jsonl").write_text(json.dumps({**row, "arm": "shortft"}) + "\n")
    (out / "grids").mkdir()
    for name in ("report.md", "objective_vs_seconds.png", "grids/shortft.png", "results.parquet"):
        (out / name).symlink_to(victim)
    write_report(out / "rows.jsonl")
    write_table([{"trial": "t001", "objective": 0.5}], out / "results.parquet")
    assert victim.read_text() == "precious" and not any(p.is_symlink() for p in out.rglob("*"))
    (out / "wedding.png").write_bytes(b"mine")
    for name in ("000-a-seed0.png", "compare.png"):
        (out / name).write_bytes(b"sampled")
    (out / INDEX).write_text(json.dumps({"images": [{"file": n} for n in ("wedding.png", "000-a-seed0.png",
                                                                            "compare.png", "../victim.txt")]}))
    assert clear_earlier(out) == 2 and (out / "wedding.png").is_file() and victim.is_file()


@pytest.mark.parametrize("uri,shown", [  # the password was shown from an @ or / in it on
    ("mysql://alice:p@S3cretPW@127.0.0.1:1/db", "mysql://alice:***@127.0.0.1:1/db"),
    ("http://alice:pa/S3cretPW@127.0.0.1:1", "http://alice:***@127.0.0.1:1"),
    ("mysql+pymysql://alice@h/db?password=S3cretPW", "mysql+pymysql://alice@h/db?password=***"),  # as given
])
def test_a_password_with_an_at_or_a_slash_or_in_the_query_is_not_shown(uri, shown, tmp_path):
    from shortft import run_record, run_store
    from shortft.credentials import has_secret, redacted

    assert redacted(uri) == shown and has_secret(uri)
    run_store.remember(tmp_path, uri, "e", "r")  # a query's password was written into shortft_run.json
    assert "S3cretPW" not in (tmp_path / run_record.FILE).read_text()


def test_a_checkpoint_with_cuda_rng_state_resumes_on_a_cpu(make_cfg, tmp_path):
    cfg = make_cfg("train.steps=4", "train.checkpoint_every=2", "chain.steps=4", "chain.segments=2",
                   f"train.output_dir={tmp_path}/run")
    shortft.train(cfg)
    step2 = tmp_path / "run/checkpoints/step_000002"
    blob = torch.load(step2 / "optimizer.pt", weights_only=True)
    blob["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 8  # as an 8-GPU machine would save it
    torch.save(blob, step2 / "optimizer.pt")
    assert shortft.train(cfg, resume=str(step2)).steps == 4


def _files_holding(root, needle: bytes) -> list:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


@pytest.mark.slow
@pytest.mark.xdist_group("ray")  # it runs a sweep (see test_sweep.py)
def test_credentials_in_the_tracking_uri_are_never_printed_or_stored(mlflow_server, tmp_path, tiny_dir):
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    uri = f"http://user:s3cr3t-word@127.0.0.1:{mlflow_server.port}"
    work = tmp_path / "work"
    work.mkdir()
    root = Path(__file__).resolve().parents[1]
    (work / "sweep.py").write_bytes((root / "tune" / "sweep.py").read_bytes())
    # The run and the sweep side by side: independent processes, most of each is start-up.
    procs = [subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for args, cwd in (
        ([sys.executable, "-m", "shortft.cli", "train", "--config", "tiny", f"model.pretrained={tiny_dir}",
          "train.steps=2", "chain.steps=4", "chain.segments=2", f"train.output_dir={tmp_path}/run", "--tracking-uri",
          uri], None),
        ([sys.executable, "sweep.py", "--smoke-test", "--num-samples", "1", "--name", "creds", "--storage-path",
          str(tmp_path / "storage"), "--tracking-uri", uri], work))]
    (run_out, run_err), (sweep_out, sweep_err) = [p.communicate(timeout=600) for p in procs]
    assert procs[0].returncode == 0, run_err[-2000:]
    assert procs[1].returncode == 0, sweep_out[-2000:] + sweep_err[-2000:]
    for output in (run_out, run_err, sweep_out, sweep_err):
        assert "s3cr3t-word" not in output
    for output in (run_out, sweep_out):  # (`mlflow ui --backend-store-uri http://...`, which opens no server's runs)
        assert f"compare the runs: the MLflow UI at http://127.0.0.1:{mlflow_server.port}" in output, output[-2000:]
    assert _files_holding(tmp_path, b"s3cr3t-word") == []  # runs, Tune/Train storage, the server's db and artifacts
    client = MlflowClient(f"http://127.0.0.1:{mlflow_server.port}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) >= 3  # the single run, the sweep's parent and its trial
    for r in runs:
        assert "s3cr3t-word" not in str(r.data.params) + str(r.data.tags)


def test_every_server_the_project_starts_listens_on_loopback():
    import re
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    servers = 0
    for path in sorted((root / "clusters").glob("*.yaml")) + sorted((root / "clusters").glob("*.sh")):
        text = path.read_text()
        for command in re.findall(r"mlflow server --[^\n&>]*(?:\n\s+--[^\n&>]*)*", text):
            assert "--host 127.0.0.1" in command, (path.name, command)
            servers += 1
        for command in re.findall(r"ray start --head[^\n]*", text):
            assert "--dashboard-host=127.0.0.1" in command, (path.name, command)
            servers += 1
        for doc in yaml.safe_load_all(text) if path.suffix == ".yaml" else []:
            # KubeRay: the operator and the job submitter reach the dashboard at the head's Service, so it
            # keeps KubeRay's default (the pod's IP); token authentication guards it instead
            assert "dashboard-host" not in dict(_walk(doc)), path.name
            if doc.get("kind") == "RayJob":
                assert doc["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert servers >= 3  # ray start in gpu.yaml and onprem.yaml, mlflow server in mlflow-server.sh (which the
    # cluster files start MLflow through)
    for path in (root / "shortft").rglob("*.py"):
        assert "0.0.0.0" not in path.read_text(), path  # nothing in the code binds to every interface


def _walk(node, key=None):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)
    else:
        yield key, node


def test_a_postgresql_stores_password_leaves_the_uri_for_libpqs_environment(monkeypatch, capsys):
    """Only http(s) credentials were taken out: a `postgresql://user:password@...` store went as it was into
    Tune's trial configs, a sweep's record in its storage path and a run folder's record."""
    from shortft import tracking

    monkeypatch.setenv("PGPASSWORD", "")  # so that the test's end removes what the URI sets
    monkeypatch.setattr(tracking, "check_tracking_uri", lambda uri: None)  # no database here
    uri = tracking.resolve_uri("postgresql+psycopg2://me:s%40cret@db.example:5432/mlflow?sslmode=require")
    assert uri == "postgresql+psycopg2://me@db.example:5432/mlflow?sslmode=require"
    assert tracking.credentials_env() == {"PGPASSWORD": "s@cret"}  # what a cluster's job gets in its environment
    assert tracking.take_credentials("mysql://me:pw@db/mlflow") == "mysql://me:pw@db/mlflow"
    assert "password (mysql://) stays in it" in capsys.readouterr().err


@pytest.mark.parametrize("uri,line", [
    ("http://alice:S3cretPW@127.0.0.1:99999/", "tracking URI http://alice:***@127.0.0.1:99999/: Port out of range"),
    ("http://alice:S3cretPW@127.0.0.1:abc/", "tracking URI http://alice:***@127.0.0.1:abc/: Port could not be cast"),
    ("http://alice:S3cretPW@[::1/", "tracking URI http://alice:***@[::1/: Invalid IPv6 URL"),
    # a database's password stays in its URI (take_credentials says so), but not in the line of its failure
    ("mysql://alice:S3cretPW@127.0.0.1:1/db", "tracking URI mysql://alice:***@127.0.0.1:1/db: MLflow cannot use it"),
])
def test_a_bad_tracking_uri_with_a_password_is_one_line_without_it(uri, line, tmp_path, capsys):
    """A port out of range was a traceback (ValueError from urllib), and a database URI's failure line
    printed its password."""
    from shortft.cli import main

    assert main(["bench", "--config", "toy", "--count-only", "--tracking-uri", uri]) == 2  # checked first
    err = capsys.readouterr().err
    assert line in err and "S3cretPW" not in err, err


def test_the_line_that_says_where_to_compare_runs_does_not_print_a_database_password():
    """A run or sweep into `mysql://alice:S3cretPW@...` ended with `compare the runs: mlflow ui
    --backend-store-uri mysql://alice:S3cretPW@...` on stdout."""
    from shortft.tracking import ui_line

    assert ui_line("mysql://alice:S3cretPW@db/mlflow") == \
        "compare the runs: mlflow ui --backend-store-uri mysql://alice:***@db/mlflow"
    assert ui_line("sqlite:////runs/mlflow.db") == "compare the runs: mlflow ui --backend-store-uri sqlite:////runs/mlflow.db"


def test_terminal_control_characters_from_files_are_shown_escaped(capsys):
    """A received run folder's config.yaml with `model.pretrained: "builtin:toy\\x1b[31m..."` reached the terminal as
    an escape sequence inside `sample`'s note (a config value does in an error line the same way)."""
    from shortft.cli import main
    from shortft.progress import warn

    warn("trained with model.pretrained=builtin:toy\x1b[2J\x07")
    assert capsys.readouterr().err == "trained with model.pretrained=builtin:toy\\x1b[2J\\x07\n"
    assert main(["plan", "--config", "toy", "chain.method=x\x1b]0;owned\x07"]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\\x1b]0;owned\\x07" in err, err


def test_a_resume_into_the_store_of_the_environment_takes_its_credentials_again(tmp_path, monkeypatch):
    """A run folder records its store without credentials. Resumed where $MLFLOW_TRACKING_URI names that store
    with them, the run must log with them: the store is this folder's default (no note), and its user and
    password are in MLflow's variables again, as the run that started had them."""
    from shortft import run_store, tracking

    for key in tracking.CREDENTIAL_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(tracking, "check_tracking_uri", lambda uri: None)  # no server here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:pw@mlflow.example:5000/")
    run_store.remember(tmp_path, "http://mlflow.example:5000/", "shortft", "abc")
    assert run_store.settle(tmp_path, None, None, resume=True) == ("http://mlflow.example:5000/", "shortft", None)
    assert tracking.credentials_env() == {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "pw"}


def test_a_postgresql_password_in_the_query_moves_out_too(monkeypatch):
    """libpq also takes `?password=`: it stayed in the URI, without the line other kept passwords get, and
    went into sweep settings and the run record."""
    from shortft import tracking

    for key in tracking.CREDENTIAL_ENV:  # set here (as empty) so that the test's end removes what the URI sets
        monkeypatch.setenv(key, "")
    monkeypatch.setattr(tracking, "check_tracking_uri", lambda uri: None)  # no database here
    assert tracking.resolve_uri("postgresql://me@db.example/mlflow?sslmode=require&password=pw") == \
        "postgresql://me@db.example/mlflow?sslmode=require"
    assert tracking.credentials_env() == {"PGPASSWORD": "pw"}


def test_a_resume_does_not_send_this_environments_credentials_to_the_store_a_run_folder_names(tmp_path, monkeypatch):
    """A run folder (another's, on shared storage, or received) named its own http store; a resume logged
    there with the MLflow user and password of this environment, sent by MLflow with every request."""
    from shortft import run_store, tracking
    from shortft.config import ConfigError

    for key in tracking.CREDENTIAL_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(tracking, "check_tracking_uri", lambda uri: None)  # no server here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000/")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cr3t")
    run_store.remember(tmp_path, "http://collector.example:8080/", "shortft", "abc")
    with pytest.raises(ConfigError, match=r"^the run's MLflow store http://collector.example:8080/ \(recorded in its "
                                          r"folder\) is not this environment's \(http://mlflow.example:5000/\), and "
                                          r"MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_USERNAME would be sent to it; "
                                          r"pass --tracking-uri http://collector.example:8080/ to log there"):
        run_store.settle(tmp_path, None, None, resume=True)
    # Named by the user: theirs to send.
    assert run_store.settle(tmp_path, "http://collector.example:8080/", None, resume=True)[0] == \
        "http://collector.example:8080/"
    for key in tracking.CREDENTIAL_ENV:  # none to send: the run's own store, with a note
        monkeypatch.delenv(key, raising=False)
    assert run_store.settle(tmp_path, None, None, resume=True)[0] == "http://collector.example:8080/"


def test_a_comparison_keeps_no_credentials_of_its_tracking_uri(tmp_path, monkeypatch):
    """`tune/compare.py --tracking-uri http://user:password@host/?token=...` wrote the URI whole into
    comparison.json and the trials' configs."""
    import json

    from shortft import tracking
    from shortft.sweep import compare

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    for key in tracking.CREDENTIAL_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(tracking, "check_tracking_uri", lambda uri: None)  # no server here
    monkeypatch.setattr(compare, "parent_run", lambda uri, name, out: "parent")
    monkeypatch.setattr(compare, "evaluate_base", stop)  # after comparison.json is written
    with pytest.raises(Stop):
        compare.run_comparison("toy", tmp_path / "out", call_budget=10,
                               tracking_uri="http://alice:s3cr3t@mlflow.example:5000/?token=tok123")
    written = (tmp_path / "out" / "comparison.json").read_text()
    assert json.loads(written)["tracking_uri"] == "http://mlflow.example:5000/"
    assert "s3cr3t" not in written and "tok123" not in written


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_mlflow_credentials_reach_the_relay_and_not_the_job(monkeypatch):
    """The sweep gave a cluster job the credentials in its runtime_env: every trial and worker had them, and
    Ray logs a runtime_env on every node and shows it in `ray list jobs`. The relay, the one process that
    calls MLflow, now gets them as arguments."""
    import os

    import ray

    from shortft import mlflow_relay, tracking

    for key in tracking.CREDENTIAL_ENV:
        monkeypatch.delenv(key, raising=False)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cr3t")  # after the workers' environment was set
        name = mlflow_relay.start_relay("sqlite:///:memory:", name="creds-relay")
        seen = mlflow_relay.relay_call(name, lambda uri: os.environ.get("MLFLOW_TRACKING_PASSWORD"))
        elsewhere = ray.get(ray.remote(lambda: os.environ.get("MLFLOW_TRACKING_PASSWORD")).remote())
    finally:
        ray.shutdown()
        mlflow_relay._handles.clear()
    assert (seen, elsewhere) == ("s3cr3t", None)
