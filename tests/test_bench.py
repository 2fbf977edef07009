"""`shortft bench`: every method on the tiny model, counts checked against the training plan."""

import json
import math
import subprocess
import sys

import pytest

METHODS = ("shortft", "full", "draft", "draft_lv", "alignprop", "drtune", "refl")


def _bench(tmp_path, *args):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "shortft.cli", "bench", "--config", "tiny", "--random-weights",
                        "--methods", ",".join(METHODS), "--json", str(out), *args],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return {(r["method"], r["segments"]): r for r in json.loads(out.read_text())["rows"]}, p.stdout


@pytest.mark.slow
def test_bench_counts_and_times_every_method_as_its_plan_says(tmp_path, tiny_dir):
    rows, stdout = _bench(tmp_path, "--steps", "1", "--warmup", "0", "chain.steps=20", "chain.segments=4",
                          "chain.drtune_train_steps=5")
    assert {m for m, _ in rows} == set(METHODS)
    # calls (with gradient) per step, as the plans say: N=20, k=4 (first segment 5 steps, then 3 jumps
    # + 3 steps), end to end; N=20 rather than 50 halves the count's time (FlopCounterMode)
    assert (rows["shortft", 4]["calls"], rows["shortft", 4]["grad_calls"]) == (11, 11)
    assert (rows["full", None]["calls"], rows["full", None]["grad_calls"]) == (20, 20)
    assert (rows["draft", None]["calls"], rows["draft", None]["grad_calls"]) == (20, 1)
    assert (rows["draft_lv", None]["calls"], rows["draft_lv", None]["grad_calls"]) == (22, 3)  # + 2 copies
    assert rows["drtune", None]["grad_calls"] == 5
    assert rows["refl", None]["grad_calls"] == 1
    assert all(r["flops"] > 0 and r["memory_estimate_mb"] > 0 for r in rows.values())
    assert rows["shortft", 4]["flops"] < rows["full", None]["flops"]
    assert "| shortft | 4 | 1 | 11 (11) |" in stdout
    # the host's CPU goes with every figure (a CPU step, or a host-bound GPU step, runs at its speed)
    result = json.loads((tmp_path / "bench.json").read_text())
    assert (result["steps"], result["timed_steps"], result["warmup_steps"]) == (20, 1, 0)  # N, and how it was timed
    host = result["host_cpu"]
    assert host.endswith(" CPUs") and len(host) > len(" CPUs") + 2 and f"(host: {host}, " in stdout
    for r in rows.values():
        assert math.isfinite(r["seconds_per_step"]) and r["seconds_per_step"] > 0
        assert r["seconds_min"] <= r["seconds_per_step"] <= r["seconds_max"] and r["peak_memory_mb"] > 0
        # the timed step made the calls the counted step made
        assert (r["measured_calls"], r["measured_grad_calls"]) == (r["calls"], r["grad_calls"])
    assert rows["full", None]["checkpointing"] and rows["full", None]["seconds_per_step_vs_full"] == 1.0


def test_checkpointing_arms_one_per_value_full_always_on_single_grad_call_methods_once():
    from shortft.bench import Arm, arm_config, arms
    from shortft import load_config

    got = arms(["shortft", "draft", "alignprop"], [4], [1, 2], [False, True])
    assert [a.label for a in got if a.batch == 1] == [
        "full b=1", "shortft k=4 b=1", "shortft k=4 ckpt b=1", "draft b=1", "alignprop b=1", "alignprop ckpt b=1"]
    # draft with chain.last_k 3 has 3 calls with gradient: its checkpointed arm was left out
    assert [a.label for a in arms(["draft"], [4], [1], [False, True], last_k=3)] == ["full b=1", "draft b=1",
                                                                                     "draft ckpt b=1"]
    cfg = load_config("tiny")
    assert arm_config(cfg, Arm("full", None, 1, None)).chain.checkpointing
    assert not arm_config(cfg, Arm("shortft", 4, 1, False)).chain.checkpointing
    assert arm_config(cfg, Arm("shortft", 4, 1, True)).chain.checkpointing
    assert arm_config(cfg, Arm("alignprop", None, 2, None)).chain.checkpointing == cfg.chain.checkpointing


def test_bench_bad_flags_one_line_exit_2(tiny_dir):
    for args, word in ((["--methods", "dpo"], "--methods"), (["--segments", "x"], "--segments"),
                       (["--segments", "99"], "--segments"), (["--checkpointing", "yes"], "--checkpointing")):
        p = subprocess.run([sys.executable, "-m", "shortft.cli", "bench", "--config", "tiny", *args],
                           capture_output=True, text=True, timeout=120)
        lines = [line for line in p.stderr.splitlines() if line.strip()]
        assert p.returncode == 2 and len(lines) == 1 and word in lines[0] and "Traceback" not in p.stderr, p.stderr
        assert not p.stdout, p.stdout  # the "bench tiny: ..." header came before the error line


def test_checkpointing_trades_memory_for_compute_in_the_count(tiny_dir):
    """Per-call checkpointing keeps a call's inputs only and recomputes it in backward: the count keeps
    less (the chain's inputs plus one recomputed call) and computes more (one more forward per call)."""
    import torch

    from shortft import load_config
    from shortft.bench import Arm, arm_config, count

    cfg = load_config("tiny", [f"model.pretrained={tiny_dir}", "chain.steps=10", "chain.segments=2"])
    plain, ckpt = (count(arm_config(cfg, Arm("shortft", 2, 2, c)), torch.device("cpu")) for c in (False, True))
    assert ckpt["memory_estimate_mb"] < plain["memory_estimate_mb"]
    assert 1.2 * plain["flops"] < ckpt["flops"] < 2 * plain["flops"]
    assert (ckpt["calls"], ckpt["grad_calls"]) == (plain["calls"], plain["grad_calls"])


def test_an_arm_that_runs_out_of_gpu_memory_is_a_row_and_the_json_keeps_every_finished_arm(tmp_path, tiny_dir):
    """On the H200 (2026-11-26) the first batch-2 arm ran out of memory and the bench stopped there with a
    traceback, its other arms and the JSON lost; a device time limit that stops a part loses its JSON too.
    Here alignprop runs out of memory (raised where the GPU raises it, in the arm's timing), then in a
    second run the process dies in the third arm."""
    from tests.test_failures import CUDA_OOM

    code = ("import sys, torch, shortft.bench as bench; real = bench.time_steps\n"
            "def timed(cfg, *a, **k):\n"
            f"    if cfg.chain.method == 'alignprop': raise torch.OutOfMemoryError({CUDA_OOM!r})\n"
            "    if cfg.chain.method == sys.argv[1]: raise SystemExit('killed')\n"
            "    return real(cfg, *a, **k)\n"
            "bench.time_steps = timed\n"
            "from shortft.cli import main; sys.exit(main(sys.argv[2:]))")
    out = tmp_path / "b.json"
    args = ["bench", "--config", "tiny", "--random-weights", "--methods", "shortft,draft,alignprop", "--steps", "1",
            "--warmup", "0", "--json", str(out), "chain.steps=8", "chain.segments=4"]
    p = subprocess.run([sys.executable, "-c", code, "none", *args], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["full", "shortft", "draft", "alignprop"]
    assert rows["alignprop"]["error"] == "out of GPU memory (asked for 1.25 GiB with 1.18 GiB of 23.52 GiB free; " \
                                         "another process holds 3.10 GiB)"
    assert "seconds_per_step" not in rows["alignprop"] and rows["alignprop"]["flops"] > 0  # still counted
    assert rows["shortft"]["seconds_per_step_vs_full"] > 0 and rows["draft"]["seconds_per_step"] > 0
    head, line = (next(x for x in p.stdout.splitlines() if x.startswith(s)) for s in ("| method", "| alignprop"))
    assert "| out of GPU memory (asked for 1.25 GiB" in line and line.count("|") == head.count("|")  # the same columns

    p = subprocess.run([sys.executable, "-c", code, "draft", *args], capture_output=True, text=True, timeout=600)
    assert p.returncode == 1 and "killed" in p.stderr
    assert [r["method"] for r in json.loads(out.read_text())["rows"]] == ["full", "shortft"]  # the finished arms
    assert not list(tmp_path.glob("*.tmp"))


def test_an_interrupted_bench_says_where_the_arms_that_ended_are(tmp_path):
    """A Ctrl-C said "interrupted" and nothing of the --json written after every arm."""
    from argparse import Namespace

    from shortft.cli_parser import interrupted_line

    import os

    args = Namespace(command="bench", json=str(tmp_path / "b.json"))
    assert interrupted_line(KeyboardInterrupt(), args, []) == "interrupted; no arm had ended"
    (tmp_path / "b.json").write_text("{}")  # an earlier bench's
    os.utime(tmp_path / "b.json", (0, 0))
    assert interrupted_line(KeyboardInterrupt(), args, []) == "interrupted; no arm had ended"
    (tmp_path / "b.json").write_text("{}")
    assert interrupted_line(KeyboardInterrupt(), args, []) == f"interrupted; {tmp_path / 'b.json'} holds the arms that ended"
    assert interrupted_line(KeyboardInterrupt(), Namespace(command="bench", json=None), []) == "interrupted"


def test_the_bench_run_in_mlflow_says_how_it_was_timed(tmp_path):
    """Its param `steps` was the chain's N (50), read as the steps timed; the steps timed and warmed up were
    not logged, so a 1-step bench without warm-up looked like a careful one."""
    from mlflow.tracking import MlflowClient

    from shortft.bench_report import log_to_mlflow

    uri = f"sqlite:///{tmp_path}/m.db"
    result = {"config": "toy", "steps": 50, "timed_steps": 1, "warmup_steps": 0, "rows": [
        {"method": "full", "segments": None, "batch": 1, "checkpointing": True, "seconds_per_step": 2.5}]}
    run = MlflowClient(uri).get_run(log_to_mlflow(result, uri, None))
    assert {k: run.data.params[k] for k in ("chain.steps", "timed_steps", "warmup_steps")} == {
        "chain.steps": "50", "timed_steps": "1", "warmup_steps": "0"} and "steps" not in run.data.params
    assert run.data.metrics["full_k0_b1_ckpt/seconds_per_step"] == 2.5

