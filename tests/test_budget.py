"""Equal compute: `train.time_budget_s` and `train.call_budget` end a run early, split its progressive
stages, are logged with every step and survive a resume."""

import json

import pytest

from shortft.budget import Budget
from shortft.config import ConfigError, TrainConfig
from shortft.loop import train


def _rows(cfg):
    return [json.loads(line) for line in (cfg.output_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_call_budget_ends_the_run_and_splits_the_progressive_stages(make_cfg):
    # N=4, k=2: 2 head steps + jump + step = 4 calls a step; 24 calls = 6 steps of the 100 allowed
    cfg = make_cfg("train.steps=100", "train.call_budget=24", "chain.steps=4", "chain.segments=2",
                   "train.checkpoint_every=0", "eval.every=0")
    result = train(cfg)
    rows = _rows(cfg)
    assert result.steps == 6 and [r["step"] for r in rows] == list(range(1, 7))
    assert [r["calls_total"] for r in rows] == [4 * s for s in range(1, 7)]
    assert [r["stage"] for r in rows] == [1, 1, 1, 2, 2, 2]  # half the calls each, not half of train.steps
    assert "eval/objective" in rows[-1] and (cfg.output_dir / "checkpoints" / "step_000006").is_dir()
    assert json.loads((cfg.output_dir / "result.json").read_text())["spent_calls"] == 24


def test_a_time_budget_counts_training_steps_only(make_cfg):
    cfg = make_cfg("train.steps=1000", "train.time_budget_s=2", "chain.steps=4", "chain.segments=2",
                   "train.checkpoint_every=0", "eval.every=1")  # an evaluation after every step: not counted
    train(cfg)
    rows = _rows(cfg)
    spent = [r["train_seconds"] for r in rows]
    assert 1 < len(rows) < 1000 and spent[-1] >= 2 > spent[-2]
    assert spent[-1] == pytest.approx(sum(r["seconds_per_step"] for r in rows))
    assert sum(r["eval_seconds"] for r in rows) > 0  # evaluations ran, outside the budget


def test_the_spent_budget_survives_a_resume(make_cfg):
    cfg = make_cfg("train.steps=100", "train.call_budget=8", "chain.steps=4", "chain.segments=2", "eval.every=0")
    train(cfg)
    assert train(cfg, resume=True).steps == 2  # its budget is spent: nothing more to do
    cfg.train.call_budget = 16  # the same run, given more calls
    train(cfg, resume=True)
    rows = _rows(cfg)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["calls_total"] == 16


def test_stages_follow_steps_or_budget_whichever_is_further():
    budget = Budget(steps=100, calls=40)
    assert budget.stage(0, 4) == 1 and budget.stage(25, 4) == 2  # steps alone, as before
    budget.spend(0.0, 20)
    assert budget.stage(1, 4) == 3 and not budget.done(1)
    budget.spend(0.0, 20)
    assert budget.done(2) and budget.stage(2, 4) == 4


@pytest.mark.parametrize("key,value", [("time_budget_s", 0), ("time_budget_s", float("nan")), ("call_budget", 0),
                                       ("call_budget", -3)])
def test_bad_budgets_name_the_key(make_cfg, key, value):
    with pytest.raises(ConfigError, match=f"train.{key}"):
        make_cfg(f"train.{key}={value}")
    assert TrainConfig().time_budget_s is None and TrainConfig().call_budget is None


def test_a_sweep_trial_its_budget_ended_is_done_not_stopped_early():
    from shortft.sweep.trials import stopped_early

    sweep = {"base": "toy", "fixed": {"train.steps": 1000, "train.call_budget": 40}}
    config = {"train.lr": 1e-3}
    assert not stopped_early(config, sweep, {"step": 4, "calls_total": 40})  # the budget ended it
    assert stopped_early(config, sweep, {"step": 2, "calls_total": 20})  # ASHA did
