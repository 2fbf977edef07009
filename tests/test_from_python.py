"""The From-Python examples of the README and docs/sweeps.md, run verbatim in fresh processes that let
Ray start itself, then checked: trials done, one MLflow run per trial, no placement group left."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shortft.config import ConfigError

# Tests that start Ray run one after another on one pytest-xdist worker (`ray stop` in one of them
# would stop another's cluster); the other worker takes the rest.
pytestmark = pytest.mark.xdist_group("ray")

ROOT = Path(__file__).resolve().parents[1]

# Appended to each example: Ray Train's own clean-up (the dashboard's state API) must have released
# every trial's workers; it runs asynchronously, so wait for it a little.
AFTER = textwrap.dedent('''
    import time as _time, ray as _ray
    for _ in range(60):
        _left = [pg for pg in _ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]
        if not _left:
            break
        _time.sleep(0.5)
    print("PLACEMENT_GROUPS_LEFT", len(_left))
''')


def _block(path: Path, heading: str) -> str:
    text = path.read_text()
    return re.search(re.escape(heading) + r".*?```python\n(.+?)\n```", text, re.S).group(1)


def _start_example(code: str, cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(HOME=str(cwd), PYTHONUNBUFFERED="1")  # tune.run's default storage is ~/ray_results
    with open(cwd / "stdout.txt", "w") as out, open(cwd / "stderr.txt", "w") as err:  # files: no pipe fills up
        return subprocess.Popen([sys.executable, "-c", code + AFTER], cwd=cwd, stdout=out, stderr=err, text=True,
                                env=env, start_new_session=True)


def _finish_example(proc: subprocess.Popen, cwd: Path, timeout: int) -> str:
    proc.wait(timeout=timeout)
    out, err = (cwd / "stdout.txt").read_text(), (cwd / "stderr.txt").read_text()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert "PLACEMENT_GROUPS_LEFT 0" in out, out[-2000:]
    return out


def _runs(cwd: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd}/mlflow.db")
    exp = client.get_experiment_by_name("shortft-sweeps")
    return client.search_runs([exp.experiment_id])


@pytest.mark.slow
def test_readme_block_and_the_tuner_example_verbatim(tmp_path):
    """Both run at once, each with its own local Ray (each trial's worker uses one thread; most of a
    smoke trial is process start-up): the README's tune.run block letting Ray start itself (4 trials),
    and docs/sweeps.md's Tuner + OptunaSearch example on a bare ray.init() (6 trials, one at a time)."""
    readme, tuner = tmp_path / "readme", tmp_path / "tuner"
    readme.mkdir()
    tuner.mkdir()
    code = _block(ROOT / "docs" / "sweeps.md", "With `tune.Tuner` and Optuna")
    assert "ray.init()" in code and "num_samples=6" in code
    procs = [_start_example(_block(ROOT / "README.md", "### From Python"), readme), _start_example(code, tuner)]
    try:
        out = _finish_example(procs[0], readme, timeout=900)
        _finish_example(procs[1], tuner, timeout=900)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)

    assert "chain.segments" in out  # the README block printed the best config
    runs = _runs(readme)
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert all("eval/objective" in r.data.metrics for r in runs)

    runs = _runs(tuner)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 6
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    assert all("eval/objective" in c.data.metrics and "train.lr" in c.data.params for c in children)


def test_bad_programmatic_configs_fail_before_any_trial_in_one_line(tmp_path, monkeypatch):
    import ray
    from ray import tune

    from shortft import sweep

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="nosuch"):
        sweep.trainable_for("nosuchconfig")
    with pytest.raises(ConfigError, match="chain.nosuch"):
        sweep.trainable_for("toy", fixed={"chain.nosuch": 1})
    # each failed every trial as it ran (`a/b` left runs/sweeps/a/b behind); run_sweep's "2" was a TypeError
    for kwargs, line in (({"name": "a/b"}, "name='a/b': a name is one folder's name"),
                         ({"workers": 0}, "workers 0: must be an integer >= 1"),
                         ({"gpus_per_worker": "1"}, "gpus_per_worker '1': must be a finite number >= 0")):
        with pytest.raises(ConfigError, match=re.escape(line)):
            sweep.trainable_for("toy", **kwargs)
    with pytest.raises(ConfigError, match=re.escape("--num-samples '2': must be an integer >= 1")):
        sweep.run_sweep("toy", num_samples="2")
    assert not (tmp_path / "runs").exists()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        trainable = sweep.trainable_for("toy", smoke_test=True, tracking_uri=None)
        for config, word in (({"chain.nosuch": tune.choice([1, 2])}, "chain.nosuch"),
                             ({"lora.rank": tune.choice([-3])}, "lora.rank")):
            with pytest.raises(ConfigError, match=re.escape(word)) as e:
                tune.run(trainable, config=config, num_samples=1, metric="eval/objective", mode="max",
                         storage_path=str(tmp_path / "ray_results"), verbose=0)
            assert "\n" not in str(e.value)
        with pytest.raises(ConfigError) as e:  # a metric no trial reports: Tune would fail at the first result
            tune.run(trainable, config={"chain.segments": 2}, num_samples=1, metric="eval/objetive", mode="max",
                     storage_path=str(tmp_path / "ray_results"), verbose=0)
        assert str(e.value).startswith("metric='eval/objetive': a ShortFT trial never reports it; use eval/objective")
        with pytest.raises(ConfigError, match="--gpus-per-worker"):
            tune.run(sweep.trainable_for("toy", smoke_test=True, tracking_uri=None, gpus_per_worker=1),
                     config={"chain.segments": 2}, num_samples=1, storage_path=str(tmp_path / "ray_results"), verbose=0)
        assert not list((tmp_path / "runs").rglob("metrics.jsonl"))  # no trial trained
        # valid one at a time, not together: that trial fails with its line, and tune.run goes on
        analysis = tune.run(trainable, config={"chain.steps": 6, "chain.segments": 8}, num_samples=1,
                            storage_path=str(tmp_path / "ray_results"), verbose=0, raise_on_failed_trial=False)
        (trial,) = analysis.trials
        assert trial.status == "ERROR" and "chain.segments=8: must be <= chain.steps=6" in str(trial.get_error())
        from shortft import attempts  # recorded for good: Tune's retry (the sweep's max_failures=1) ends at once

        assert [p.parent.name for p in (tmp_path / "runs" / "sweeps").rglob(attempts.FILE)] == [f"from-python-{trial.trial_id}"]
    finally:
        ray.shutdown()


def test_python_arguments_of_another_type_are_one_line_before_anything_starts(tmp_path, monkeypatch):
    """From Python, arguments the command line never passes: `run_sweep(num_samples=1.5)` started Ray, evaluated
    the base model, then failed in Tune's traceback and left a sweep behind; `shortft.train("tiny")` was
    dataclasses' "asdict() should be called on dataclass instances"; `trainable_for("toy", fixed=["a=1"])` "'list'
    object is not a mapping"; `train(cfg, callbacks=print)` failed once the models had loaded, after its run
    folder was made; `param_space("toy")` an AttributeError of a str."""
    import ray

    import shortft
    from shortft import sweep
    from shortft.space import load_space

    monkeypatch.chdir(tmp_path)
    for kwargs, line in (({"num_samples": 1.5}, "--num-samples 1.5: must be an integer >= 1"),
                         ({"max_concurrent": 1.5}, "--max-concurrent 1.5: must be an integer >= 1"),
                         ({"seed": 1.5}, "--seed 1.5: must be an integer >= 0"),
                         ({"workers_per_trial": 1.5}, "--workers-per-trial 1.5: must be an integer >= 1")):
        with pytest.raises(ConfigError, match=re.escape(line)):
            sweep.run_sweep("toy", smoke_test=True, tracking_uri=None, **kwargs)
    cfg = shortft.load_config("toy", [f"train.output_dir={tmp_path}/run"])
    for call, line in ((lambda: shortft.train("tiny"), "config 'tiny': give a Config, e.g. shortft.load_config("),
                       (lambda: shortft.load_config(cfg), "config Config(name='toy'"),
                       (lambda: shortft.load_config("tiny", 5), "overrides 5: give a list of key=value strings or a dict"),
                       (lambda: shortft.load_config("tiny", parts=["nope"]), "parts ['nope']: not among rewards"),
                       (lambda: shortft.train(cfg, callbacks=len), "callbacks: <built-in function len> is no "
                                                                   "Callback (on_start, on_step, on_end)"),
                       (lambda: shortft.train(cfg, callbacks=[object()]), "is no Callback"),
                       (lambda: sweep.trainable_for("toy", fixed=["train.steps=2"]), "fixed ['train.steps=2']: give "
                                                                                      "a dict of dotted keys"),
                       (lambda: sweep.trainable_for(cfg), "base Config(name='toy'"),
                       (lambda: sweep.evaluate_base("toy", {"chain.nosuch": 1}, tmp_path / "eb"), "chain.nosuch"),
                       (lambda: sweep.param_space(3), "space 3: give a space name (")):
        with pytest.raises(ConfigError, match=re.escape(line)):
            call()
    assert not ray.is_initialized()
    assert not list(tmp_path.iterdir())  # no run, sweep or evaluation folder
    assert set(sweep.param_space("toy")) == set(sweep.param_space(load_space("toy")))


def test_readme_tune_run_closes_the_run_of_a_trial_that_died(tmp_path, monkeypatch):
    """The README's `tune.run(..., callbacks=[sweep.RunCloser(uri)])`: a trial whose process died left its
    MLflow run RUNNING for ever (RunCloser knew only the runs a sweep's searcher makes), and Tune's error
    was not yet where `get_error` reads it, so a sweep's such run had no line either."""
    import ray
    from mlflow.tracking import MlflowClient
    from ray import tune

    from shortft import sweep
    from shortft.ray_reports import FAIL_AT_STEP_ENV, FAIL_RANK_ENV

    monkeypatch.setenv(FAIL_AT_STEP_ENV, "2")  # the trial's process dies as its second step starts
    monkeypatch.setenv(FAIL_RANK_ENV, "0")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        trainable = sweep.trainable_for("toy", smoke_test=True, tracking_uri=uri, output_root=str(tmp_path / "runs"))
        analysis = tune.run(trainable, config={"chain.segments": tune.choice([2])}, num_samples=1,
                            metric="eval/objective", mode="max", storage_path=str(tmp_path / "ray"), verbose=0,
                            raise_on_failed_trial=False, callbacks=[sweep.RunCloser(uri)])
    finally:
        ray.shutdown()
    assert [t.status for t in analysis.trials] == ["ERROR"]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(sweep.EXPERIMENT).experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["shortft.trial_status"] == "failed"
    assert "worker process has died" in run.data.tags["shortft.error"]


@pytest.mark.parametrize("key,value,line", [
    ("chain.segments", 0, "chain.segments=0: must be a positive integer"),
    ("chain.segments", 99, "chain.segments=99: must be <= chain.steps=20"),
    ("chain.method", "foo", "chain.method='foo': not one of shortft, full"),
    ("train.steps", 0, "train.steps=0: must be a positive integer"),
    ("train.lr", "fast", "train.lr='fast': expected a number"),
])
def test_a_config_changed_after_it_was_loaded_is_checked_again(key, value, line, tmp_path):
    """`cfg.chain.segments = 0` after load_config passed `shortft.check` and died in the plan with a
    ZeroDivisionError; `chain.method = "foo"` was a KeyError in the chain; `train.steps = 0` wrote LoRAs."""
    import shortft

    cfg = shortft.load_config("tiny", [f"train.output_dir={tmp_path}/run"])
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)
    for call in (shortft.check, shortft.train):
        with pytest.raises(ConfigError, match=re.escape(line)):
            call(cfg)
    assert not (tmp_path / "run").exists()
