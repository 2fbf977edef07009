"""Every place the sweep reaches a private attribute of Ray, Tune or Optuna, in one module.

Written against Ray 2.60 (Train V2) and Optuna 4.x. Each workaround degrades gracefully at run time
when what it reaches has moved; `missing()` names what moved, and tests/test_sweep.py fails loudly
on it, so that an upgrade shows here first.
"""

from __future__ import annotations

import importlib
import sys
import types

from ray import tune

# (module, attribute) pairs reached below; the attribute may be a dotted path on the module.
PRIVATE = (
    ("ray._private.services", "canonicalize_bootstrap_address"),  # here and in shortft/resources.py
    ("ray._private.state", "state.get_cluster_config"),  # used by shortft/resources.py (no import: layers)
    ("ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator", "get_or_create_autoscaling_coordinator"),
    # used by shortft/distributed.py (no import: layers): Ctrl-C asks the workers to stop (ray_stop.py)
    ("ray.train.v2.api.data_parallel_trainer", "DataParallelTrainer._register_sigint_handler"),
    ("ray.train.v2._internal.execution.context", "logger"),  # distributed.py quiets its report lines
    # shortft/ray_policy.py: a final failure is raised at once (no restart, no logged tracebacks)
    ("ray.train.v2.api.data_parallel_trainer", "DataParallelTrainer._initialize_and_run_controller"),
    ("ray.train.v2._internal.execution.failure_handling.default", "DefaultFailurePolicy"),
    ("ray.train.v2._internal.exceptions", "UserExceptionWithTraceback._base_exc"),
    ("ray.tune.tuner", "Tuner._local_tuner"),
    ("ray.tune.execution.tune_controller", "TuneController._metric"),
    ("ray.tune.search.optuna", "OptunaSearch._ot_study"),
    ("ray.tune.search.optuna", "OptunaSearch._ot_trials"),  # shortft/sweep/trial_runs.py: ASHA's stop as pruned
    ("ray.tune.result_grid", "ResultGrid._experiment_analysis"),
    # restore_rungs: ASHA's rungs, which Tune does not save, rebuilt on a resume
    ("ray.tune.impl.tuner_internal", "TunerInternal._tune_config"),
    ("ray.tune.schedulers.async_hyperband", "AsyncHyperBandScheduler._brackets"),
    ("ray.tune.schedulers.async_hyperband", "AsyncHyperBandScheduler._metric_op"),
    ("ray.tune.schedulers.async_hyperband", "_Bracket.on_result"),
    ("ray.tune.schedulers.async_hyperband", "_Bracket._rungs"),
)


def missing() -> list[str]:
    """The private names above that this Ray/Optuna no longer has (instance attributes are checked
    on a fresh object where the class alone cannot tell)."""
    gone = []
    for module_name, attribute in PRIVATE:
        try:
            target = importlib.import_module(module_name)
        except ImportError:
            gone.append(module_name)
            continue
        if attribute == "Tuner._local_tuner":
            ok = "_local_tuner" in _init_names(target.Tuner)
        elif attribute in ("OptunaSearch._ot_study", "OptunaSearch._ot_trials"):
            ok = attribute.split(".")[1] in _init_names(target.OptunaSearch)
        elif attribute == "ResultGrid._experiment_analysis":
            ok = "self._experiment_analysis = " in _init_names(target.ResultGrid)
        elif attribute == "UserExceptionWithTraceback._base_exc":
            ok = "self._base_exc = exc" in _init_names(target.UserExceptionWithTraceback)
        elif attribute == "TuneController._metric":
            ok = "self._metric = metric" in _init_names(target.TuneController)
        elif attribute == "TunerInternal._tune_config":
            ok = "self._tune_config = " in _init_names(target.TunerInternal)
        elif attribute.startswith("AsyncHyperBandScheduler._") or attribute == "_Bracket._rungs":
            owner, name = attribute.split(".")
            ok = f"self.{name} = " in _init_names(getattr(target, owner))
        elif "." in attribute:
            owner, name = attribute.split(".")
            ok = hasattr(getattr(target, owner, None), name)
        else:
            ok = hasattr(target, attribute)
        if not ok:
            gone.append(f"{module_name}.{attribute}")
    return gone


def trial_statuses(grid) -> dict[str, str]:
    """trial id -> Tune's status of it (TERMINATED, ERROR, PENDING, RUNNING, PAUSED) in a ResultGrid; {} where
    that moved. A sweep stopped by Ctrl-C returns its unfinished trials beside the finished ones."""
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or []
    return {t.trial_id: t.status for t in trials}


def _init_names(cls) -> str:
    import inspect

    return inspect.getsource(cls)


def canonical_address(address: str | None) -> str | None:
    """`auto`, host:port or a `ray://` address as `ray.init` wants it (None: start a local Ray)."""
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address(address) if address != "local" else None


def start_autoscaling_coordinator() -> None:
    """Every Ray Train run asks a cluster-wide coordinator actor for resources, with a 5 s timeout; the
    first run's request times out (with a traceback in the log) while that actor's process starts.
    Starting it once here, before any trial, removes that wait from the first trial."""
    try:
        import ray
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        ray.get(get_or_create_autoscaling_coordinator().__ray_ready__.remote(), timeout=60)
    except Exception as e:  # internal API: if it moved, trials still run, only slower to start
        print(f"note: could not pre-start Ray's autoscaling coordinator ({type(e).__name__})", file=sys.stderr)


def study_of(tuner):
    """The Optuna study behind the searcher (for its plots); None if it cannot be reached."""
    try:
        alg = tuner._local_tuner._tune_config.search_alg
        return alg.searcher._ot_study
    except AttributeError:
        return None


def restore_rungs(tuner, time_attr: str, metric: str) -> int | None:
    """ASHA's rungs of a resumed sweep as its earlier drivers left them. Tune saves no scheduler state:
    after a resume the first trial to reach a rung went on, and later cut-offs weighed only the trials run
    since. Each earlier trial's reported history (the restored Tuner's results) is replayed into the
    bracket; a trial's value at a rung is its first result at or past that milestone, so the order the
    trials are replayed in does not matter, and a resumed trial that reports a rung it had reached is not
    counted twice. Returns the values recorded, or None where Tune's internals moved (the resume goes on
    with empty rungs, as before)."""
    import math

    try:
        scheduler = tuner._local_tuner._tune_config.scheduler
        (bracket,) = scheduler._brackets  # one bracket (ASHA's default): each trial's
        sign, rungs = scheduler._metric_op, bracket._rungs
    except (AttributeError, ValueError, TypeError):
        return None
    before = sum(len(recorded) for _, recorded in rungs)
    for result in tuner.get_results():
        history = result.metrics_dataframe
        trial_id = (result.metrics or {}).get("trial_id")
        if history is None or trial_id is None or time_attr not in history or metric not in history:
            continue
        trial = types.SimpleNamespace(trial_id=trial_id)
        for t, value in zip(history[time_attr], history[metric]):
            if value is not None and not math.isnan(value):  # NaN: a report without an evaluation
                bracket.on_result(trial, t, sign * value)
    return sum(len(recorded) for _, recorded in rungs) - before


def tune_metric() -> str | None:
    """The `metric` of the `tune.run` / `Tuner` whose controller is creating a trial right now (Tune
    asks a trainable's resources as it creates each trial, from TuneController.step), or None: not
    given, not found (called elsewhere, or Tune changed; then nothing is checked)."""
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.result import DEFAULT_METRIC

    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, TuneController):
            metric = getattr(owner, "_metric", None)
            return None if metric in (None, DEFAULT_METRIC) else metric
        frame = frame.f_back
    return None
