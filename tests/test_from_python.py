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

ROOT = Path(__file__).resolve().parents[1]

# Appended to each example: Ray Train's own clean-up (the dashboard's state API) must have released
# every trial's workers; it runs asynchronously, so wait for it a little.
AFTER = textwrap.dedent('''
    import time as _time, ray as _ray
    for _ in range(60):
        _left = [pg for pg in _ray.util.placement_group_table().values() if pg["state"] == "CREATED"]
        if not _left:
            break
        _time.sleep(0.5)
    print("PLACEMENT_GROUPS_LEFT", len(_left))
''')


def _block(path: Path, heading: str) -> str:
    text = path.read_text()
    return re.search(re.escape(heading) + r".*?```python\n(.+?)\n```", text, re.S).group(1)


def _run_example(code: str, cwd: Path, timeout: int) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(HOME=str(cwd), PYTHONUNBUFFERED="1")  # tune.run's default storage is ~/ray_results
    p = subprocess.run([sys.executable, "-c", code + AFTER], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "PLACEMENT_GROUPS_LEFT 0" in p.stdout, p.stdout[-2000:]
    return p.stdout


def _runs(cwd: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd}/mlflow.db")
    exp = client.get_experiment_by_name("shortft-sweeps")
    return client.search_runs([exp.experiment_id])


@pytest.mark.slow
def test_readme_python_block_verbatim(tmp_path):
    code = _block(ROOT / "README.md", "### From Python")
    out = _run_example(code, tmp_path, timeout=600)
    assert "chain.segments" in out  # printed best config
    runs = _runs(tmp_path)
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    assert all("eval/objective" in r.data.metrics for r in runs)


@pytest.mark.slow
def test_tuner_with_optuna_six_trials_on_a_bare_ray_init(tmp_path):
    code = _block(ROOT / "docs" / "sweeps.md", "With `tune.Tuner` and Optuna")
    assert "ray.init()" in code and "num_samples=6" in code
    _run_example(code, tmp_path, timeout=900)
    runs = _runs(tmp_path)
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
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        trainable = sweep.trainable_for("toy", smoke_test=True, tracking_uri=None)
        for config, word in (({"chain.nosuch": tune.choice([1, 2])}, "chain.nosuch"),
                             ({"lora.rank": tune.choice([-3])}, "lora.rank")):
            with pytest.raises(ConfigError, match=re.escape(word)) as e:
                tune.run(trainable, config=config, num_samples=1, metric="eval/objective", mode="max",
                         storage_path=str(tmp_path / "ray_results"), verbose=0)
            assert "\n" not in str(e.value)
        with pytest.raises(ConfigError, match="--gpus-per-worker"):
            tune.run(sweep.trainable_for("toy", smoke_test=True, tracking_uri=None, gpus_per_worker=1),
                     config={"chain.segments": 2}, num_samples=1, storage_path=str(tmp_path / "ray_results"), verbose=0)
        assert not list((tmp_path / "runs").rglob("metrics.jsonl"))  # no trial trained
    finally:
        ray.shutdown()
