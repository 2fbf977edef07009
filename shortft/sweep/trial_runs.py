"""The MLflow runs of a sweep's trials: one nested run per trial, created in the driver as the searcher
proposes the trial (SQLite has one writer), found again by a resumed driver, closed with the trial's
status when it ends."""

from __future__ import annotations

from pathlib import Path

from ray import tune
from ray.tune.search import ConcurrencyLimiter

from shortft import raised, tracking
from shortft.run_status import ERROR_TAG
from shortft.stats import finite
from shortft.sweep.trials import OBJECTIVE, RUN_ID_KEY, TRIAL_KEY, combination_error, stopped_early, trial_run_config


class TrialRuns(ConcurrencyLimiter):
    """Caps concurrency and, as each trial is suggested, creates its nested MLflow run here in the
    driver. Trials are numbered in suggestion order; a resumed driver that suggests trial n again
    finds the run it made before the crash instead of making a second one."""

    def __init__(self, searcher, max_concurrent: int, sweep_settings: dict):
        super().__init__(searcher, max_concurrent)
        self.sweep_settings, self.count = sweep_settings, 0
        self.configs: dict[str, dict] = {}  # live and errored trials' configs (kept in the searcher's saved state)
        self.errored: set[str] = set()  # trials that ended in an error, whose rerun Optuna is told of
        self.best: dict[str, float] = {}  # each live trial's best evaluation so far (kept with the searcher)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._best_of(trial_id, result)
        super().on_trial_result(trial_id, result)

    def _best_of(self, trial_id: str, result: dict | None) -> float | None:
        best = self.__dict__.setdefault("best", {})
        value = finite((result or {}).get(OBJECTIVE))
        if value is not None:
            best[trial_id] = max(float(value), best.get(trial_id, float(value)))
        return best.get(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        """A trial ASHA stopped is told to Optuna as pruned at its last evaluation, not complete with it: a
        30-step score ranked beside 60-step ones in TPE (and in its plots), and Tune never passes the
        stopping result to `on_trial_result`, so it is reported here first. An errored trial that a
        resume runs again is told to Optuna by `_tell_rerun`. A trial that ran to its end is told its best
        evaluation, by which the results table ranks it and whose LoRAs the sweep keeps (Tune gives Optuna
        the last: TPE and the parent run's plots ranked the trials otherwise than the table)."""
        errored = self.__dict__.setdefault("errored", set())  # (absent from a searcher saved before it was kept)
        best = self.__dict__.setdefault("best", {})
        config = self.configs.get(trial_id) if error else self.configs.pop(trial_id, None)  # a resume may rerun it
        stopped = bool(result and not error and config is not None
                       and stopped_early(config, self.sweep_settings, result))
        nan = False  # evaluated, never finitely: Optuna's tell refused the NaN, and the study kept it RUNNING
        if result and not error and not stopped:
            if self._best_of(trial_id, result) is not None:
                result = {**result, OBJECTIVE: best[trial_id]}
            else:
                nan = OBJECTIVE in result
        if trial_id in errored:  # `--resume` ran it again
            if not error and self._tell_rerun(trial_id, config, result, stopped):
                errored.discard(trial_id)
                best.pop(trial_id, None)
            return
        if error:
            errored.add(trial_id)
        else:
            best.pop(trial_id, None)
        if stopped:
            trial = getattr(self.searcher, "_ot_trials", {}).get(trial_id)  # private (sweep/ray_compat.py)
            value = finite(result.get(OBJECTIVE))
            if trial is not None and value is not None:
                trial.report(float(value), int(result.get("training_iteration", 1)))
            result = None  # OptunaSearch tells Optuna PRUNED for a trial ended with no value
        super().on_trial_complete(trial_id, result=None if nan else result, error=error or nan)  # nan: FAIL

    def _tell_rerun(self, trial_id: str, config: dict | None, result: dict | None, pruned: bool) -> bool:
        """An errored trial that a resume ran again is FAIL in the study, and the limiter drops its second
        end: its result is added to the study as a trial of the same parameters (`rerun_of`: the failed
        one's number), COMPLETE, or PRUNED where ASHA stopped it. False where there was nothing to tell."""
        import optuna

        study = getattr(self.searcher, "_ot_study", None)  # private (sweep/ray_compat.py)
        failed = getattr(self.searcher, "_ot_trials", {}).get(trial_id)
        value = finite((result or {}).get(OBJECTIVE))
        if study is None or failed is None or value is None:
            return False
        frozen = study.trials[failed.number]
        if frozen.state != optuna.trial.TrialState.FAIL:
            return False
        study.add_trial(optuna.trial.create_trial(
            params=frozen.params, distributions=frozen.distributions, user_attrs={"rerun_of": frozen.number},
            **({"state": optuna.trial.TrialState.PRUNED,
                "intermediate_values": {int(result.get("training_iteration", 1)): float(value)}} if pruned else
               {"value": float(value)})))
        return True

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        if not isinstance(config, dict):
            return config
        self.count += 1
        key = f"t{self.count:03d}"
        config[TRIAL_KEY] = key
        self.configs[trial_id] = config
        sweep = self.sweep_settings
        if sweep["tracking_uri"] and not combination_error(config, sweep):  # else it fails as it starts
            name = f"{sweep['name']}-{key}"
            cfg = trial_run_config(config, sweep, name)
            config[RUN_ID_KEY] = tracking.ensure_trial_run(sweep["tracking_uri"], sweep["experiment"], name, cfg,
                                                           sweep["parent_run_id"])
        return config


class RunCloser(tune.Callback):
    """Driver side: a trial that ends, is stopped early or fails gets its MLflow run closed with that
    status (an ASHA stop kills the trial's Train job before it could close the run itself), a failed one
    with its line as the `shortft.error` tag. `sweep`: the sweep's settings, to tell a trial ASHA stopped
    from one that finished. The trials' runs still RUNNING when the sweep ends (a Ctrl-C: Tune stops the
    running trials without a per-trial callback) are closed KILLED. A trial's run is the one its config
    names (made by `TrialRuns`), else the one the trial made and tagged (a plain tune.run or Tuner);
    `parent_run_id` (or the sweep's) finds those left RUNNING in one query."""

    def __init__(self, tracking_uri: str, sweep: dict | None = None, parent_run_id: str | None = None):
        self.tracking_uri, self.sweep = tracking_uri, sweep
        self.parent = parent_run_id or (sweep or {}).get("parent_run_id")
        self.closed: set[str] = set()  # trial ids

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, "FAILED", raised.one_line(_error_of(trial)))

    def on_experiment_end(self, trials, **info):
        runs = {run_id: trial for trial in trials if trial.trial_id not in self.closed
                and (run_id := self._run_of(trial))}
        if not runs:
            return
        client = tracking.client(self.tracking_uri)
        if self.parent:
            running = f"tags.`mlflow.parentRunId` = '{self.parent}' and attributes.status = 'RUNNING'"
            found = client.search_runs([client.get_run(self.parent).info.experiment_id], filter_string=running)
            left = {run.info.run_id for run in found} & set(runs)
        else:
            left = {run_id for run_id in runs if client.get_run(run_id).info.status == "RUNNING"}
        for run_id in left:  # a resumed sweep runs them again (the trial's logger marks its run RUNNING)
            client.set_tag(run_id, "shortft.trial_status", "interrupted")
            client.set_terminated(run_id, "KILLED")

    def _run_of(self, trial) -> str | None:
        return trial.config.get(RUN_ID_KEY) or tracking.tune_trial_run(self.tracking_uri, trial.experiment_dir_name,
                                                                       trial.trial_id)

    def _close(self, trial, status: str, error: str | None = None) -> None:
        run_id = self._run_of(trial)
        if not run_id:
            return
        self.closed.add(trial.trial_id)
        client = tracking.client(self.tracking_uri)
        early = (status == "FINISHED" and self.sweep is not None
                 and stopped_early(trial.config, self.sweep, trial.last_result or {}))
        client.set_tag(run_id, "shortft.trial_status", "stopped early" if early else status.lower())
        if error:
            client.set_tag(run_id, ERROR_TAG, error[:5000])
        elif ERROR_TAG in client.get_run(run_id).data.tags:  # an earlier attempt's line, before a resume ran it again
            client.delete_tag(run_id, ERROR_TAG)
        client.set_terminated(run_id, status)


def _error_of(trial) -> str | None:
    """The trial's error as Tune wrote it: in the trial's local folder first (`get_error` reads the storage
    path, where a trial whose process died has no copy yet as Tune calls `on_trial_error`)."""
    local = getattr(trial, "error_file", None)
    if local and Path(local).is_file():
        return Path(local).read_text()
    return trial.get_error()
