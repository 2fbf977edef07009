"""Every place the sweep reaches a private attribute of Ray, Tune or Optuna, in one module.

Written against Ray 2.60 (Train V2) and Optuna 4.x. Each workaround degrades gracefully at run time
when what it reaches has moved; `missing()` names what moved, and tests/test_sweep.py fails loudly
on it, so that an upgrade shows here first.
"""

from __future__ import annotations

import importlib
import sys

from ray import tune

# (module, attribute) pairs reached below; the attribute may be a dotted path on the module.
PRIVATE = (
    ("ray._private.services", "canonicalize_bootstrap_address"),
    ("ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator", "get_or_create_autoscaling_coordinator"),
    ("ray.tune.tuner", "Tuner._local_tuner"),
    ("ray.tune.search.optuna", "OptunaSearch._ot_study"),
    ("ray", "PlacementGroupID"),
    ("ray.util.placement_group", "PlacementGroup"),
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
        elif attribute == "OptunaSearch._ot_study":
            ok = "_ot_study" in _init_names(target.OptunaSearch)
        else:
            ok = hasattr(target, attribute)
        if not ok:
            gone.append(f"{module_name}.{attribute}")
    return gone


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


class PlacementGroupReaper(tune.Callback):
    """Local Ray without a dashboard only. When Tune ends a trial (ASHA stops it, or it reaches its
    last step) it kills the trial's Ray Train job; Train's own safety net for that (a cleaner actor)
    needs the dashboard's state API, so the job's placement group would keep its CPUs forever and the
    next trials could not start. With one trial at a time, every placement group made during a trial
    other than Tune's own for the trial is that job's: remove it when the trial ends."""

    def __init__(self, trial_cpus: float):
        self.trial_cpus, self.before = trial_cpus, set()

    def _created(self) -> dict:
        from ray.util import placement_group_table

        return {k: v for k, v in placement_group_table().items() if v["state"] == "CREATED"}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.before = set(self._created())

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._reap()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._reap()

    def _reap(self) -> None:
        from ray.util import remove_placement_group
        from ray.util.placement_group import PlacementGroup

        import ray

        for pg_id, pg in self._created().items():
            if pg_id not in self.before and list(pg["bundles"].values()) != [{"CPU": self.trial_cpus}]:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
