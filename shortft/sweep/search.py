"""How a sweep proposes and stops trials: seeded Optuna TPE (from the space's points first) and ASHA."""

from __future__ import annotations

from shortft.space import Space, trial_config
from shortft.sweep.trial_runs import TrialRuns
from shortft.sweep.trials import MODE, OBJECTIVE, as_space

TIME_ATTR = "step"  # ASHA's clock: training steps


def searcher(space: Space | str, sweep_settings: dict, seed: int = 0, max_concurrent: int = 1):
    """Seeded Optuna TPE, starting from the space's points_to_evaluate, wrapped by TrialRuns."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    space = as_space(space)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory" and the like: noise
    inner = OptunaSearch(metric=OBJECTIVE, mode=MODE, points_to_evaluate=space.points_to_evaluate or None,
                         sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=3))
    return TrialRuns(inner, max_concurrent, sweep_settings)


def scheduler(space: Space | str):
    """ASHA on the evaluation objective, in training steps: a trial is first judged at its first evaluation."""
    from ray.tune.schedulers import ASHAScheduler

    space = as_space(space)
    # Over every value the space gives train.steps and eval.every: the longest run is max_t (from the first
    # value, a 120-step trial of `train.steps: {choice: [60, 120]}` was stopped at 60), the first evaluation
    # of any trial the grace period.
    cfgs = [trial_config(space.base, space.fixed, {k: d.corners()[0] for k, d in space.search.items()})]
    for key in ("train.steps", "eval.every"):
        if key in space.search:
            cfgs += [trial_config(space.base, space.fixed, {**{k: d.corners()[0] for k, d in space.search.items()},
                                                             key: v}) for v in space.search[key].corners()]
    longest = max(c.train.steps for c in cfgs)
    first = min(min(c.eval.every or c.train.steps, c.train.steps) for c in cfgs)
    return ASHAScheduler(time_attr=TIME_ATTR, metric=OBJECTIVE, mode=MODE, max_t=longest, grace_period=first,
                         reduction_factor=2)
