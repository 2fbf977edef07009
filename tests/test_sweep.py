"""The sweep: search-space checks, the script run alone (as `ray submit` runs it), `ray.tune.run`,
MLflow parent/children, the Parquet table, and resuming a sweep whose driver was killed."""

import json
import math
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from shortft import sweep, tracking
from shortft.config import ConfigError
from shortft.mlflow_logger import MlflowLogger
from shortft.space import load_space, trial_config
from tests.conftest import kill_with_env

# Tests that start a local Ray run one after another on one pytest-xdist worker (one machine's CPUs for
# their trials); the other worker takes the rest, and the multi-node tests (group "clusters"). They
# can share the machine because none stops another's Ray: no test here runs `ray stop` (which stops
# every Ray process it sees), the on-prem cluster's own `ray stop` runs in a PID namespace of its
# own, and the two-node cluster keeps its address in its own RAY_TMPDIR, where no plain ray.init()
# looks for "the latest cluster".
pytestmark = pytest.mark.xdist_group("ray")

ray = pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]
SEARCHED = ["chain.segments", "chain.truncate_at", "lora.rank", "lora.alpha", "train.lr",
            "reward.weights.toy_alignment", "reward.weights.saturation"]
COLUMNS = ["trial", "status", *SEARCHED, "objective_final", "objective_best", "objective_se", "step_best", "gain",
           "gain_se", "objective_samples", "eval/toy_judge_accuracy", "eval/toy_alignment", "eval/saturation",
           "mean_seconds_per_step", "peak_memory_mb", "node_id"]


def _space_file(tmp_path, search: str, extra: str = "") -> str:
    p = tmp_path / "space.yaml"
    fixed = "" if "train.steps" in search else "\n  train.steps: 2"
    p.write_text(f"base: toy\nfixed:{fixed or ' {}'}\nsearch:\n{search}\n{extra}")
    return str(p)


# -- bad input: one line, exit 2, before Ray starts --------------------------------------------------
@pytest.mark.parametrize("search,args,expected", [
    ("  chain.segmentz: {choice: [2, 4]}", [], "unknown config key 'chain.segmentz'"),
    ("  chain.truncate_at: {uniform: [0.5, 0.5]}", [], "search.chain.truncate_at: empty range"),
    ("  lora.rank: {lograndint: [64, 4]}", [], "search.lora.rank: empty range"),
    ("  chain.segments: {choice: []}", [], "choice needs a non-empty list"),
    ("  reward.weights.beauty: {uniform: [0, 1]}", [], "beauty"),
    ("  chain.segments: {choice: [2, 4]}", ["--num-samples", "0"], "--num-samples 0"),
    ("  chain.segments: {choice: [3]}", [], "search.chain.segments=3"),
    # each of the rest was found once trials were made, or by Optuna, after Ray and the parent run had started
    ("  chain.segments: {randint: [2, 8]}", [], "search.chain.segments=3 gives an invalid config"),  # no toy k=3
    ("  chain.segments: {uniform: [2, 8]}", [], "search.chain.segments=4.22"),  # 4.22 segments
    ("  chain.segments: {choice: [2, 4]}", ["--seed", "-1"], "--seed -1: must be an integer >= 0"),
    ("  chain.segments: {choice: [2, 4]}", ["--seed", "4294967296"], "--seed 4294967296: must be < 2**32"),
    ("  chain.segments: {choice: [2, 4]}", ["--gpus-per-worker", "nan"], "--gpus-per-worker nan: must be a finite"),
    # valid one at a time, not together: the trial Optuna drew with both stopped the sweep partway, in the driver
    ("  chain.steps: {choice: [50, 6]}\n  chain.segments: {choice: [2, 8]}", [],
     "search.chain.steps=6 with search.chain.segments=8 gives an invalid config: chain.segments=8: must be <="),
    # the smoke test fixed chain.steps=10 and dropped it from the search: the mistake passed, status 0
    ("  chain.steps: {choice: [50, 6]}\n  chain.segments: {choice: [2, 8]}", ["--smoke-test"],
     "search.chain.steps=6 with search.chain.segments=8 gives an invalid config"),
    ("  chain.method: {choice: [shortft, refl]}\n  chain.truncate_at: {uniform: [0.0, 0.5]}", [],
     "search.chain.method='refl' with search.chain.truncate_at=0.5 gives an invalid config"),
    # Tune refused it in fit(): a ValueError traceback, the parent MLflow run left RUNNING
    ("  chain.segments: {choice: [2, 4]}\n  lora.rank: {choice: [4, 8]}", [],
     "points_to_evaluate[0]: give a value of every searched key; it has none for lora.rank"),
])
def test_bad_input_fails_before_ray_with_one_line(tmp_path, capsys, search, args, expected):
    assert not ray.is_initialized()
    extra = "points_to_evaluate:\n  - {chain.segments: 4}\n" if "points_to_evaluate" in expected else ""
    code = sweep.main(["--space", _space_file(tmp_path, search, extra), "--storage-path", str(tmp_path / "s"),
                       "--tracking-uri", f"sqlite:///{tmp_path}/m.db", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error:") and expected in err, err
    assert not ray.is_initialized() and not (tmp_path / "s").exists()  # (an empty storage folder was left)


def test_the_smoke_test_says_which_searched_keys_it_fixes(tmp_path, capsys):
    """`--smoke-test` of a space that searches chain.steps ran trials of chain.steps=10, with the key gone from
    the results without a word."""
    (tmp_path / "s").mkdir()
    space = _space_file(tmp_path, "  chain.steps: {choice: [20, 40]}\n  chain.segments: {choice: [2, 4]}")
    assert sweep.main(["--space", space, "--smoke-test", "--resume", "--name", "nosuch", "--no-mlflow",
                       "--storage-path", str(tmp_path / "s")]) == 2  # refused after the space is read
    assert ("note: --smoke-test fixes chain.steps=10, which the space searches: its trials do not search them"
            in capsys.readouterr().err)


def test_a_key_both_fixed_and_searched_is_refused(tmp_path):
    """The searched value won, though the docs say every trial gets the fixed keys."""
    p = tmp_path / "space.yaml"
    p.write_text("base: toy\nfixed:\n  lora.rank: 8\nsearch:\n  lora.rank: {choice: [16, 32]}\n")
    with pytest.raises(ConfigError, match="lora.rank is both in fixed \\(8\\) and in search; keep it in one of them"):
        load_space(str(p))


@pytest.mark.parametrize("text,line", [  # each was a traceback (AttributeError, TypeError)
    ("base: toy\nsearch:\n  1: {randint: [4, 8]}\n", "search: 1 is no config key; keys are dotted names"),
    ("base: toy\nfixed:\n  null: 3\nsearch:\n  lora.rank: {randint: [4, 8]}\n", "fixed: None is no config key"),
    ("base: toy\nsearch:\n  lora.rank: {randint: [4, 8]}\npoints_to_evaluate: 5\n",
     "points_to_evaluate must be a list of mappings"),
    ("base: [toy]\nsearch:\n  lora.rank: {randint: [4, 8]}\n", "base must be a built-in config name or a YAML path"),
    ("base: 5\nsearch:\n  lora.rank: {randint: [4, 8]}\n", "base must be a built-in"),
])
def test_a_space_of_the_wrong_shape_is_one_line(tmp_path, text, line):
    p = tmp_path / "space.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(line)):
        load_space(str(p))


@pytest.mark.parametrize("config", ["sd15", "tiny"])
def test_a_config_of_another_model_without_a_space_is_refused_not_swept_on_the_toy_space(tmp_path, capsys, config):
    """`ray submit clusters/onprem.yaml tune/sweep.py -- --config shortft/my_sd15.yaml ...` (as docs/clusters.md
    printed it) swept the default space, the toy's: toy reward weights and eval.objective=toy_judge on SD 1.5."""
    code = sweep.main(["--config", config, "--storage-path", str(tmp_path / "s"), "--no-mlflow"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: --config {config}: its model (") and "--space sd15 or toy (built in)" in err, err
    assert not ray.is_initialized() and not (tmp_path / "s").exists()


def test_builtin_space_and_trial_config():
    space = load_space("toy")
    assert set(space.search) == set(SEARCHED)
    assert space.search["lora.rank"].kind == "lograndint" and space.search["lora.rank"].args == [4, 128]
    cfg = trial_config(space.base, space.fixed, space.points_to_evaluate[0], name="x")
    assert (cfg.chain.segments, cfg.chain.truncate_at, cfg.lora.rank, cfg.train.steps) == (4, 0.0, 8, 60)
    assert cfg.reward.weights == {"toy_alignment": 1.0, "saturation": 0.0}  # logged as drawn
    assert cfg.reward.trained() == {"toy_alignment": 1.0}  # a 0 takes the term out
    # fixed evaluation objective, not the training reward: the judge's mean score, with its accuracy
    assert cfg.eval.objective == "toy_judge" and cfg.eval.terms == ["toy_judge_accuracy", "saturation"]
    smoke = load_space("toy", overrides=sweep.SMOKE_TEST)
    assert smoke.fixed["train.steps"] == 2 and "chain.steps" not in smoke.search
    with pytest.raises(ConfigError, match="outside"):
        load_space(_space_file(Path(os.environ["SHORTFT_CACHE"]), "  lora.rank: {randint: [4, 8]}",
                               "points_to_evaluate:\n  - {lora.rank: 16}\n"))
    for value in ("abc", "4.5"):  # said to lie outside [4, 8]
        with pytest.raises(ConfigError, match=rf"^points_to_evaluate\[0\]: lora.rank=.*{value}.* is no integer for its "
                                              r"randint \[4, 8\]$"):
            load_space(_space_file(Path(os.environ["SHORTFT_CACHE"]), "  lora.rank: {randint: [4, 8]}",
                                   f"points_to_evaluate:\n  - {{lora.rank: {value}}}\n"))


def test_results_markdown_gives_each_objective_its_standard_error_and_the_spread_in_them():
    from shortft.sweep.results import markdown

    space = load_space(_space_file(Path(os.environ["SHORTFT_CACHE"]), "  lora.rank: {randint: [4, 8]}"))
    rows = [{"trial": "t001", "status": "DONE", "lora.rank": 4, "objective_best": 0.9, "objective_se": 0.02,
             "steps": 60, "mean_seconds_per_step": 1.234, "peak_memory_mb": 900.4},
            {"trial": "t002", "status": "STOPPED_EARLY", "lora.rank": 8, "objective_best": 0.8, "objective_se": 0.01,
             "steps": 30, "mean_seconds_per_step": 2.0, "peak_memory_mb": 800.0},
            {"trial": "t003", "status": "ERROR", "lora.rank": 6, "objective_best": None}]
    lines = markdown(rows, space).splitlines()
    assert lines[0] == "| trial | status | rank | objective (best) ± se | steps | mean s/step | peak MB |"
    assert lines[2] == "| t001 | DONE | 4 | 0.9000 ± 0.0200 | 60 | 1.23 | 900 |"
    assert lines[4] == "| t003 | ERROR | 6 | - | - | - | - |"
    assert lines[-1] == "best - worst: 0.1000 = 4.5 x the combined standard error (0.0224, as if independent)"


def test_results_markdown_puts_the_untrained_model_first_and_the_best_trials_gain_over_it_in_standard_errors():
    from shortft.sweep.results import markdown

    space = load_space(_space_file(Path(os.environ["SHORTFT_CACHE"]), "  lora.rank: {randint: [4, 8]}"))
    rows = [{"trial": "t001", "status": "DONE", "lora.rank": 4, "objective_best": 0.9, "objective_se": 0.02,
             "steps": 60, "mean_seconds_per_step": 1.234, "peak_memory_mb": 900.4}]
    base = {"eval/objective": 0.86, "eval/objective_se": 0.025, "eval/toy_judge_accuracy": 0.7}
    lines = markdown(rows, space, base).splitlines()
    assert lines[2] == "| untrained | BASE | - | 0.8600 ± 0.0250 | 0 | - | - |"
    assert lines[3].startswith("| t001 | DONE | 4 | 0.9000 ± 0.0200 |")
    assert lines[-1] == "best - untrained: +0.0400 = 1.2 x the combined standard error (0.0320, as if independent)"
    # a sweep whose trials all fall below the model they started from says so with the sign
    below = markdown([{**rows[0], "objective_best": 0.85}, {**rows[0], "trial": "t002", "objective_best": 0.8}],
                     space, {**base, "eval/objective_se": float("nan")}).splitlines()
    assert "| untrained | BASE | - | 0.8600 | 0 | - | - |" in below
    assert below[-3] == "best - worst: 0.0500 = 1.8 x the combined standard error (0.0283, as if independent)"
    assert below[-1] == "best - untrained: -0.0100 = -0.5 x the one standard error known (0.0200, as if independent)"
    # an untrained evaluation that came out NaN: its row says so, and no "+nan = nan x" line is drawn under it
    nan = markdown(rows, space, {**base, "eval/objective": float("nan")}).splitlines()
    assert not any(line.startswith("best - untrained") for line in nan) and "nan" not in nan[-1]


def test_gains_over_the_untrained_model_are_measured_sample_by_sample():
    """The trials and the untrained model are evaluated on the same samples: a gain's standard error is
    that of the per-sample differences, here 10x below either model's own (the samples share the
    prompt's difficulty), and the table says which it used."""
    from shortft.stats import paired
    from shortft.sweep.results import markdown

    space = load_space(_space_file(Path(os.environ["SHORTFT_CACHE"]), "  lora.rank: {randint: [4, 8]}"))
    hard = [0.2, 0.9, 0.5, 0.7, 0.4, 0.8]  # the untrained model's samples: some prompts are harder
    base = {"eval/objective": sum(hard) / 6, "eval/objective_se": 0.11, "eval/objective_samples": hard}
    up = [v + d for v, d in zip(hard, [0.03, 0.01, 0.02, 0.03, 0.02, 0.01])]
    gain, se = paired(up, hard)
    assert gain == pytest.approx(0.02) and se == pytest.approx(0.00365, abs=1e-5)
    assert paired(up, hard[:5]) is None and paired(up, None) is None and paired([0.5], [0.4]) is None
    rows = [{"trial": "t001", "status": "DONE", "lora.rank": 4, "objective_best": sum(up) / 6, "objective_se": 0.11,
             "gain": gain, "gain_se": se, "objective_samples": up, "steps": 60},
            {"trial": "t002", "status": "ERROR", "lora.rank": 8, "objective_best": None}]
    lines = markdown(rows, space, base).splitlines()
    assert lines[0] == "| trial | status | rank | objective (best) ± se | gain ± paired se | steps | mean s/step | peak MB |"
    assert lines[2] == "| untrained | BASE | - | 0.5833 ± 0.1100 | - | 0 | - | - |"
    assert lines[3] == "| t001 | DONE | 4 | 0.6033 ± 0.1100 | +0.0200 ± 0.0037 | 60 | - | - |"
    assert lines[4] == "| t002 | ERROR | 8 | - | - | - | - | - |"
    assert lines[-1] == ("best - untrained: +0.0200 = 5.5 x the paired standard error (0.0037, over the same 6 "
                         "samples)")  # 0.1 x the combined standard error, unpaired
    # without the samples (a base.json of an older sweep) the unpaired reading, as before
    old = markdown([{k: v for k, v in rows[0].items() if k not in ("gain", "objective_samples")}], space,
                   {k: v for k, v in base.items() if k != "eval/objective_samples"}).splitlines()
    assert "gain ± paired se" not in old[0] and old[-1] == (
        "best - untrained: +0.0200 = 0.1 x the combined standard error (0.1556, as if independent)")


def test_standard_errors_are_taken_over_prompts():
    """A prompt's samples share it (a hard prompt is hard for every seed): the objective's standard error
    and a gain's paired one are taken over the prompts, each prompt's samples averaged first. Over the
    samples, as if independent, both were 1.6x too small here: a gain of 2.1 standard errors is 1.3."""
    from shortft.stats import clustered, paired
    from shortft.sweep.results import markdown

    space = load_space(_space_file(Path(os.environ["SHORTFT_CACHE"]), "  lora.rank: {randint: [4, 8]}"))
    hard = [[0.2, 0.2], [0.9, 0.9], [0.5, 0.5]]  # the untrained model's samples, prompt by prompt
    mean, se = clustered(hard)
    assert mean == pytest.approx(1.6 / 3) and se == pytest.approx(statistics.stdev([0.2, 0.9, 0.5]) / math.sqrt(3))
    assert se / (statistics.stdev([0.2, 0.2, 0.9, 0.9, 0.5, 0.5]) / math.sqrt(6)) == pytest.approx(1.58, abs=0.01)
    gains = [0.05, 0.0, 0.01]  # what training gave each prompt, on both its seeds
    up = [[v + d for v in p] for p, d in zip(hard, gains)]
    gain, gain_se = paired(up, hard)
    assert gain == pytest.approx(0.02) and gain_se == pytest.approx(statistics.stdev(gains) / math.sqrt(3))
    assert gain / gain_se == pytest.approx(1.3, abs=0.05)
    assert paired(up, [s for p in hard for s in p]) is None  # grouped against flat: not the same samples
    base = {"eval/objective": mean, "eval/objective_se": se, "eval/objective_samples": hard}
    rows = [{"trial": "t001", "status": "DONE", "lora.rank": 4, "objective_best": mean + gain,
             "objective_se": clustered(up)[1], "gain": gain, "gain_se": gain_se, "objective_samples": up, "steps": 60}]
    assert markdown(rows, space, base).splitlines()[-1] == (
        "best - untrained: +0.0200 = 1.3 x the paired standard error (0.0153, over the same 3 prompts, "
        "2 samples each)")
    from shortft.sweep.results import _samples

    assert _samples([[0.5]]) == "1 prompt, 1 sample each"  # it said "1 prompts, 1 samples each"


def test_a_trial_that_ran_out_of_gpu_memory_has_the_whole_line_in_the_table():
    """Tune keeps a trial's error as Ray's exception, the remote traceback above its last line: that line
    was cut at 300 characters, type included, which cut the settings that would make the trial fit."""
    import traceback

    from ray.exceptions import RayTaskError

    from shortft.memory import OutOfMemory
    from shortft.raised import one_line as error_line

    line = "out of GPU memory in step 2 (asked for 1.25 GiB with 1.18 GiB of 23.52 GiB free); to lower the peak: " + \
        "model.gradient_checkpointing=true, " * 10 + "the checkpoints written so far are kept"
    try:
        raise OutOfMemory(line)
    except OutOfMemory as e:
        error = RayTaskError("_Inner.train", traceback.format_exc(), e, pid=1, ip="10.0.0.2")
    assert len(line) > 300 and error_line(error) == line
    assert error_line(RuntimeError("a\nValueError: " + "x" * 400)) == "ValueError: " + "x" * 288  # others: cut as before


def test_the_untrained_models_evaluation_out_of_gpu_memory_costs_its_row_in_one_line(tmp_path, monkeypatch, capsys):
    """It runs as a Ray task beside the trials; its row's reason was the last line of PyTorch's report."""
    import traceback

    import ray
    import torch
    from ray.exceptions import RayTaskError

    import shortft.sample
    from shortft.memory import OutOfMemory
    from shortft.sweep import baseline
    from tests.test_failures import CUDA_OOM

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError(CUDA_OOM)

    monkeypatch.setattr(shortft.sample, "evaluate_trained", oom)
    try:
        baseline.evaluate_base("tiny", {"eval.batch_size": 4}, tmp_path)
    except OutOfMemory as e:
        error = RayTaskError("_evaluate_in_task", traceback.format_exc(), e)

    def get(*args, **kwargs):
        raise error

    monkeypatch.setattr(ray, "get", get)
    assert baseline.BaseEvaluation(tmp_path, task=object()).result() is None
    assert capsys.readouterr().err.strip() == (
        "untrained model: no row in the results (its evaluation failed: out of GPU memory in the untrained model's "
        "evaluation (asked for 1.25 GiB with 1.18 GiB of 23.52 GiB free; another process holds 3.10 GiB); to lower "
        "the peak: model.dtype=bfloat16 (the frozen weights in half the memory), eval.batch_size=2, "
        "model.vae_batch_size=1 (one image per decode); PyTorch held memory it could not hand out: "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True)")


def test_the_results_table_pairs_a_trials_best_evaluation_with_the_untrained_models(tmp_path, monkeypatch):
    """The samples of the evaluation that gave the best objective (not the last); none where the space
    searches what the evaluation reads (two trials' samples then are not the same samples)."""
    import pandas as pd

    from shortft.sweep import results
    from shortft.sweep.results import results_table

    monkeypatch.setattr(results, "stopped_early", lambda config, sweep, last: False)

    class Result:  # what Tune's ResultGrid gives per trial
        def __init__(self, history):
            self.config, self.error = {"trial_key": "t001", "lora.rank": 4}, None
            self.metrics, self.metrics_dataframe = history[-1], pd.json_normalize(history, sep="/")

    history = [{"step": 30, "eval/objective": 0.7, "eval/objective_se": 0.1, "eval/objective_samples": [0.6, 0.8]},
               {"step": 60, "eval/objective": 0.6, "eval/objective_se": 0.1, "eval/objective_samples": [0.5, 0.7]}]
    base = {"eval/objective": 0.55, "eval/objective_samples": [0.5, 0.6]}
    sweep_settings = {}
    space = load_space(_space_file(tmp_path, "  lora.rank: {randint: [4, 8]}"))
    [row] = results_table([Result(history)], space, sweep_settings, base)
    assert row["objective_best"] == 0.7 and row["objective_samples"] == [0.6, 0.8]
    assert row["gain"] == pytest.approx(0.15) and row["gain_se"] == pytest.approx(0.05)
    assert "eval/objective_samples" not in row and row["objective_final"] == 0.6
    searching = load_space(_space_file(tmp_path, "  eval.seed: {randint: [0, 9]}\n  lora.rank: {randint: [4, 8]}"))
    [row] = results_table([Result(history)], searching, sweep_settings, base)
    assert row["objective_best"] == 0.7 and row["objective_samples"] is None and row["gain"] is None
    pending = Result([{"trial_id": "eb0fef0e"}])  # a Ctrl-C left it PENDING, with no values yet: no row of dashes
    pending.config = {}
    assert [r["trial"] for r in results_table([pending, Result(history)], space, sweep_settings, base,
                                               {"eb0fef0e": "PENDING"})] == ["t001"]


def test_the_untrained_row_is_left_out_when_the_space_searches_what_the_evaluation_reads(tmp_path, capsys):
    from shortft.sweep import baseline

    space = load_space(_space_file(tmp_path, "  eval.samples_per_prompt: {choice: [1, 2]}\n"
                                             "  chain.steps: {choice: [10, 20]}\n  lora.rank: {randint: [4, 8]}"))
    assert baseline.searched_evaluation_keys(space) == ["eval.samples_per_prompt", "chain.steps"]
    pending = baseline.start(space, tmp_path / "out", {"use_gpu": False, "resource_wait_s": 10})
    assert pending.result() is None and not (tmp_path / "out" / baseline.BASE_FILE).exists()
    err = capsys.readouterr().err
    assert "untrained model: no row in the results (the space searches eval.samples_per_prompt, chain.steps" in err


def test_the_untrained_model_is_evaluated_as_shortft_eval_evaluates_the_trials_config(tmp_path, capsys):
    from shortft import load_config
    from shortft.cli import run_eval

    from shortft.space import trial_config
    from shortft.sweep.baseline import evaluation_of, read_base

    fixed = {**sweep.SMOKE_TEST, "eval.objective": "toy_judge"}
    base = sweep.evaluate_base("toy", fixed, tmp_path)
    kept = tmp_path / "base.json"
    assert read_base(kept, evaluation_of(trial_config("toy", fixed, {}))) == base and (tmp_path / "grids" / "base.png").is_file()
    by_cli = run_eval(load_config("toy", [f"{k}={v}" for k, v in fixed.items()]), None, None)
    assert base == by_cli and base["eval/objective"] == base["eval/toy_judge"]
    # a sweep name used again with another evaluation took the other's untrained row as its own
    other = evaluation_of(trial_config("toy", {**fixed, "eval.samples_per_prompt": 2, "eval.seed": 3}, {}))
    capsys.readouterr()
    assert read_base(kept, other) is None
    assert "base.json was evaluated with other settings (eval.samples_per_prompt, eval.seed); evaluating the " \
           "untrained model again" in capsys.readouterr().out


def test_an_untrained_evaluation_that_fails_or_is_never_placed_costs_its_row_and_not_the_sweep(tmp_path, capsys):
    """On GPUs it runs beside the trials (`start` does not wait); on this CPU a task that asks for a GPU
    either fails (a GPU Ray only pretends to have) or waits for one that never comes."""
    from shortft.sweep import baseline

    space = load_space("toy", overrides=sweep.SMOKE_TEST)
    gpu = {"use_gpu": True, "cpus_per_worker": None, "gpus_per_worker": 1.0, "threads": None, "base": space.base,
           "fixed": space.fixed}
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        pending = baseline.start(space, tmp_path / "a", {**gpu, "resource_wait_s": 300})
        assert pending.task is not None  # not waited for: the trials would start now
        assert pending.result() is None
        never = baseline.start(space, tmp_path / "b", {**gpu, "gpus_per_worker": 2.0, "resource_wait_s": 3})
        assert never.result() is None
    finally:
        ray.shutdown()
    err = capsys.readouterr().err
    assert "untrained model: no row in the results (its evaluation failed: " in err, err
    assert "untrained model: no row in the results (its evaluation was not placed within --resource-wait-s 3)" in err
    assert not list(tmp_path.rglob(baseline.BASE_FILE))


# -- MLflow / Parquet checks shared by the sweeps below ------------------------------------------------
def _runs(db: Path, experiment: str = "shortft-sweeps"):
    c = tracking.client(f"sqlite:///{db}")
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return c, parents, children


def _check_sweep_outputs(db: Path, table: Path, trials: int = 3):
    import pyarrow.parquet as pq

    c, parents, children = _runs(db)
    assert len(parents) == 1 and len(children) == trials
    # the sweep's settings that shape its trials (shortft_sweep.json holds them too)
    assert {"seed", "max_concurrent", "smoke_test", "num_samples"} <= set(parents[0].data.params), parents[0].data.params
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        for key in SEARCHED:
            assert key in child.data.params, key
        # the folder it trained in (runs/sweeps/<sweep>/<run name>), not the base config's `runs/{name}`
        assert Path(child.data.params["train.output_dir"]).parts[-3:] == ("sweeps", table.parent.name,
                                                                           child.info.run_name), child.data.params
        assert "loss" in child.data.metrics and "eval/objective" in child.data.metrics
        assert child.info.status == "FINISHED"
    assert len({ch.data.tags[tracking.RUN_KEY] for ch in children}) == trials  # no duplicates
    parent_artifacts = {a.path for a in c.list_artifacts(parents[0].info.run_id)}
    assert {"results.parquet", "results.csv", "results.md", "best_config.yaml", "base.json", "grids",
            "best"} <= parent_artifacts
    t = pq.read_table(table)
    assert t.num_rows == trials
    assert set(COLUMNS) <= set(t.column_names), set(COLUMNS) - set(t.column_names)
    rows = t.to_pylist()
    assert all(r["status"] in ("DONE", "STOPPED_EARLY") and r["objective_best"] is not None for r in rows)
    for row in rows:  # every step up to the last reported one is in MLflow; a finished trial has its LoRA
        child = next(ch for ch in children if ch.info.run_id == row["mlflow_run_id"])
        logged = max(m.step for m in c.get_metric_history(child.info.run_id, "loss"))
        assert logged == row["steps"], (row["trial"], logged, row["steps"])
        if row["status"] == "DONE":
            artifacts = {a.path for a in c.list_artifacts(child.info.run_id)}
            assert {"lora", "config.yaml"} <= artifacts, (row["trial"], artifacts)
    assert all(r["mean_seconds_per_step"] > 0 and r["peak_memory_mb"] > 0 for r in rows)
    assert all(0 < r["objective_se"] < 0.5 for r in rows)  # the judge's score over the samples, in [0, 1]
    text = Path(table).with_name("results.md").read_text()
    assert text.count("\n| t0") == trials and "objective (best) ± se | gain ± paired se |" in text
    # the untrained model: evaluated once, its row first, its gain below, on the parent run
    base = json.loads(Path(table).with_name("base.json").read_text())
    assert 0 < base["eval/objective"] < 1 and base["eval/objective_se"] > 0
    assert text.splitlines()[2].startswith(f"| untrained | BASE | {'- | ' * len(SEARCHED)}{base['eval/objective']:.4f}")
    # every trial's samples are the untrained model's samples: its gain carries their paired standard error
    n = len(base["eval/objective_samples"])
    assert n > 1 and all(len(r["objective_samples"]) == n and r["gain_se"] > 0 for r in rows)
    per_prompt = len(base["eval/objective_samples"][0])  # kept by prompt, in base.json and in Parquet
    assert all(isinstance(p, list) and len(p) == per_prompt for r in rows for p in r["objective_samples"])
    assert "x the paired standard error" in text.split("\nbest - untrained: ")[1]
    assert "objective_samples" not in Path(table).with_name("results.csv").read_text()  # lists: Parquet only
    assert not any("objective_samples" in key for run in [*children, *parents] for key in run.data.metrics)
    assert parents[0].data.metrics["base/objective"] == pytest.approx(base["eval/objective"])
    assert 0 < parents[0].data.metrics["driver_cpu_seconds"] < parents[0].data.metrics["sweep_seconds"]
    assert 0 < parents[0].data.metrics["base/seconds"] == pytest.approx(base["seconds"])
    return parents[0], children, rows


# -- the script, copied alone into an empty directory -------------------------------------------------
def _script(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    (work / "sweep.py").write_bytes((ROOT / "tune" / "sweep.py").read_bytes())
    return work


def _run_script(work: Path, *args: str, samples: int = 3, env: dict | None = None, **kw) -> subprocess.Popen:
    env = dict(env or {**os.environ, "PYTHONUNBUFFERED": "1"})
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "sweep.py", "--smoke-test", "--num-samples", str(samples), *args], cwd=work,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, **kw)


@pytest.mark.slow
def test_ctrl_c_stops_the_sweep_says_so_and_how_to_continue_it_and_the_resume_finishes_it(tmp_path):
    """Tune stops a sweep gracefully on Ctrl-C and returns its trials. The driver then wrote the table as if the
    sweep had ended (the trial not yet run listed as STOPPED_EARLY, ASHA's stop), printed its best trial and
    exited 0: nothing said it was cut short or how to continue it."""
    import pyarrow.parquet as pq

    work = _script(tmp_path)
    ray_tmp = tempfile.mkdtemp(prefix="rcc", dir="/tmp")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": ray_tmp}
    proc = _run_script(work, "--name", "cut", "--no-baseline", samples=3, env=env)
    for line in proc.stdout:
        if line.startswith("Trial run_trial_") and " started with configuration" in line:
            break
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    kill_with_env("RAY_TMPDIR", ray_tmp)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 130, out[-3000:]
    assert "A new study created" not in out and "Creating initial MLflow database tables" not in out  # INFO noise
    line = next(x for x in out.splitlines() if x.startswith("sweep cut stopped before its end (Tune kept its state)"))
    # the script as it was run (here the copy `ray submit` makes): `tune/sweep.py` is not there
    assert line.endswith(f"continue it with: python sweep.py --name cut --resume --storage-path {work / 'ray_results'} "
                         "(on a cluster: ray submit <cluster yaml> tune/sweep.py -- --name cut --resume)")
    rows = pq.read_table(work / "runs" / "sweeps" / "cut" / "results.parquet").to_pylist()
    assert all(r["status"] != "STOPPED_EARLY" for r in rows), [(r["trial"], r["status"]) for r in rows]
    assert any(r["status"] == "UNFINISHED" for r in rows) or len(rows) < 3, rows
    c = tracking.client(f"sqlite:///{work / 'mlflow.db'}")

    def statuses():
        runs = c.search_runs([c.get_experiment_by_name(sweep.EXPERIMENT).experiment_id])
        return sorted((r.info.status, r.data.tags.get("shortft.trial_status")) for r in runs
                      if "mlflow.parentRunId" in r.data.tags), [r.info.status for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children, parents = statuses()  # none left RUNNING (a smoke trial ends its 2 steps: Tune's stop waits for it)
    assert parents == ["KILLED"] and children and "RUNNING" not in str(children), children
    # A relative --storage-path was a URI with no scheme to Ray's pyarrow filesystem: a traceback
    again = _run_script(work, "--name", "cut", "--resume", "--no-baseline", "--storage-path", "ray_results")
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0 and "stopped before its end" not in out, out[-3000:]
    assert re.search(r"\nsweep cut: 3 trials in \d+ s \(this resume\); results: ", out), out[-3000:]  # (not the sweep's)
    rows = pq.read_table(work / "runs" / "sweeps" / "cut" / "results.parquet").to_pylist()
    assert len(rows) == 3 and all(r["status"] in ("DONE", "STOPPED_EARLY") for r in rows), rows
    children, parents = statuses()
    assert parents == ["FINISHED"] and len(children) == 3 and {s for s, _ in children} == {"FINISHED"}, children
    assert "had ended" not in out
    # once more: the sweep had ended, which nothing said (it printed the table again as if it had run)
    again = _run_script(work, "--name", "cut", "--resume", "--no-baseline")
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0 and "note: sweep cut had ended (its 3 trials); nothing runs again" in out, out[-3000:]


@pytest.mark.slow
def test_resume_after_the_driver_is_killed_in_the_second_trial(tmp_path):
    """Also the smoke sweep through the script alone: copied into an empty directory, as `ray submit`
    runs it, it starts a local Ray, and the resumed sweep (run from another folder) leaves 1 parent, 2
    children, 2 table rows in the sweep's own store and folder."""
    work = _script(tmp_path)
    ray_tmp = tempfile.mkdtemp(prefix="rcr", dir="/tmp")  # marks every process of the Ray the driver starts
    proc = _run_script(work, "--name", "crash", samples=2, env={**os.environ, "PYTHONUNBUFFERED": "1",
                                                                "RAY_TMPDIR": ray_tmp})
    db = work / "mlflow.db"
    deadline = time.time() + 600
    # wait until the second trial is training (its child run exists and has logged a step)
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        try:
            with sqlite3.connect(db) as con:
                n = con.execute("select count(distinct run_uuid) from metrics where key='loss'").fetchone()[0]
        except sqlite3.Error:
            continue
        if n >= 2:
            break
    assert proc.poll() is None, "sweep ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started, mid-trial
    proc.communicate()
    kill_with_env("RAY_TMPDIR", ray_tmp)  # leftovers of that Ray only (not `ray stop`: every Ray here)
    shutil.rmtree(ray_tmp, ignore_errors=True)

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    # resumed from another folder: it logs to the sweep's store and writes under its output folder
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    again = subprocess.Popen([sys.executable, str(work / "sweep.py"), "--name", "crash", "--resume", "--storage-path",
                              str(work / "ray_results")], cwd=elsewhere, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out, _ = again.communicate(timeout=900)
    assert again.returncode == 0, out[-3000:]
    assert not list(elsewhere.iterdir()), list(elsewhere.iterdir())
    assert "best trial t00" in out and "mlflow ui --backend-store-uri sqlite:///" in out
    assert "base.json)" in out and "untrained model: evaluating" not in out  # the killed driver's, read back
    assert "ASHA's rungs were not restored" not in out
    _, _, rows = _check_sweep_outputs(db, work / "runs" / "sweeps" / "crash" / "results.parquet", trials=2)

    # the gains: the final LoRAs and the untrained model evaluated again here, sample by sample, give the
    # table's samples, and from them its gains and their paired standard errors (smoke trials: best = final)
    from shortft import load_config
    from shortft.sample import evaluate_trained

    def flat(by_prompt):  # the samples, prompt by prompt
        return [v for prompt in by_prompt for v in prompt]

    def means(by_prompt):
        return [sum(prompt) / len(prompt) for prompt in by_prompt]

    out_dir = work / "runs" / "sweeps" / "crash"
    base = json.loads((out_dir / "base.json").read_text())
    for row in rows:
        trial = out_dir / f"crash-{row['trial']}"
        cfg = load_config(str(trial / "config.yaml"))
        untrained = evaluate_trained(cfg, None)["eval/objective_samples"]
        tuned = evaluate_trained(cfg, str(trial / "lora"))["eval/objective_samples"]
        assert flat(untrained) == pytest.approx(flat(base["eval/objective_samples"]), abs=1e-5)
        assert flat(tuned) == pytest.approx(flat(row["objective_samples"]), abs=1e-5)
        # the gain and its standard error over the prompts' mean differences
        diff = [a - b for a, b in zip(means(row["objective_samples"]), means(base["eval/objective_samples"]))]
        mean = sum(diff) / len(diff)
        se = (sum((d - mean) ** 2 for d in diff) / (len(diff) - 1) / len(diff)) ** 0.5
        assert row["gain"] == pytest.approx(mean, rel=1e-9) and row["gain_se"] == pytest.approx(se, rel=1e-9)
        assert f"| {row['gain']:+.4f} ± {row['gain_se']:.4f} |" in (out_dir / "results.md").read_text()
        # a finished trial gave back its checkpoints' disk; its final LoRAs stay
        assert (trial / "lora").is_dir() and not (trial / "checkpoints").exists(), list(trial.iterdir())

    # the best trial's LoRAs at its best evaluation (taken from Tune's copy under the storage path), with
    # its config: evaluated again, they give the samples of the evaluation that ranked them
    best = out_dir / "best"
    top = max(rows, key=lambda r: r["objective_best"])
    info = json.loads((best / "best.json").read_text())
    assert info["trial"] == top["trial"] and info["step"] == top["step_best"] == 2
    assert info["from"].startswith(str(work / "ray_results" / "crash")) and info["from"].endswith("/lora")
    tuned = evaluate_trained(load_config(str(best / "config.yaml")), str(best / "lora"))
    assert flat(tuned["eval/objective_samples"]) == pytest.approx(flat(top["objective_samples"]), abs=1e-5)
    assert f"its LoRAs at that step: {best / 'lora'}; draw with them: shortft sample --config" in out


def test_a_resume_with_a_conflicting_flag_is_refused_in_one_line(tmp_path, capsys):
    from shortft.sweep import saved

    storage = str(tmp_path / "s")
    saved.write(storage, "x", saved.settle({}, storage, "x", resume=False))  # a sweep that started on `toy`
    code = sweep.main(["--name", "x", "--resume", "--space", "other.yaml", "--num-samples", "9", "--storage-path",
                       storage, "--no-mlflow"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and not ray.is_initialized()
    assert "--space other.yaml (the sweep has toy)" in err and "--num-samples 9 (the sweep has 6)" in err


def test_a_spaces_relative_base_yaml_is_found_beside_it_from_another_folder(tmp_path, monkeypatch):
    """A sweep resumed from another folder reads its stored space path, whose `base: cfg.yaml` named no file
    there: `base 'cfg.yaml' with the fixed keys: --config 'cfg.yaml': no such file`."""
    from shortft.space import configs, load_space

    study = tmp_path / "study"
    study.mkdir()
    (study / "cfg.yaml").write_text((ROOT / "shortft" / "configs" / "toy.yaml").read_text().replace("name: toy", "name: mine"))
    (study / "space.yaml").write_text("base: cfg.yaml\nfixed:\n  train.steps: 2\nsearch:\n  chain.segments: {choice: [2, 4]}\n")
    monkeypatch.chdir(tmp_path)  # not the study folder
    space = load_space(str(study / "space.yaml"))
    assert space.base == str(study / "cfg.yaml") and configs(space)[0].name == "mine"


def test_a_resume_from_another_folder_without_the_storage_path_says_which_to_pass(tmp_path, capsys, monkeypatch):
    """`--resume` from a folder other than the sweep's found nothing under ./ray_results, said only that,
    and left an empty ray_results folder there."""
    monkeypatch.chdir(tmp_path)
    code = sweep.main(["--name", "x", "--resume", "--no-mlflow"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and not ray.is_initialized(), err
    assert err == (f"error: --resume: no folder {tmp_path / 'ray_results'}; pass --storage-path of the sweep: the one "
                   "its first line printed (default: $SHORTFT_STORAGE_PATH where set, else ray_results in the folder "
                   "it was started from)")
    assert not (tmp_path / "ray_results").exists()
    # the right storage path and a wrong name: the sweeps that are there, not advice on the storage path
    from shortft.sweep import saved

    storage = tmp_path / "s"
    for age, name in ((100, "old"), (0, "new")):
        saved.write(str(storage), name, {})
        (storage / name / "tuner.pkl").write_bytes(b"")
        os.utime(storage / name / "tuner.pkl", (time.time() - age,) * 2)
    code = sweep.main(["--name", "nwe", "--resume", "--no-mlflow", "--storage-path", str(storage)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (f"error: --resume: no sweep 'nwe' under {storage}; the sweeps there, newest first: "
                                 "new, old; pass --name of one of them"), err


def test_a_resume_logs_to_the_sweeps_mlflow_store_and_writes_its_folder_from_any_working_directory(tmp_path):
    """The store and the output folder were not kept: `--name X --resume` run from another folder (or with
    another $MLFLOW_TRACKING_URI) made a new parent run and new trial runs in another store (or logged a
    sweep started with --no-mlflow), and wrote the table and run folders under that folder."""
    from shortft.sweep import saved

    storage = str(tmp_path / "s")
    store = f"sqlite:///{tmp_path}/mlflow.db"
    given = {"tracking_uri": store, "output_root": str(tmp_path / "out")}
    saved.write(storage, "x", saved.settle(given, storage, "x", resume=False))
    kept = saved.settle({"tracking_uri": None, "output_root": None}, storage, "x", resume=True)
    assert (kept["tracking_uri"], kept["output_root"]) == (store, str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=re.escape(f"--no-mlflow (the sweep has {store})")):
        saved.settle({"tracking_uri": False}, storage, "x", resume=True)
    saved.write(storage, "off", saved.settle({"tracking_uri": False}, storage, "off", resume=False))
    with pytest.raises(ConfigError, match=re.escape(f"--tracking-uri {store} (the sweep has no MLflow)")):
        saved.settle({"tracking_uri": store}, storage, "off", resume=True)
    assert saved.settle({}, storage, "off", resume=True)["tracking_uri"] is False
    # a sweep stored before these were kept: as given (or the default), as before
    saved.write(storage, "old", {k: v for k, v in saved.settle({}, storage, "old", resume=False).items()
                                 if k not in ("tracking_uri", "output_root")})
    assert saved.settle({"tracking_uri": store}, storage, "old", resume=True)["tracking_uri"] == store
    assert saved.settle({}, storage, "old", resume=True)["tracking_uri"] == ""


def test_the_overhead_report_of_a_store_with_no_sweep_is_one_line_and_makes_no_store(tmp_path):
    """It was an AttributeError on the missing experiment, after MLflow had made an empty mlflow.db."""
    p = subprocess.run([sys.executable, str(ROOT / "tune" / "overhead.py")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: --tracking-uri sqlite:///mlflow.db: no such store; give the sweep's"]
    assert not list(tmp_path.iterdir())
    # a store of another kind was MLflow's traceback; $MLFLOW_TRACKING_URI was not read (the sweep's default)
    for args, env, line in ((["--tracking-uri", "bogus://x"], {}, "error: tracking URI 'bogus://x': use sqlite:///"),
                            ([], {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/env.db"},
                             f"error: --tracking-uri sqlite:///{tmp_path}/env.db: no such store")):
        p = subprocess.run([sys.executable, str(ROOT / "tune" / "overhead.py"), *args], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120, env={**os.environ, **env})
        assert p.returncode == 2 and p.stderr.strip().startswith(line), p.stderr[-2000:]


def test_private_ray_tune_optuna_attributes_are_still_there():
    from shortft.sweep import ray_compat

    moved = ray_compat.missing()
    assert not moved, (f"moved in this Ray/Optuna: {moved}; the workarounds in shortft/sweep/ray_compat.py "
                       "(written against Ray 2.60, Optuna 4.x) need updating")


def test_a_new_sweep_refuses_a_name_whose_trial_folders_hold_runs(tmp_path, capsys, monkeypatch):
    """An earlier sweep of the name whose Tune state was removed (or kept under another --storage-path) left
    its trial folders under runs/sweeps/<name>: every trial of the new sweep failed on them after Ray's
    start-up ("holds a finished run ... set train.output_dir", which a sweep has no flag for)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "sweeps" / "again" / "again-t001").mkdir(parents=True)
    (tmp_path / "runs" / "sweeps" / "again" / "again-t001" / "result.json").write_text("{}")
    code = sweep.main(["--name", "again", "--storage-path", str(tmp_path / "ray"), "--no-mlflow", "--smoke-test"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and not ray.is_initialized(), err
    assert err.endswith(f"sweep 'again': {tmp_path}/runs/sweeps/again holds an earlier sweep's trial runs "
                        "(again-t001); pass another --name, or move that folder away"), err


def test_sweep_experiment_is_marked_as_model_training(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    tracking.experiment_id(uri, "shortft-sweeps")
    experiment = tracking.client(uri).get_experiment_by_name("shortft-sweeps")
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_a_new_sweep_on_remote_storage_refuses_a_name_that_exists(tmp_path, capsys):
    """s3://, gs://, file://... are read through pyarrow: an existing sweep is found there too."""
    remote = f"file://{tmp_path}/bucket"
    (tmp_path / "bucket" / "taken").mkdir(parents=True)
    (tmp_path / "bucket" / "taken" / "tuner.pkl").write_bytes(b"state")
    code = sweep.main(["--name", "taken", "--storage-path", remote, "--no-mlflow", "--smoke-test"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and not ray.is_initialized()
    assert f"sweep 'taken' already exists under {remote}; pass --resume, or another --name" in err


def test_the_sd15_space_builds_its_trials_offline():
    """`--space sd15` (the README's cluster command): every corner of it is a valid sd15 config."""
    space = load_space("sd15")
    cfg = trial_config(space.base, space.fixed, space.points_to_evaluate[0], name="x")
    assert cfg.model.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5" and cfg.chain.segments == 4
    assert cfg.reward.weights == {"pickscore": 10.0, "hps_v2": 2.0, "aesthetic": 0.05}
    assert cfg.eval.objective == "hps_v2" and cfg.train.steps == 400
    for corner in (0, -1):
        trial_config(space.base, space.fixed, {k: d.corners()[corner] for k, d in space.search.items()})


# -- one-worker trials train in the Tune trial itself -------------------------------------------------
def test_a_one_worker_trial_asks_for_its_workers_resources_only_when_they_fit_now():
    from shortft.sweep.trials import TRIAL_CPUS, trial_resources

    def settings(workers=1, use_gpu=False):
        return {"workers": workers, "use_gpu": use_gpu, "gpus_per_worker": 0.5 if use_gpu else 1.0,
                "cpus_per_worker": None if use_gpu else 1.0}

    assert trial_resources(settings(), fits_now=True) == {"CPU": 1.0}
    assert trial_resources(settings(use_gpu=True), fits_now=True) == {"CPU": 1.0, "GPU": 0.5}
    # a Ray Train job: several workers, or one an autoscaler must first add a node for (it waits up to
    # --resource-wait-s, then the trial ends as ERROR; tests/test_resources.py)
    assert trial_resources(settings(workers=2), fits_now=True) == {"CPU": TRIAL_CPUS}
    assert trial_resources(settings(use_gpu=True), fits_now=False) == {"CPU": TRIAL_CPUS}


def _checkpoint(root: Path, step: int) -> Path:
    d = root / f"step_{step:06d}"
    d.mkdir(parents=True)
    (d / "state.json").write_text(f'{{"step": {step}}}')
    return d


@pytest.mark.parametrize("tune_step,local_step,expected", [(4, 6, "local"), (6, 4, "tune"), (4, None, "tune"),
                                                             (None, 2, "local"), (None, None, None)])
def test_a_restarted_trial_resumes_from_the_newer_of_tunes_checkpoint_and_its_own(tmp_path, monkeypatch, tune_step,
                                                                                   local_step, expected):
    """Tune holds the checkpoints of evaluation steps (persisted to the sweep's storage, found on any
    node); the run's folder holds every checkpoint the loop wrote on this node, those between
    evaluations too."""
    from ray import tune

    from shortft.sweep.in_trial import resume_point

    cfg = trial_config("toy", {"train.output_dir": str(tmp_path / "run")}, {})
    if local_step is not None:
        _checkpoint(cfg.output_dir / "checkpoints", local_step)
    reported = _checkpoint(tmp_path / "tune", tune_step) if tune_step is not None else None
    monkeypatch.setattr(tune, "get_checkpoint", lambda: reported and tune.Checkpoint.from_directory(str(reported)))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    got = resume_point(cfg, scratch)
    if expected is None:
        assert got is None
    else:
        # Tune's checkpoint is read where it is (local storage): the resume line names it, not a copy
        assert got == (reported if expected == "tune" else cfg.output_dir / "checkpoints" / f"step_{local_step:06d}")
        assert json.loads((got / "state.json").read_text())["step"] == (tune_step if expected == "tune" else local_step)


def test_a_checkpoint_on_remote_storage_is_copied_before_it_is_read(tmp_path):
    import pyarrow.fs
    from ray import tune

    from shortft.ray_reports import readable

    _checkpoint(tmp_path / "bucket", 4)
    remote = tune.Checkpoint("step_000004", pyarrow.fs.SubTreeFileSystem(str(tmp_path / "bucket"),
                                                                         pyarrow.fs.LocalFileSystem()))
    (tmp_path / "scratch").mkdir()
    got = readable(remote, tmp_path / "scratch")
    assert got == tmp_path / "scratch" and json.loads((got / "state.json").read_text())["step"] == 4


TRIAL_DIES = '''
import json
import math
import os
from ray import tune
from shortft import sweep
trainable = sweep.trainable_for("toy", smoke_test=True, fixed={"train.steps": 4, "train.checkpoint_every": 2,
                                                                "eval.every": 4})
analysis = tune.run(trainable, config={"chain.segments": 2}, num_samples=1, max_failures=1,
                    metric="eval/objective", mode="max", verbose=0)
(trial,) = analysis.trials
print("STATUS", trial.status, trial.last_result.get("step"), trial.num_failures)
'''


@pytest.mark.slow
def test_a_one_worker_trial_whose_process_dies_is_restarted_by_tune_from_its_checkpoint(tmp_path):
    """The trial trains in Tune's own trial process (no Ray Train job is made for it); killed as it
    starts step 3, Tune restarts it (max_failures=1) from its step-2 checkpoint, and MLflow has every
    step once."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(HOME=str(tmp_path), PYTHONUNBUFFERED="1", SHORTFT_FAIL_AT_STEP="3", SHORTFT_FAIL_RANK="0")
    p = subprocess.run([sys.executable, "-c", TRIAL_DIES], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert "STATUS TERMINATED 4 1" in out, out[-3000:]
    (marker,) = (tmp_path / "runs" / "sweeps").rglob(".fault-injected")
    assert marker.read_text() == "3"  # the trial's process did die there
    assert "at step 2" in out and "resumed from" in out, out[-3000:]
    assert not list((tmp_path / "ray_results").glob("from-python-*"))  # no Ray Train run was made
    c, parents, children = _runs(tmp_path / "mlflow.db")
    (run,) = parents + children
    assert run.info.status == "FINISHED"
    assert {"lora", "config.yaml"} <= {a.path for a in c.list_artifacts(run.info.run_id)}
    for key in ("loss", "grad_norm"):
        assert sorted(m.step for m in c.get_metric_history(run.info.run_id, key)) == [1, 2, 3, 4], key


RELATIVE_PROMPTS = '''
from ray import tune
from shortft import sweep
trainable = sweep.trainable_for("toy", smoke_test=True, tracking_uri=None, fixed={"data.prompts": "mine.txt"})
analysis = tune.run(trainable, config={"chain.segments": 2}, num_samples=1, verbose=0,
                    metric="eval/objective", mode="max", raise_on_failed_trial=False)
(trial,) = analysis.trials
print("STATUS", trial.status, trial.error_file and open(trial.error_file).read()[-300:])
'''


@pytest.mark.slow
def test_a_relative_prompt_file_reaches_the_trial_that_runs_in_its_own_folder(tmp_path):
    """The driver found `mine.txt` in its working directory; the trial, which Tune runs in its own
    folder, did not (`data.prompts='mine.txt': no such file`)."""
    from shortft.builtin import toy_dir

    (tmp_path / "mine.txt").write_text("".join((toy_dir() / "train_prompts.txt").read_text().splitlines(True)[:3]))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(HOME=str(tmp_path), PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, "-c", RELATIVE_PROMPTS], cwd=tmp_path, capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0 and "STATUS TERMINATED" in p.stdout, (p.stdout + p.stderr)[-3000:]
    (written,) = (tmp_path / "runs" / "sweeps").rglob("config.yaml")
    assert f"prompts: {tmp_path / 'mine.txt'}" in written.read_text()


TRIAL_DIVERGES = '''
from ray import tune
from shortft import sweep
trainable = sweep.trainable_for("toy", smoke_test=True, tracking_uri=None,
                                fixed={"train.steps": 4, "train.lr": 1e30, "train.max_bad_steps": 1})
analysis = tune.run(trainable, config={"chain.segments": 2}, num_samples=1, max_failures=1, verbose=0,
                    metric="eval/objective", mode="max", raise_on_failed_trial=False)
(trial,) = analysis.trials
print("STATUS", trial.status, trial.num_failures)
'''


@pytest.mark.slow
def test_tune_retries_a_trial_that_failed_for_good_without_training_it_again(tmp_path):
    """A trial stopped for non-finite steps was retried by Tune (max_failures=1): models loaded and steps
    trained again to the same stop. The retry now raises the recorded line at once; the run folder
    keeps it (failed.json)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(HOME=str(tmp_path), PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, "-c", TRIAL_DIVERGES], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=600)
    out = p.stdout + p.stderr
    line = "step 2 had a non-finite loss or gradient; lower train.lr (now 1e+30)"
    assert p.returncode == 0 and "STATUS ERROR 2" in out, out[-3000:]
    assert f"shortft: not retried (a retry of the same config fails the same way; a resume tries again): {line}" in out
    assert out.count("Trial task failed") == 2, out[-3000:]
    (record,) = (tmp_path / "runs" / "sweeps").rglob("failed.json")
    assert json.loads(record.read_text())["line"] == line


def test_a_trials_last_report_waits_for_the_end_and_a_trial_resumed_at_its_end_still_reports(tmp_path, monkeypatch):
    """Tune may stop a trial at any report (ASHA stops every trial reaching max_t), killing its process:
    the last step is reported only after the run ended (LoRA saved, MLflow told). A trial whose process
    died after its last checkpoint resumes with no step left and reports that step from metrics.jsonl;
    restarted on another node (no metrics.jsonl there) from the checkpoint Tune got with that report, it
    sends the result that checkpoint carries."""
    from types import SimpleNamespace

    from ray import tune

    from shortft.sweep.in_trial import TuneReport

    reports = []
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node"))
    monkeypatch.setattr(tune, "report", lambda metrics, checkpoint=None: reports.append(metrics))
    train = trial_config("toy", {"train.steps": 4}, {}).train
    rows = [{"step": s, "seconds_per_step": float(s), "peak_memory_mb": 10.0, "train_seconds": s * (s + 1) / 2,
             "calls_total": 10 * s, **({"eval/objective": 0.1 * s} if s % 2 == 0 else {})} for s in range(1, 5)]
    last_checkpoint = _checkpoint(tmp_path / "run" / "checkpoints", 4)
    cb = TuneReport(train, tmp_path / "metrics.jsonl")
    cb.on_start(None, 0)
    for row in rows:
        cb.on_step(row["step"], row, {"checkpoint": last_checkpoint} if row["step"] == 4 else {})
    assert [r["step"] for r in reports] == [2]  # step 4 ends the run: not yet
    cb.on_end(None)
    assert [r["step"] for r in reports] == [2, 4] and reports[-1]["mean_seconds_per_step"] == 2.5
    sent = reports[-1]

    reports.clear()
    elsewhere = TuneReport(train, tmp_path / "other-node" / "metrics.jsonl", resumed_from=last_checkpoint)
    elsewhere.on_start(None, 4)
    elsewhere.on_end(None)
    assert reports == [sent]

    reports.clear()
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    resumed = TuneReport(train, tmp_path / "metrics.jsonl")
    resumed.on_start(None, 4)  # the loop runs no step: the checkpoint was the last one
    resumed.on_end(None)
    assert [r["step"] for r in reports] == [4] and reports[0]["eval/objective"] == pytest.approx(0.4)
    assert reports[0]["mean_seconds_per_step"] == 2.5 and reports[0]["node_id"] == "node"


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after the point it is raised at runs, no `except Exception` catches it."""


def test_a_trial_killed_while_evaluating_its_last_step_reports_that_step_when_resumed(tmp_path, monkeypatch):
    """The smoke sweep's trials checkpoint only their last step and evaluate it. A driver killed during
    that evaluation (seen in CI: `test_resume_after_the_driver_is_killed_in_the_second_trial`) left the
    last checkpoint without the row of its step; the resumed trial had no step left to run and nothing
    with the objective to send, so it returned without a report and Tune failed the sweep ('did not
    include the specified metric(s) eval/objective'). The row is written before the checkpoint: a trial
    with the last checkpoint also has its evaluated row, and one killed before that redoes the step."""
    from types import SimpleNamespace

    from ray import tune

    import shortft.loop
    from shortft.sweep.in_trial import TuneReport

    reports = []
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node"))
    monkeypatch.setattr(tune, "report", lambda metrics, checkpoint=None: reports.append(metrics))
    cfg = trial_config("toy", {**sweep.SMOKE_TEST, "train.output_dir": str(tmp_path / "run")}, {})
    metrics_file = cfg.output_dir / "metrics.jsonl"
    real_evaluate = shortft.loop.evaluate

    def killed(*args, **kwargs):
        raise _Killed

    monkeypatch.setattr(shortft.loop, "evaluate", killed)
    with pytest.raises(_Killed):
        shortft.loop.train(cfg, [TuneReport(cfg.train, metrics_file)])
    assert reports == []
    monkeypatch.setattr(shortft.loop, "evaluate", real_evaluate)
    shortft.loop.train(cfg, [TuneReport(cfg.train, metrics_file)], resume=True)
    assert [r["step"] for r in reports] == [2] and "eval/objective" in reports[0]


def test_steps_written_but_not_logged_before_a_crash_are_logged_on_resume(tmp_path):
    """The loop writes a step to metrics.jsonl, then calls the MLflow logger: a process that dies between
    the two, just after a checkpoint, resumes after that step; the logger logs it from the file."""
    from mlflow.entities import Metric

    uri = f"sqlite:///{tmp_path}/m.db"
    run_id = tracking.ensure_run(uri, "x", "run", "run")
    client = tracking.client(uri)
    client.log_batch(run_id, metrics=[Metric("loss", -0.1 * s, 0, s) for s in (1, 2)])
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": -0.1 * s}) + "\n"
                                                    for s in range(1, 5)))
    logger = MlflowLogger(uri, run_id, metrics_file=tmp_path / "metrics.jsonl")
    logger.on_start(None, 3)  # resumed from the step-3 checkpoint: step 3 was never logged, 4 will run again
    logger.on_step(4, {"step": 4, "loss": -0.4}, {})
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2, 3, 4]


def test_each_evaluation_logs_the_best_so_far_beside_it_a_resumed_runs_earlier_ones_too(tmp_path):
    """MLflow's runs table shows a metric's last value: trials ranked by their best evaluation (the sweep's
    table) showed there by their last."""
    uri = f"sqlite:///{tmp_path}/m.db"
    run_id = tracking.ensure_run(uri, "x", "run", "run")
    rows = [{"step": 1, "loss": 0.1}, {"step": 2, "loss": 0.2, "eval/objective": 0.9}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    logger = MlflowLogger(uri, run_id, metrics_file=tmp_path / "metrics.jsonl")
    logger.on_start(None, 2)  # resumed at step 2: its 0.9 is the best so far
    for step, objective in ((3, 0.7), (4, float("nan")), (5, 0.95)):
        logger.on_step(step, {"step": step, "loss": 0.1, "eval/objective": objective}, {})
    history = tracking.client(uri).get_metric_history(run_id, "eval/objective_best")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(2, 0.9), (3, 0.9), (5, 0.95)]


@pytest.mark.slow
def test_a_two_worker_trial_is_a_ray_train_job_that_reports_to_tune(tmp_path):
    """Trials of several workers (and ones waiting for an autoscaler) still fit a Ray Train job: its
    evaluations reach Tune, its last report waits for the LoRA and MLflow, its checkpoints go to Ray
    Train's run under the storage path."""
    import pyarrow.parquet as pq

    work = _script(tmp_path)
    proc = _run_script(work, "--name", "two", "--workers-per-trial", "2", samples=1)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    (row,) = pq.read_table(work / "runs" / "sweeps" / "two" / "results.parquet").to_pylist()
    assert row["status"] == "DONE" and row["steps"] == 2 and row["objective_best"] is not None
    assert list((work / "ray_results" / "two-t001").glob("checkpoint*")) or list(
        (work / "ray_results" / "two-t001").rglob("step_000002")), "no Ray Train checkpoint"
    c, parents, (child,) = _runs(work / "mlflow.db")
    assert {"lora", "config.yaml"} <= {a.path for a in c.list_artifacts(child.info.run_id)}
    assert sorted(m.step for m in c.get_metric_history(child.info.run_id, "loss")) == [1, 2]
    # the sweep's best LoRAs come from Ray Train's checkpoint of the best step; the run folder's are gone
    best = json.loads((work / "runs" / "sweeps" / "two" / "best" / "best.json").read_text())
    assert best["step"] == 2 and best["from"].startswith(str(work / "ray_results" / "two-t001")), best
    assert not (work / "runs" / "sweeps" / "two" / "two-t001" / "checkpoints").exists()


def _scored_trial(config):
    """Four evaluations whose objectives peak at steps 2 and 3 (a tie), then a stop between evaluations (step 5:
    a checkpoint without an objective), each checkpoint handed to Tune as a one-worker trial hands it."""
    import tempfile as tf

    from shortft.sweep.in_trial import TuneReport

    report = TuneReport.__new__(TuneReport)  # only its hand-over to Tune
    report.node_id, report.seconds, report.steps, report.peak = "node", 1.0, 1, 0.0
    for step, objective in [(1, 0.5), (2, 0.9), (3, 0.9), (4, 0.6), (5, None)]:
        ckpt = Path(tf.mkdtemp()) / f"step_{step:06d}"
        (ckpt / "lora").mkdir(parents=True)
        (ckpt / "lora" / "which.txt").write_text(str(step))
        report.pending = (step, {"step": step, **({"eval/objective": objective} if objective is not None else {})},
                          ckpt)
        report._report()


def test_tune_keeps_a_trials_best_evaluated_checkpoint_and_the_sweep_takes_its_loras_from_there(tmp_path,
                                                                                                monkeypatch):
    """The table ranks a trial by its best evaluation, but only its final LoRAs were kept (Tune kept its
    latest checkpoints): the model the sweep named best was not the model that scored. Tune now keeps the
    best-scored checkpoint and the latest (a stop's checkpoint, with no evaluation, is scored lowest, not
    filed as the best), and `best.export` copies the best one's LoRAs with the trial's config."""
    from ray import tune

    from shortft.ray_reports import BEST_AND_LATEST
    from shortft.sweep import best as best_lora
    from shortft.sweep import results

    ray.init(num_cpus=1, include_dashboard=False, logging_config=ray.LoggingConfig(log_level="ERROR"))
    try:
        grid = tune.Tuner(_scored_trial, run_config=tune.RunConfig(
            name="scored", storage_path=str(tmp_path / "storage"), verbose=0,
            checkpoint_config=tune.CheckpointConfig(**BEST_AND_LATEST))).fit()
    finally:
        ray.shutdown()
    (result,) = grid
    assert [m["step"] for _, m in result.best_checkpoints] == [3]  # of a tie, the later
    assert (Path(result.checkpoint.path) / "lora" / "which.txt").read_text() == "5"  # the latest, to resume from
    on_disk = sorted((p / "lora" / "which.txt").read_text() for p in Path(result.path).glob("checkpoint_*"))
    assert on_disk == ["3", "5"], on_disk  # no more
    monkeypatch.setattr(results, "stopped_early", lambda config, sweep, last: False)
    [row] = results.results_table([result], load_space(_space_file(tmp_path, "  lora.rank: {randint: [4, 8]}")), {})
    assert row["step_best"] == 3 and row["objective_best"] == 0.9  # the table names the evaluation Tune kept
    lora, source = best_lora.export(result, row, {"name": "x"}, tmp_path / "no-run-folder", tmp_path / "out")
    assert lora == tmp_path / "out" / "best" / "lora" and (lora / "which.txt").read_text() == "3"
    info = json.loads((lora.parent / "best.json").read_text())
    assert info["step"] == 3 and info["objective"] == 0.9 and info["from"] == source
    assert (lora.parent / "config.yaml").read_text() == "name: x\n"
    # a best step whose checkpoint is gone: the final LoRAs only where the best was the last step
    row.update(step_best=2)  # and the folder a resumed sweep's earlier end wrote goes: it is not this model
    assert best_lora.export(result, row, {}, tmp_path / "no-run-folder", tmp_path / "out") == (None, (
        f"the LoRAs of {row['trial']}'s best evaluation (step 2) were not kept: no checkpoint was written at that step "
        "(train.checkpoint_every) or it was removed since"))
    assert not (tmp_path / "out" / "best").exists()
    final = tmp_path / "run" / "lora"
    final.mkdir(parents=True)
    (final / "which.txt").write_text("final")
    row.update(step_best=5, steps=5)
    lora, source = best_lora.export(result, row, {}, tmp_path / "run", tmp_path / "out3")
    assert (lora / "which.txt").read_text() == "final" and source == str(final)


def _rung_trial(config):
    """Evaluations at steps 2 and 4 (or 2 alone: `last`), scored by the trial's `score`."""
    from ray import tune

    for step in range(2, config["last"] + 1, 2):
        tune.report({"step": step, sweep.OBJECTIVE: config["score"] * step})


def test_a_resumed_sweeps_asha_rungs_hold_the_earlier_trials_results(tmp_path):
    """Tune saves no scheduler state: after `--resume` ASHA's rungs were empty, so the first trial to reach a
    rung went on whatever it scored and later cut-offs weighed only the trials run since. The restored
    Tuner's results are replayed into them, as Tune gave them (with the last result again for a trial that
    ended, which fills the rung at step 1 its evaluations skip): the same values as the driver that ran
    the trials held."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from shortft.sweep.ray_compat import restore_rungs
    from shortft.sweep.search import TIME_ATTR

    def rungs(scheduler):
        return {milestone: sorted(recorded.values()) for milestone, recorded in scheduler._brackets[0]._rungs}

    ray.init(num_cpus=1, include_dashboard=False, logging_config=ray.LoggingConfig(log_level="ERROR"))
    try:
        def asha():
            return ASHAScheduler(time_attr=TIME_ATTR, metric=sweep.OBJECTIVE, mode="max", max_t=4, grace_period=1,
                                 reduction_factor=2)

        tune.Tuner(_rung_trial, tune_config=tune.TuneConfig(scheduler=asha()),
                   run_config=tune.RunConfig(name="unrun", storage_path=str(tmp_path), verbose=0))
        unrun = tune.Tuner.restore(str(tmp_path / "unrun"), trainable=_rung_trial)  # Ctrl-C before any trial
        assert restore_rungs(unrun, TIME_ATTR, sweep.OBJECTIVE, lambda result: True) == 0

        asha = asha()
        trials = [{"score": score, "last": last} for score, last in ((0.3, 4), (0.9, 4), (0.1, 4), (0.5, 2))]
        tune.Tuner(_rung_trial, param_space=tune.grid_search(trials), tune_config=tune.TuneConfig(scheduler=asha),
                   run_config=tune.RunConfig(name="rungs", storage_path=str(tmp_path), verbose=0)).fit()
        ran = rungs(asha)  # 0.1 stopped at step 2; 0.5 ended there itself
        assert ran == {4: [1.2, 3.6], 2: [0.2, 0.6, 1.0, 1.8], 1: [0.2, 1.0]}, ran
        restored = tune.Tuner.restore(str(tmp_path / "rungs"), trainable=_rung_trial, resume_unfinished=True)
        scheduler = restored._local_tuner._tune_config.scheduler
        assert all(not recorded for _, recorded in scheduler._brackets[0]._rungs)  # what Tune gives back
        assert restore_rungs(restored, TIME_ATTR, sweep.OBJECTIVE,
                             lambda result: result.metrics["step"] == result.config["last"]) == 4
        assert rungs(scheduler) == ran
    finally:
        ray.shutdown()


def test_an_ended_trials_checkpoints_are_removed_on_its_node_once_its_process_lets_go(tmp_path, capsys):
    """Each trial's run folder kept its resume checkpoints after it ended (1.14 GiB each at the sd15
    config's rank), on the node it ran on, where the driver cannot reach. A Ray task on that node removes
    them once the trial's process has let go of the folder's run lock; a node that is gone is one line."""
    from types import SimpleNamespace

    from shortft.sweep.prune import Pruner

    def trial(key, node):
        return SimpleNamespace(last_result={"node_id": node} if node else {}, config={sweep.TRIAL_KEY: key},
                               trial_id=key)

    for key in ("t001", "t002", "t003"):
        _checkpoint(tmp_path / f"s-{key}" / "checkpoints", 2)
        (tmp_path / f"s-{key}" / "lora").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom shortft import run_lock\n"
                               f"with run_lock.held({str(tmp_path / 's-t001')!r}):\n"
                               "    print('held', flush=True); time.sleep(10)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"  # the trial's process, still saving as Tune stops it
    ray.init(num_cpus=1, include_dashboard=False, logging_config=ray.LoggingConfig(log_level="ERROR"))
    try:
        pruner = Pruner({"output_root": str(tmp_path), "name": "s"})
        here = ray.get_runtime_context().get_node_id()
        for t in (trial("t001", here), trial("t002", "ab" * 28), trial("t003", None)):
            pruner.on_trial_complete(0, [], t)
        pruner.on_experiment_end([])
    finally:
        ray.shutdown()
    assert holder.poll() == 0  # removed only after the holder had let go
    assert not (tmp_path / "s-t001" / "checkpoints").exists() and (tmp_path / "s-t001" / "lora").is_dir()
    assert (tmp_path / "s-t002" / "checkpoints").is_dir() and (tmp_path / "s-t003" / "checkpoints").is_dir()
    out, err = capsys.readouterr()
    assert f"sweep: not removed (its node has left the cluster): {tmp_path / 's-t002' / 'checkpoints'} (node " \
           "abababab)" in err, err
    assert "sweep: the checkpoints of 1 ended trial(s) removed from their run folders (0.0 MiB; " in out, out


def _ended(key: str, node: str | None, status: str = "TERMINATED"):
    from types import SimpleNamespace

    return SimpleNamespace(last_result={"node_id": node} if node else {}, config={sweep.TRIAL_KEY: key}, trial_id=key,
                           status=status, TERMINATED="TERMINATED")


def test_removals_a_killed_driver_owed_are_made_on_resume_on_every_node_the_trial_ran_on(tmp_path, capsys):
    """A killed driver's removals were lost (its tasks die with it, and `--resume` made none), and a trial
    Tune restarted on another node left its first node's folder full. The nodes a trial reported from and
    the removals settled are the Pruner's Tune callback state; `Tuner.restore` unpickles the Pruner the
    sweep started with, and its first step removes what ended trials still owe. A finished sweep resumed
    on a local Ray started again said "not removed (its node has left the cluster)" of a folder removed
    at its end (its state is saved before the end's removals; the node id is new)."""
    import pickle

    from shortft.sweep.prune import Pruner

    for key in ("t001", "t002", "t003"):
        _checkpoint(tmp_path / f"s-{key}" / "checkpoints", 2)
    gone = "cd" * 28
    ray.init(num_cpus=1, include_dashboard=False, logging_config=ray.LoggingConfig(log_level="ERROR"))
    try:
        here = ray.get_runtime_context().get_node_id()
        first = Pruner({"output_root": str(tmp_path), "name": "s"})
        first.on_trial_result(0, [], _ended("t001", None), {"node_id": here})
        first.on_trial_result(0, [], _ended("t002", None), {"node_id": gone})  # restarted since, here
        first.on_trial_result(0, [], _ended("t003", None), {"node_id": here})
        saved = first.get_state()  # the driver is killed as t001 and t002 end: no removal was made

        second = pickle.loads(pickle.dumps(first))  # what `Tuner.restore` brings back
        second.set_state(saved)
        second.on_step_begin(0, [_ended("t001", here), _ended("t002", here), _ended("t003", here, "ERROR")])
        second.on_experiment_end([])
        assert not (tmp_path / "s-t001" / "checkpoints").exists() and not (tmp_path / "s-t002" / "checkpoints").exists()
        assert (tmp_path / "s-t003" / "checkpoints").is_dir()  # failed: `--resume` runs it again from there
        out, err = capsys.readouterr()
        assert "sweep: the checkpoints of 2 ended trial(s) removed from their run folders" in out, out
        # t002's first node is gone: owed from before the resume, its folder is looked for here (a local Ray
        # started again is this machine under a new node id), and one removed already is no news
        assert "not removed" not in err, err

        # settled (removed, or on a node that is gone) is not tried again by a later resume
        third = pickle.loads(pickle.dumps(second))
        third.set_state(second.get_state())
        third.on_step_begin(0, [_ended("t001", here), _ended("t002", here)])
        assert not third.pending
        # a Pruner pickled by an earlier version (its fields: the settings and what was pending)
        old = Pruner.__new__(Pruner)
        old.__setstate__({"sweep": {"output_root": str(tmp_path), "name": "s"}, "pending": {}})
        _checkpoint(tmp_path / "s-t001" / "checkpoints", 4)
        old.on_experiment_end([_ended("t001", here)])  # a sweep without the state: its ended trials, from their last node
        assert not (tmp_path / "s-t001" / "checkpoints").exists()
    finally:
        ray.shutdown()


def test_tune_restore_brings_the_pruner_back_with_its_state(tmp_path):
    """The mechanism the removals on resume rest on, with Ray's own Tuner: the callback state is saved
    with the experiment and handed to the unpickled Pruner, and an ended trial's owed removal is made
    even when no step runs (every trial had ended)."""
    from ray import tune

    from shortft.sweep.prune import Pruner

    out = tmp_path / "out"

    def fn(config):
        (out / f"s-{config[sweep.TRIAL_KEY]}" / "checkpoints" / "step_000001").mkdir(parents=True, exist_ok=True)
        tune.report({"node_id": ray.get_runtime_context().get_node_id()})

    ray.init(num_cpus=1, include_dashboard=False, logging_config=ray.LoggingConfig(log_level="ERROR"))
    try:
        tune.Tuner(fn, param_space={sweep.TRIAL_KEY: tune.grid_search(["t001"])},
                   run_config=tune.RunConfig(name="s", storage_path=str(tmp_path / "ray"), verbose=0,
                                             callbacks=[Pruner({"output_root": str(out), "name": "s"})])).fit()
        assert not (out / "s-t001" / "checkpoints").exists()
        _checkpoint(out / "s-t001" / "checkpoints", 2)  # as if the driver had died before the removal
        states = list((tmp_path / "ray" / "s").glob("callback-states-*"))
        assert states, list((tmp_path / "ray" / "s").iterdir())
        for state in states:  # the removal unsettled in the saved state
            state.unlink()
        tune.Tuner.restore(str(tmp_path / "ray" / "s"), trainable=fn, resume_unfinished=True).fit()
        assert not (out / "s-t001" / "checkpoints").exists()
    finally:
        ray.shutdown()


def test_resume_without_a_name_finds_the_latest_sweep_under_a_uri_storage_path_too(tmp_path):
    """`--resume` without `--name` (documented: the latest) looked for sweeps in local folders only: on the
    s3:// storage every cluster file uses it said "no sweep under s3://...", and listed none."""
    import time

    from shortft.sweep.runner import sweeps_in

    for name in ("older", "newer"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "tuner.pkl").write_bytes(b"")
        time.sleep(0.05)
    (tmp_path / "not-a-sweep").mkdir()
    assert sweeps_in(tmp_path.as_uri()) == sweeps_in(str(tmp_path)) == ["older", "newer"]  # the same pyarrow path as s3://
    assert sweeps_in((tmp_path / "none").as_uri()) == []


def test_a_trial_asha_stopped_is_pruned_in_optuna_at_its_last_evaluation_not_complete():
    """Tune hands the searcher an ASHA-stopped trial's last result as a finished trial's: Optuna had its
    30-step score COMPLETE beside the 60-step ones, TPE ranked them alike, and the stopping result never
    reached `on_trial_result`, so the study had no intermediate value of it either."""
    import optuna

    from shortft.sweep.search import searcher
    from shortft.sweep.trials import OBJECTIVE, param_space

    space = load_space("toy")
    settings = {"base": space.base, "fixed": space.fixed, "tracking_uri": None, "name": "s"}
    search = searcher(space, settings, max_concurrent=2)
    search.set_search_properties(OBJECTIVE, "max", param_space(space))
    steps = trial_config(space.base, space.fixed, {}).train.steps
    for trial_id, step, value in (("a", steps // 2, 0.88), ("b", steps, 0.91)):
        search.suggest(trial_id)
        result = {OBJECTIVE: value, "step": step, "training_iteration": 1, "train_seconds": 1.0, "calls_total": 10}
        search.on_trial_complete(trial_id, result)  # as Tune does when ASHA stops a trial at `step`
    stopped, finished = search.searcher._ot_study.trials[:2]  # (the space's third point to evaluate waits)
    assert stopped.state == optuna.trial.TrialState.PRUNED and stopped.intermediate_values == {1: 0.88}
    assert finished.state == optuna.trial.TrialState.COMPLETE and finished.value == 0.91


def test_a_trial_that_ran_to_its_end_is_told_to_optuna_with_its_best_evaluation(tmp_path):
    """The table ranks a trial by its best evaluation and the sweep keeps that evaluation's LoRAs, but Tune
    tells Optuna the last result: TPE and the parent run's plots ranked the trials otherwise."""
    import optuna
    from ray.tune.search import SearchGenerator

    from shortft.sweep.search import searcher
    from shortft.sweep.trials import OBJECTIVE, param_space

    space = load_space("toy")
    settings = {"base": space.base, "fixed": space.fixed, "tracking_uri": None, "name": "s"}
    search = searcher(space, settings, max_concurrent=2)
    search.set_search_properties(OBJECTIVE, "max", param_space(space))
    steps = trial_config(space.base, space.fixed, {}).train.steps
    search.suggest("a"), search.suggest("b")
    for i, (step, value) in enumerate(((steps // 3, 0.6), (2 * steps // 3, 0.95), (2 * steps // 3, float("nan")))):
        search.on_trial_result("a", {OBJECTIVE: value, "step": step, "training_iteration": i + 1})
    SearchGenerator(search).save_to_dir(str(tmp_path), "s")  # a driver that resumes keeps what it had seen
    generator = SearchGenerator(searcher(space, settings, max_concurrent=2))
    generator.restore_from_dir(str(tmp_path))
    resumed = generator.searcher
    done = {"step": steps, "training_iteration": 3, "train_seconds": 1.0, "calls_total": 10}
    resumed.on_trial_complete("a", {**done, OBJECTIVE: 0.7})  # its last evaluation fell back
    resumed.on_trial_complete("b", {**done, OBJECTIVE: float("nan")})  # no finite evaluation: as Tune gives it
    a, b = resumed.searcher._ot_study.trials[:2]
    assert a.state == optuna.trial.TrialState.COMPLETE and a.value == 0.95
    assert b.state == optuna.trial.TrialState.FAIL and resumed.best == {}


def test_values_valid_alone_but_not_together_end_their_trial_not_the_sweep(tmp_path):
    """A space checks every two searched keys at their ends, but a searcher can still draw values that no
    run takes together (a Tuner's own space, a limit no end shows): the driver made the trial's MLflow run
    from its config, whose ConfigError stopped the whole sweep partway."""
    from ray import tune as ray_tune

    from shortft.sweep.search import searcher
    from shortft.sweep.trials import OBJECTIVE, RUN_ID_KEY, combination_error

    space = load_space(_space_file(tmp_path, "  chain.segments: {choice: [8]}"))
    settings = {"base": space.base, "fixed": space.fixed, "tracking_uri": "sqlite:///unused.db", "name": "s",
                "experiment": "e", "parent_run_id": None}
    search = searcher(space, settings)
    search.set_search_properties(OBJECTIVE, "max", {"chain.steps": ray_tune.choice([6]),
                                                    "chain.segments": ray_tune.choice([8])})
    config = search.suggest("a")  # no run made for it (its trial fails as it starts, with the line)
    assert RUN_ID_KEY not in config and "chain.segments=8: must be <= chain.steps=6" in combination_error(config, settings)
    assert combination_error({"chain.steps": 50, "chain.segments": 8}, settings) is None
    # chain.steps=3 alone fails on the base's 4 segments, with another line: still only this trial's
    assert "chain.segments=8: must be <= chain.steps=3" in combination_error({"chain.steps": 3, "chain.segments": 8},
                                                                              settings)
    with pytest.raises(ConfigError, match="lora.rank"):  # a value no run takes: its own line, as before
        combination_error({"chain.steps": 6, "chain.segments": 8, "lora.rank": -3}, settings)


def test_an_errored_trial_that_a_resume_runs_again_is_told_to_optuna_with_its_result(tmp_path):
    """A trial that failed (out of memory, say) is FAIL in Optuna's study. `--resume` runs it again, but its
    result never reached the study: the concurrency limiter had let it go at its error, and TPE, its plots
    and its parameter importances went on without it."""
    import optuna
    from ray.tune.search import SearchGenerator

    from shortft.sweep.search import searcher
    from shortft.sweep.trials import OBJECTIVE, param_space

    space = load_space("toy")
    settings = {"base": space.base, "fixed": space.fixed, "tracking_uri": None, "name": "s"}
    search = searcher(space, settings, max_concurrent=2)
    search.set_search_properties(OBJECTIVE, "max", param_space(space))
    steps = trial_config(space.base, space.fixed, {}).train.steps
    done = {OBJECTIVE: 0.91, "step": steps, "training_iteration": 2, "train_seconds": 1.0, "calls_total": 10}
    search.suggest("a"), search.suggest("b")
    search.on_trial_complete("a", error=True)
    search.on_trial_complete("b", done)
    SearchGenerator(search).save_to_dir(str(tmp_path), "s")  # as Tune keeps it, and a resumed driver reads it
    generator = SearchGenerator(searcher(space, settings, max_concurrent=2))
    generator.restore_from_dir(str(tmp_path))
    resumed = generator.searcher
    resumed.on_trial_complete("a", {**done, OBJECTIVE: 0.93})  # the rerun ends
    resumed.on_trial_complete("a", {**done, OBJECTIVE: 0.93})  # told once
    study = resumed.searcher._ot_study
    failed, finished = study.trials[:2]  # (the space's third point to evaluate waits)
    (rerun,) = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.number != finished.number]
    assert failed.state == optuna.trial.TrialState.FAIL and finished.value == 0.91
    assert rerun.value == 0.93 and rerun.params == failed.params and rerun.user_attrs == {"rerun_of": failed.number}
    resumed.suggest("c")  # and the study goes on
    resumed.on_trial_complete("c", {**done, OBJECTIVE: 0.5, "step": steps // 2})  # an ASHA stop: pruned
    assert study.trials[resumed.searcher._ot_trials["c"].number].state == optuna.trial.TrialState.PRUNED


def test_asha_runs_the_longest_trial_a_space_gives_to_its_end_and_judges_at_the_first_evaluation(tmp_path):
    """max_t and the grace period came from the first value of each range: with `train.steps: {choice: [60,
    120]}` ASHA stopped every 120-step trial at step 60 (STOPPED_EARLY, no final LoRAs)."""
    from shortft.sweep.search import scheduler

    space = load_space(_space_file(tmp_path, "  train.steps: {choice: [60, 120]}\n  eval.every: {choice: [20, 10]}"))
    asha = scheduler(space)
    assert (asha._max_t, asha._brackets[0]._rungs[-1][0]) == (120, 10)


def test_a_new_sweep_of_a_name_used_before_in_the_store_has_trial_runs_of_its_own(tmp_path):
    """Trial runs were found by their name alone (`<sweep>-t001`): a new sweep of an earlier sweep's name
    (another storage path, or its folder removed) took over that sweep's finished trial runs, logging a
    second set of metrics into them, or deleted them where its values differed."""
    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = trial_config("toy", {}, {})
    first, second = (tracking.ensure_run(uri, "e", "sweep/s", "s", reuse=False) for _ in range(2))
    old = tracking.ensure_trial_run(uri, "e", "s-t001", cfg, first)
    new = tracking.ensure_trial_run(uri, "e", "s-t001", cfg, second)
    assert new != old and tracking.client(uri).get_run(old).info.lifecycle_stage == "active"
    assert tracking.ensure_trial_run(uri, "e", "s-t001", cfg, second) == new  # a resume finds its own


def test_trial_runs_end_closed_with_their_status_and_line_even_when_the_sweep_is_interrupted(tmp_path):
    """A Ctrl-C'd sweep left its running and pending trials' runs RUNNING for ever (Tune stops them without a
    per-trial callback); a failed trial's run had no reason on it (only a --resource-wait-s wait set one,
    under another tag than `shortft train`'s), and a trial that failed, was resumed and then finished kept
    the old line."""
    from types import SimpleNamespace

    from shortft.run_status import ERROR_TAG
    from shortft.sweep.trial_runs import RunCloser
    from shortft.sweep.trials import RUN_ID_KEY

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = tracking.ensure_run(uri, "x", "sweep/s", "s")
    ids = {k: tracking.ensure_run(uri, "x", f"{parent}/{k}", k, parent_run_id=parent) for k in "abcd"}
    tracking.set_tag(uri, ids["a"], ERROR_TAG, "an earlier attempt's line")
    oom = RuntimeError("Traceback ...\nshortft.memory.OutOfGPUMemory: out of GPU memory in a step: lower train.batch_size")

    def trial(key):
        return SimpleNamespace(config={RUN_ID_KEY: ids[key]}, last_result={}, get_error=lambda: oom, trial_id=key)

    closer = RunCloser(uri, parent_run_id=parent)
    closer.on_trial_complete(0, [], trial("a"))
    closer.on_trial_error(0, [], trial("b"))
    closer.on_experiment_end(trials=[trial(k) for k in "abc"])  # d: another sweep's trial, not this one's
    runs = {k: tracking.client(uri).get_run(v) for k, v in ids.items()}
    assert {k: r.info.status for k, r in runs.items()} == {"a": "FINISHED", "b": "FAILED", "c": "KILLED", "d": "RUNNING"}
    assert ERROR_TAG not in runs["a"].data.tags
    assert runs["b"].data.tags[ERROR_TAG] == "out of GPU memory in a step: lower train.batch_size"
    assert runs["c"].data.tags["shortft.trial_status"] == "interrupted"


def test_runs_that_plain_tune_run_trials_made_are_closed_too(tmp_path):
    """The README's tune.run with `callbacks=[sweep.RunCloser(uri)]`: a trial that failed left its run RUNNING
    (RunCloser knew only the runs a sweep's searcher had made, whose ids are in the trial's config). The
    trial's run is tagged with Tune's experiment folder and trial id; an equal trial id of another
    experiment is left alone."""
    from types import SimpleNamespace

    from shortft import load_config
    from shortft.run_status import ERROR_TAG
    from shortft.sweep.trial_runs import RunCloser

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config("tiny")
    made = {key: tracking.ensure_trial_run(uri, "e", f"from-python-{key}", cfg, None, (exp, key.split("/")[0]))
            for key, exp in (("a", "run_trial_1"), ("b", "run_trial_1"), ("c", "run_trial_1"), ("a/other", "run_trial_0"))}
    killed = RuntimeError("ray.exceptions.ActorDiedError: The actor died unexpectedly")

    def trial(key):
        return SimpleNamespace(config={"chain.segments": 2}, last_result={}, get_error=lambda: killed, trial_id=key,
                               experiment_dir_name="run_trial_1")

    closer = RunCloser(uri)
    closer.on_trial_error(0, [], trial("a"))
    closer.on_trial_complete(0, [], trial("b"))
    closer.on_experiment_end(trials=[trial(k) for k in "abc"])
    runs = {k: tracking.client(uri).get_run(v) for k, v in made.items()}
    assert {k: r.info.status for k, r in runs.items()} == {"a": "FAILED", "b": "FINISHED", "c": "KILLED",
                                                           "a/other": "RUNNING"}
    assert runs["a"].data.tags[ERROR_TAG] == "ray.exceptions.ActorDiedError: The actor died unexpectedly"
    assert runs["c"].data.tags["shortft.trial_status"] == "interrupted"
    closer.on_trial_error(0, [], SimpleNamespace(config={}, trial_id="d", experiment_dir_name="run_trial_1",
                                                 get_error=lambda: killed))  # failed before it made a run


def test_a_sweep_that_raises_leaves_its_parent_run_failed_with_its_line(tmp_path, monkeypatch):
    """An error in Tune, in MLflow or in the results (or a second Ctrl-C) left the parent run RUNNING for ever."""
    import ray
    from ray import tune

    def fit(self):
        raise RuntimeError("the store went away")

    monkeypatch.setattr(tune.Tuner, "fit", fit)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    try:
        with pytest.raises(RuntimeError, match="the store went away"):
            sweep.run_sweep("toy", 1, name="s", storage_path=str(tmp_path / "ray"), tracking_uri=uri, smoke_test=True,
                            output_root=str(tmp_path / "runs"), baseline=False)
    finally:
        ray.shutdown()
    (parent,) = tracking.client(uri).search_runs([tracking.experiment_id(uri, sweep.EXPERIMENT)])
    assert parent.info.status == "FAILED" and parent.data.tags["shortft.error"] == "the store went away"


def test_a_resumed_sweeps_parent_run_holds_only_its_new_best_loras_and_every_drivers_seconds(tmp_path, monkeypatch):
    """A resumed sweep's sweep_seconds were its last driver's: tune/overhead.py set them against every
    driver's training steps. And MLflow's log_artifacts adds and overwrites, never removes: a sweep resumed
    to a new best trial left the earlier best's LoRA files in the parent run's best/ (all of them when the
    new best had none kept, its extra segments when it had fewer), under the new best_trial tag."""
    from shortft.sweep.results import finish_parent, write_table

    uri = f"sqlite:///{tmp_path}/m.db"
    parent = tracking.ensure_run(uri, "x", "sweep", "sweep")
    table = write_table([{"trial": "t000", "objective_best": 0.5}], tmp_path / "results.parquet")

    def end(trial: str, segments: int | None) -> list[str]:
        best = {"trial": trial, "objective": 0.5, "config": {"name": trial}, "lora_dir": None,
                "lora_from": f"the LoRAs of {trial}'s best evaluation were not kept", "mlflow_run_id": f"id-{trial}"}
        if segments:
            folder = tmp_path / trial / "best"
            (folder / "lora").mkdir(parents=True)
            for j in range(1, segments + 1):
                (folder / "lora" / f"segment_{j}.safetensors").write_text(trial)
            (folder / "best.json").write_text(json.dumps({"trial": trial}))
            best["lora_dir"] = str(folder / "lora")
        finish_parent(uri, parent, [], best, None, table, tmp_path, 1.0, cpu_seconds=0.25)
        client = tracking.client(uri)
        return sorted(a.path for top in client.list_artifacts(parent, "best")
                      for a in ([top] if not top.is_dir else client.list_artifacts(parent, top.path)))

    assert end("t001", 4) == ["best/best.json"] + [f"best/lora/segment_{j}.safetensors" for j in (1, 2, 3, 4)]
    assert end("t002", 2) == ["best/best.json", "best/lora/segment_1.safetensors", "best/lora/segment_2.safetensors"]
    metrics = tracking.client(uri).get_run(parent).data.metrics
    assert (metrics["sweep_seconds"], metrics["driver_cpu_seconds"]) == (2.0, 0.5)  # each end's added
    assert end("t003", None) == ["best/best.json"]
    run = tracking.client(uri).get_run(parent)
    where = tracking.client(uri).download_artifacts(parent, "best/best.json", str(tmp_path / "dl"))
    assert json.loads(Path(where).read_text()) == {"trial": "t003", "lora": None,
                                                   "why": "the LoRAs of t003's best evaluation were not kept"}
    assert run.data.tags["best_trial"] == "t003" and "shortft.best_stale" not in run.data.tags
    assert run.data.tags["best_run_id"] == "id-t003"  # the best trial's run (its name is <sweep>-t003)
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    def cannot(self, path=None):
        raise NotImplementedError
    monkeypatch.setattr(LocalArtifactRepository, "delete_artifacts", cannot)  # a store that deletes nothing
    end("t004", 1)
    assert tracking.client(uri).get_run(parent).data.tags["shortft.best_stale"].startswith("best/ may hold files")
    monkeypatch.undo()
    end("t005", 1)  # deleted again: the tag goes
    assert "shortft.best_stale" not in tracking.client(uri).get_run(parent).data.tags


def test_a_resume_from_an_earlier_checkpoint_logs_the_steps_it_runs_again_and_says_so(tmp_path):
    """`--resume <step 2 checkpoint> train.lr=...` after step 4 was logged runs steps 3-4 again, another line of
    steps (metrics.jsonl keeps only it): MLflow dropped their new values, keeping the abandoned line's to step 4.
    (A restart after a crash runs them again with the same values: those are still logged once.)"""
    from mlflow.entities import Metric

    uri = f"sqlite:///{tmp_path}/m.db"
    run_id = tracking.ensure_run(uri, "x", "run", "run")
    client = tracking.client(uri)
    client.log_batch(run_id, metrics=[Metric("loss", 1.0, 0, s) for s in (1, 2, 3, 4)])
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2)))
    logger = MlflowLogger(uri, run_id, metrics_file=tmp_path / "metrics.jsonl")
    logger.on_start(None, 2)
    for step in (3, 4, 5):
        logger.on_step(step, {"step": step, "loss": 2.0}, {})
    history = client.get_metric_history(run_id, "loss")
    latest = {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}  # the later value of each step
    assert latest == {1: 1.0, 2: 1.0, 3: 2.0, 4: 2.0, 5: 2.0}
    assert client.get_run(run_id).data.metrics["loss"] == 2.0
    assert client.get_run(run_id).data.tags["shortft.rewound"].startswith(
        "resumed at step 2 after step 4 was logged, and from step 3 its values are not those logged")
    # a new train.lr leaves the first step run again at the logged loss (computed before its update), and a new
    # eval setting changes no loss: the run's MLflow kept the abandoned line's lr and evaluation, untagged
    for changed in ({"lr": 0.003}, {"eval/objective": 0.8}):
        run_id = tracking.ensure_run(uri, "x", f"run-{len(changed)}-{next(iter(changed))}", "run")
        client.log_batch(run_id, metrics=[Metric(k, v, 0, s) for s in (1, 2, 3, 4)
                                          for k, v in {"loss": 1.0, "lr": 0.001, "eval/objective": 0.6}.items()])
        logger = MlflowLogger(uri, run_id, metrics_file=tmp_path / "metrics.jsonl")
        logger.on_start(None, 2)
        logger.on_step(3, {"step": 3, "loss": 1.0, "lr": 0.001, "eval/objective": 0.6, **changed}, {})
        key = next(iter(changed))
        assert [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)
                if m.step == 3] == [0.001 if key == "lr" else 0.6, changed[key]]
        assert "shortft.rewound" in client.get_run(run_id).data.tags


def test_a_resume_whose_first_history_read_fails_logs_no_step_twice(tmp_path, monkeypatch):
    """The logger asks MLflow which steps it has; where that one call failed (a server blip), it took none as
    logged and replayed all of metrics.jsonl: every step twice in the run's history."""
    from mlflow.entities import Metric

    from shortft import mlflow_logger

    uri = f"sqlite:///{tmp_path}/m.db"
    run_id = tracking.ensure_run(uri, "x", "run", "run")
    real = tracking.client(uri)
    real.log_batch(run_id, metrics=[Metric("loss", -0.1 * s, 0, s) for s in (1, 2, 3)])
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": -0.1 * s}) + "\n" for s in (1, 2, 3)))

    class Blip:
        def __getattr__(self, name):
            return getattr(real, name)

        def get_metric_history(self, *args):
            raise ConnectionError("server away for a moment")

    monkeypatch.setattr(mlflow_logger, "client", lambda uri: Blip())
    logger = MlflowLogger(uri, run_id, metrics_file=tmp_path / "metrics.jsonl")
    logger.RETRY_S = 0
    logger.on_start(None, 3)
    logger.on_step(4, {"step": 4, "loss": -0.4}, {})
    assert sorted(m.step for m in real.get_metric_history(run_id, "loss")) == [1, 2, 3, 4]


def test_a_resume_whose_tune_state_is_cut_short_is_one_line(tmp_path):
    """A driver killed as Tune wrote its tuner.pkl left it empty: --resume ended in Tune's EOFError traceback."""
    import ray

    (tmp_path / "rr" / "guard").mkdir(parents=True)
    (tmp_path / "rr" / "guard" / "tuner.pkl").write_bytes(b"")
    try:
        with pytest.raises(ConfigError, match=r"^--resume: the state of sweep 'guard' \(.*/guard/tuner.pkl\) is cut "
                                              r"short or unreadable \(EOFError\); start it again under another --name"):
            sweep.run_sweep("toy", name="guard", storage_path=str(tmp_path / "rr"), tracking_uri=None, resume=True,
                            baseline=False, output_root=str(tmp_path / "runs"))
    finally:
        ray.shutdown()


def test_the_importance_plot_weighs_only_the_searched_values_that_differ_between_trials(tmp_path, monkeypatch):
    """Three smoke trials that differed in chain.segments alone: the plot gave each of five values every trial
    had the same an importance of 0.17, and chain.segments, the one that differed, 0.04."""
    import optuna
    from optuna.visualization import matplotlib as ovm

    from shortft.sweep.results import optuna_plots

    asked = []
    real = ovm.plot_param_importances
    monkeypatch.setattr(ovm, "plot_param_importances", lambda study, params=None: asked.append(params) or real(
        study, params=params))
    dists = {"chain.segments": optuna.distributions.CategoricalDistribution([2, 4, 8]),
             "train.lr": optuna.distributions.FloatDistribution(0.01, 1.0, log=True)}
    study = optuna.create_study(direction="maximize")
    for i, k in enumerate([2, 4, 8]):
        study.add_trial(optuna.trial.create_trial(params={"chain.segments": k, "train.lr": 0.1}, distributions=dists,
                                                  value=float(i)))
    assert sorted(optuna_plots(study, tmp_path)) == ["optimization_history", "param_importances"]
    assert asked == [["chain.segments"]]
    same = optuna.create_study(direction="maximize")  # nothing differs: no importances to plot
    for i in range(2):
        same.add_trial(optuna.trial.create_trial(params={"chain.segments": 4, "train.lr": 0.1}, distributions=dists,
                                                 value=float(i)))
    assert sorted(optuna_plots(same, tmp_path)) == ["optimization_history"]


def test_a_trial_run_that_logged_an_unset_alpha_as_none_is_still_its_run(tmp_path):
    """An unset lora.alpha is logged as the rank since 2026-12-08 ('None' before): a sweep resumed across that
    change found each trial's run of other params, deleted it and made another; a resumed run was tagged
    `lora.alpha: None -> 4.0` among its changed settings."""
    from mlflow.entities import Param

    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = trial_config("toy", {}, {})
    parent = tracking.ensure_run(uri, "e", "sweep/s", "s", reuse=False)
    run = tracking.ensure_trial_run(uri, "e", "s-t001", cfg, parent)
    client = tracking.client(uri)
    assert client.get_run(run).data.params["lora.alpha"] == str(float(cfg.lora.rank))
    old = tracking.ensure_run(uri, "e", f"{parent}/s-t002", "s-t002", parent_run_id=parent)  # as logged before
    client.log_batch(old, params=[Param(k, "None" if k == "lora.alpha" else v)
                                  for k, v in tracking.param_values(tracking.run_params(cfg)).items()])
    assert tracking.ensure_trial_run(uri, "e", "s-t002", cfg, parent) == old
    tracking.note_changed_params(uri, old, cfg)
    assert tracking.CHANGED_TAG not in client.get_run(old).data.tags
