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


def ended_trials(tuner) -> int:
    """How many trials of a restored Tuner had ended (TERMINATED: not one a resume runs again, errored or
    unfinished); 0 where none ran yet or Tune's state reads otherwise."""
    try:
        return list(trial_statuses(tuner.get_results()).values()).count("TERMINATED")
    except Exception:  # noqa: BLE001 - no experiment state yet, or one Tune reads otherwise now: no note, no harm
        return 0


def _init_names(cls) -> str:
    import inspect

    return inspect.getsource(cls)


def canonical_address(address: str | None) -> str | None:
    """`auto`, or none given, as the cluster address `ray.init` would find (None: start a local Ray); a
    host:port or `ray://` address as given, which `ray.init` resolves itself (resolved here, 127.0.0.1 became
    this node's IP, and the line for an address nothing answers at named that, not what was given)."""
    from ray._private.services import canonicalize_bootstrap_address

    if address == "local":
        return None
    return address if address and address != "auto" else canonicalize_bootstrap_address(address)


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


def restore_rungs(tuner, time_attr: str, metric: str, ended_itself) -> int | None:
    """ASHA's rungs of a resumed sweep as its earlier drivers left them. Tune saves no scheduler state:
    after a resume the first trial to reach a rung went on, and later cut-offs weighed only the trials run
    since. Each earlier trial's reported evaluations (the restored Tuner's results) go to the scheduler as
    Tune gave them: each report, then for a trial that ended, its last result again where it returned by
    itself (`ended_itself(result)`; Tune's "done" result) and once more as its completion; each of those
    fills the trial's highest rung at or below its step that it has not filled. A trial's rungs depend on
    its own results alone, so the order trials are replayed in does not matter, and a resumed trial that
    reports a rung it had filled is not counted twice. Returns the trials replayed; None where Tune's
    internals moved (the resume goes on with empty rungs, as before)."""
    import math

    from ray.tune.schedulers import AsyncHyperBandScheduler

    scheduler = getattr(getattr(getattr(tuner, "_local_tuner", None), "_tune_config", None), "scheduler", None)
    if not isinstance(scheduler, AsyncHyperBandScheduler):
        return None
    try:
        grid = tuner.get_results()
    except RuntimeError:  # no experiment state yet (stopped before its first trial): nothing ran
        return 0
    except Exception:  # noqa: BLE001 - a state Tune reads otherwise now: the resume goes on without the rungs
        return None
    statuses = trial_statuses(grid)
    if len(grid) and not statuses:
        return None
    replayed = 0
    for result in grid:
        history, trial_id = result.metrics_dataframe, (result.metrics or {}).get("trial_id")
        if history is None or trial_id is None or time_attr not in history or metric not in history:
            continue
        # NaN: a report without an evaluation, which ASHA passes over (the last one too, given again)
        rows = [{time_attr: t} | ({} if v is None or math.isnan(v) else {metric: v})
                for t, v in zip(history[time_attr], history[metric])]
        if not rows:
            continue
        trial = types.SimpleNamespace(trial_id=trial_id)
        scheduler.on_trial_add(None, trial)
        for row in rows:
            scheduler.on_trial_result(None, trial, row)
        if statuses.get(trial_id) == "TERMINATED":
            if ended_itself(result):
                scheduler.on_trial_result(None, trial, rows[-1])
            scheduler.on_trial_complete(None, trial, rows[-1])
        else:  # to run again: Tune adds it to the scheduler itself
            scheduler.on_trial_remove(None, trial)
        replayed += 1
    return replayed


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
