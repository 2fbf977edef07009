"""The sweep: Ray Tune + Optuna over a search space; each trial trains in its Tune process (one worker) or
as a Ray Train job; MLflow tracks it all.

    from shortft.sweep import run_sweep
    result = run_sweep("toy", num_samples=6)          # what `python tune/sweep.py` runs
    print(result.best["objective"], result.table_path)

For `ray.tune.run` / `Tuner` directly (README, docs/sweeps.md):
- `trainable_for("toy", tracking_uri=...)`: a Tune trainable whose `config` is dotted ShortFT keys with
  Tune distributions; the sweep's constants are bound to it (`tune.with_parameters`).
- `param_space(space)`, `searcher(space, settings)`, `scheduler(space)`, `RunCloser`: the pieces
  `run_sweep` wires together, for a search space file.
- `evaluate_base("toy", fixed, out_dir)`: the untrained model on the evaluation trials of `fixed` get
  (`out_dir/base.json`): what `run_sweep` puts first in its results.

The objective is the fixed evaluation metric on held-out prompts (`eval/objective`), reported to Tune
at every `eval.every` steps; never the weighted training reward, which a searcher could inflate by
raising the weights. MLflow: one parent run per sweep; one nested child run per trial, created in the
driver as the searcher suggests the trial (SQLite has one writer), logged to by the trial's rank 0.

Modules: one concern each (a trial, its MLflow run, the search, the results, the comparison ...), each
named with what it holds in docs/layout.md.
"""

import importlib

# Each name from its module on first use: a process that needs one module (a trial, or Ray Train's
# controller unpickling the sweep's callback) does not import the others (Optuna, the runner).
_WHERE = {"main": "cli", "SweepResult": "runner", "run_sweep": "runner", "scheduler": "search",
          "evaluate_base": "baseline",
          "searcher": "search", "RunCloser": "trial_runs", "TrialRuns": "trial_runs",
          **{name: "trials" for name in ("EXPERIMENT", "MODE", "OBJECTIVE", "RUN_ID_KEY", "SMOKE_TEST", "TRIAL_CPUS",
                                         "TRIAL_KEY", "param_space", "run_trial", "settings", "trainable",
                                         "trainable_for")}}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"shortft.sweep.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'shortft.sweep' has no attribute {name!r}")


__all__ = ["EXPERIMENT", "MODE", "OBJECTIVE", "RUN_ID_KEY", "SMOKE_TEST", "TRIAL_CPUS", "TRIAL_KEY",
           "RunCloser", "SweepResult", "TrialRuns", "evaluate_base", "main", "param_space", "run_sweep",
           "run_trial", "scheduler", "searcher", "settings", "trainable", "trainable_for"]
