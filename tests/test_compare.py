"""The comparison at equal compute (tune/compare.py) and its report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shortft.sweep.compare_report import read_rows, table, write_report

ROOT = Path(__file__).resolve().parents[1]


def _trial(arm, seed, objective, seconds, chosen=True, lr=1e-3):
    evals = [{"step": s, "train_seconds": seconds * s, "calls_total": 10 * s, "reward": 0.5 + objective / 10,
              "mean_seconds_per_step": seconds, "eval/objective": objective * s / 2, "eval/toy_judge": objective + 0.05}
             for s in (1, 2)]
    return {"arm": arm, "lr_trials": 3, "chosen": chosen, "lr": lr, "seed": seed, "run_dir": "/nonexistent",
            "evals": evals, "final": evals[-1]}


def test_report_table_plot_and_mean_with_standard_error(tmp_path):
    rows = [_trial("shortft", 0, 0.8, 1.0), _trial("shortft", 1, 0.9, 1.2), _trial("shortft", 0, 0.1, 1.0, False, 3e-3),
            _trial("alignprop", 0, 0.7, 2.0)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    arms = read_rows(tmp_path / "rows.jsonl")
    assert [len(t) for t in arms.values()] == [2, 1]  # the unchosen learning rate is not in the table
    lines = table(arms).splitlines()
    assert lines[0].startswith("| arm | seeds | lr (of trials) | eval/objective | eval/toy_judge |")
    assert lines[2].startswith("| shortft | 2 | 0.001 (of 3) | 0.850 ± 0.050 | 0.900 ± 0.050 |")
    assert lines[3].startswith("| alignprop | 1 | 0.001 (of 3) | 0.700 | 0.750 |") and lines[3].endswith("| 10.0 | 4.0 |")
    report = write_report(tmp_path / "rows.jsonl")
    assert (tmp_path / "objective_vs_seconds.png").stat().st_size > 1000 and "| shortft | 2 |" in report.read_text()
    # with the untrained model's evaluation: its row, and each arm's gain over it (seed sd in brackets)
    lines = table(arms, {"eval/objective": 0.6, "eval/toy_judge": 0.7}).splitlines()
    assert lines[0].startswith("| arm | seeds | lr (of trials) | eval/objective | gain (seed sd) | eval/toy_judge |")
    assert lines[2].startswith("| untrained base | - | - | 0.600 | - | 0.700 |")
    assert lines[3].startswith("| shortft | 2 | 0.001 (of 3) | 0.850 ± 0.050 | +0.250 (0.071) | 0.900 ± 0.050 |")
    assert lines[4].startswith("| alignprop | 1 | 0.001 (of 3) | 0.700 | +0.100 | 0.750 |")


@pytest.mark.slow
@pytest.mark.xdist_group("clusters")  # a Ray of its own: not beside the two-node cluster (raylet start timed out)
def test_a_miniature_comparison_and_its_report(tmp_path):
    """2 arms, 1 seed, 1 learning rate, a budget of 20 network calls at the smoke sizes, on a private
    local Ray (its own RAY_TMPDIR: no other test's cluster is joined)."""
    from mlflow.tracking import MlflowClient

    import shutil
    import tempfile

    out, uri = tmp_path / "out", f"sqlite:///{tmp_path}/mlflow.db"
    ray_tmp = tempfile.mkdtemp(prefix="rcm", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1"}
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):  # another test's cluster
        env.pop(key, None)
    p = subprocess.run([sys.executable, str(ROOT / "tune" / "compare.py"), "--arms", "shortft,draft", "--seeds", "1",
                        "--ablation-seeds", "1", "--lrs", "1e-3", "--call-budget", "20", "--smoke-test", "--out", str(out),
                        "--storage-path", str(tmp_path / "storage"), "--tracking-uri", uri],
                       capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "shortft: lr 0.001 (best of 1" in p.stdout and "draft: lr 0.001" in p.stdout
    assert "untrained base model: eval/objective" in p.stdout
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert [r["arm"] for r in rows] == ["shortft", "draft"]
    assert all(r["final"]["calls_total"] >= 20 and r["final"]["calls_total"] - r["final"]["network_calls"] < 20
               for r in rows)  # each stopped at the step that used up the budget
    text = (out / "report.md").read_text()
    assert "| shortft | 1 | 0.001 (of 1) |" in text and "| draft | 1 | 0.001 (of 1) |" in text
    assert (out / "objective_vs_seconds.png").is_file()
    assert {f.name for f in (out / "grids").iterdir()} == {"shortft.png", "draft.png", "base.png"}
    assert "| untrained base | - | - |" in text and "gain (seed sd)" in text
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("shortft-compare").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len([r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]) == 2
    assert {"report.md", "objective_vs_seconds.png", "grids"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_a_learning_rate_that_diverged_is_no_candidate_and_none_left_is_one_line():
    """A failed seed-0 trial ended the whole comparison; a NaN objective first in the list was chosen (`max`
    keeps the first element when nothing compares greater than NaN)."""
    from shortft.sweep.compare import TrialFailed, choose_lr

    def row(lr, objective):
        return {"lr": lr, "seed": 0, "final": {"eval/objective": objective}}

    failed = {"lr": 3e-3, "seed": 0, "error": "step 2 had a non-finite loss or gradient; lower train.lr (now 0.003)"}
    assert choose_lr([row(1e-4, float("nan")), row(3e-4, 0.7), failed, row(1e-3, 0.6)], "full")["lr"] == 3e-4
    assert choose_lr([row(1e-4, 0.7), row(3e-4, 0.7)], "full")["lr"] == 1e-4  # a tie: the smaller rate
    with pytest.raises(TrialFailed, match=r"^full: no learning rate gave a finite objective: 0\.0001 -> not finite; "
                                          r"0\.003 -> failed \(step 2 had a non-finite loss"):
        choose_lr([row(1e-4, float("nan")), failed], "full")


def test_the_plot_of_seeds_that_stopped_at_other_steps_ends_at_the_tables_values():
    """Under a time budget one seed made 3 evaluations and another 2: the plot was cut to 2, so its last
    point mixed the first seed's middle evaluation with the second's final one, not the table's mean."""
    from shortft.sweep.compare_report import curve

    def ev(step, objective):
        return {"step": step, "train_seconds": step, "eval/objective": objective}

    long, short = {"evals": [ev(10, 0.1), ev(20, 0.2), ev(24, 0.4)]}, {"evals": [ev(10, 0.3), ev(15, 0.5)]}
    seconds, values = curve([long, short])
    assert values == [[0.1, 0.3], [0.4, 0.5]] and seconds == [10, 19.5]
    same = [{"evals": [ev(10, 0.1), ev(20, 0.2)]}, {"evals": [ev(10, 0.3), ev(20, 0.4)]}]
    assert curve(same) == ([10, 20], [[0.1, 0.3], [0.2, 0.4]])


def test_a_comparison_of_a_name_used_before_has_a_parent_run_of_its_own(tmp_path):
    """The parent run was found by `--name` alone: a second comparison of the default name, in another
    folder, nested its trials and logged its report into the first one's finished run."""
    from mlflow.tracking import MlflowClient

    from shortft.sweep.compare import parent_run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    p1 = parent_run(uri, "compare", first)
    (first / "comparison.json").write_text(json.dumps({"tracking_uri": uri, "parent_run_id": p1}))
    MlflowClient(uri).set_terminated(p1)
    p2 = parent_run(uri, "compare", second)
    assert p2 != p1
    assert parent_run(uri, "compare", first) == p1  # started again in its folder: the run it began with
    MlflowClient(uri).delete_run(p1)
    assert parent_run(uri, "compare", first) not in (p1, p2)


def test_a_failed_or_non_finite_seed_is_counted_out_in_the_table_and_a_cut_line_is_left_out(tmp_path, capsys):
    """A seed that failed ended the whole comparison (its other arms never ran); a seed with a NaN objective
    was dropped from the mean while the seeds column still counted it; a rows.jsonl cut short by a killed
    driver was read as a bad --lrs. The table also shows the training seconds each arm spent."""
    failed = {"arm": "shortft", "lr_trials": 3, "chosen": True, "lr": 1e-3, "seed": 2, "error": "step 3 had a NaN"}
    nan = _trial("shortft", 1, float("nan"), 1.0)
    rows = [_trial("shortft", 0, 0.8, 1.0), nan, failed]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"arm": "dra')
    arms = read_rows(tmp_path / "rows.jsonl")
    assert "rows.jsonl: line 4 is cut short or not JSON; left out of the report" in capsys.readouterr().err
    line = table(arms).splitlines()[2]
    assert line.startswith("| shortft | 1 of 3 | 0.001 (of 3) | 0.800 |") and line.endswith("| 2.0 |"), line
    write_report(tmp_path / "rows.jsonl")  # the plot and grids skip the failed seed


@pytest.mark.parametrize("args,line", [
    (["--time-budget-s", "0"], "--time-budget-s 0.0: give a budget > 0"),  # no budget: a million steps per trial
    (["--call-budget", "-5"], "--call-budget -5: give a budget > 0"),
    (["--call-budget", "5"], "holds a comparison (rows.jsonl); pass another --name or --out"),  # emptied it
    (["--call-budget", "5", "--lrs", "1e-3,x"], "--lrs '1e-3,x': could not convert string to float"),
    (["--call-budget", "5", "--lrs", ","], "--lrs ',': give learning rates > 0"),
    (["--call-budget", "5", "--lrs", "1e-3,nan"], "--lrs '1e-3,nan': give learning rates > 0"),
    # dropped unsaid; then said twice ("--lrs '1e-3,,3e-3': --lrs '1e-3,,3e-3': item 2 ...")
    (["--call-budget", "5", "--lrs", "1e-3,,3e-3"], "error: --lrs '1e-3,,3e-3': item 2 of 3 is empty"),
    # one seed counted twice in the report, with a ± 0.000
    (["--call-budget", "5", "--lrs", "1e-3,0.001"], "--lrs '1e-3,0.001': a learning rate is given twice"),
    # accepted: minutes of the untrained model's evaluation, then a report of it alone (or of 1 seed, "seeds 1")
    (["--call-budget", "5", "--arms", ""], "--arms: name at least one arm"),
    (["--call-budget", "5", "--seeds", "0"], "--seeds 0: must be an integer >= 1"),
    (["--call-budget", "5", "--ablation-seeds", "-1"], "--ablation-seeds -1: must be an integer >= 1"),
    (["--call-budget", "5", "--arms", "shortft,,draft"], "--arms 'shortft,,draft': item 2 of 3 is empty"),
    # refused after a local Ray had started
    (["--time-budget-s", "1", "--arms", "nosuch"], "--arms nosuch: unknown; choose from shortft,"),
    (["--time-budget-s", "1", "--set", "chain.nosuch=1"], "unknown key 'chain.nosuch': allowed under chain"),
    # the second --set replaced the first (argparse): its keys were dropped unsaid
    (["--time-budget-s", "1", "--set", "chain.nosuch=1", "--set", "train.steps=2"], "unknown key 'chain.nosuch'"),
    # every trial failed (`<name>-<arm>-seeds-t001` over the names' limit), or the name held a /
    (["--time-budget-s", "1", "--name", "x" * 160], "--name=" + "x" * 40 + "...: 160 bytes; a name is at most 152"),
    (["--time-budget-s", "1", "--name", "a/b"], "--name='a/b': a name is one folder's name"),
])
def test_bad_comparison_input_is_one_line_before_ray(tmp_path, capsys, args, line):
    import ray

    from shortft.sweep.compare import main

    (tmp_path / "rows.jsonl").write_text(json.dumps(_trial("shortft", 0, 0.8, 1.0)) + "\n")
    assert main(["--out", str(tmp_path), "--no-mlflow", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and line in err[0] and not ray.is_initialized(), err
    assert (tmp_path / "rows.jsonl").read_text()  # kept


def test_an_out_that_is_a_file_is_one_line_before_ray(tmp_path, capsys):
    """It was a FileExistsError traceback from `out.mkdir`, once Ray had started."""
    import ray

    from shortft.sweep.compare import main

    (tmp_path / "afile").write_text("")
    assert main(["--out", str(tmp_path / "afile"), "--no-mlflow", "--call-budget", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --out {tmp_path / 'afile'}: a file; give a folder (made if missing)"] and \
        not ray.is_initialized(), err


@pytest.mark.parametrize("flag", ["--storage-path", "--tracking-uri"])
def test_a_storage_path_or_store_that_cannot_be_used_is_one_line_before_ray(tmp_path, capsys, monkeypatch, flag):
    """Both were found once a local Ray had started (and --out had been made)."""
    import ray

    from shortft.sweep.compare import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "afile").write_text("")
    value = str(tmp_path / "afile") if flag == "--storage-path" else f"sqlite:///{tmp_path}/nodir/mlflow.db"
    assert main(["--out", str(tmp_path / "out"), "--call-budget", "5", flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    said = "a file, not a folder" if flag == "--storage-path" else "does not exist or is not writable"
    assert len(err) == 1 and said in err[0] and not ray.is_initialized(), err
    assert not (tmp_path / "out").exists()


def test_a_ctrl_c_during_a_trial_ends_the_comparison_in_one_line(tmp_path, monkeypatch, capsys):
    """Tune stops its run on Ctrl-C and returns: the comparison went on with every other trial, counted the
    one cut short as a whole seed, wrote its report and exited 0. A Ctrl-C outside a trial was a traceback
    and left the MLflow parent run RUNNING."""
    from types import SimpleNamespace

    from ray import tune

    from shortft import tracking
    from shortft.sweep import compare

    class Stopped:  # what tuner.fit() returns after Tune's own SIGINT handler stopped the run
        _experiment_analysis = SimpleNamespace(trials=[SimpleNamespace(trial_id="a", status="RUNNING")])

        def __iter__(self):
            return iter([])

    monkeypatch.setattr(tune, "Tuner", lambda *a, **k: SimpleNamespace(fit=lambda: Stopped()))
    with pytest.raises(KeyboardInterrupt, match="in x-shortft-lr"):
        compare._fit(None, {}, "x-shortft-lr", str(tmp_path), tmp_path)
    uri = f"sqlite:///{tmp_path}/m.db"
    monkeypatch.setattr(compare, "evaluate_base", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    monkeypatch.setattr(compare, "check_sources", lambda *a, **k: None)
    monkeypatch.setattr("shortft.resources.connect", lambda **kwargs: None)  # no Ray: the trials never start
    assert compare.main(["--out", str(tmp_path / "out"), "--tracking-uri", uri, "--call-budget", "5",
                         "--smoke-test", "--arms", "shortft"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "compare.py: interrupted; no arm had ended: the same command starts it over")
    (parent,) = tracking.client(uri).search_runs([tracking.experiment_id(uri, "shortft-compare")])
    assert parent.info.status == "KILLED"

