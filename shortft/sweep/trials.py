"""One trial of a sweep: its settings, its run config (built once), and the Tune function trainable that
fits a Ray Train job and reports its evaluations to Tune."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from shortft import tracking
from shortft.config import Config, from_dict, to_dict
from shortft.space import Space, to_tune, trial_config

OBJECTIVE = "eval/objective"
MODE = "max"
SMOKE_TEST = {"train.steps": 2, "eval.every": 1, "chain.steps": 10, "eval.samples_per_prompt": 1,
              "train.batch_size": 1, "train.checkpoint_every": 0, "train.log_every": 1}
TRIAL_KEY = "trial_key"  # set by trial_runs.TrialRuns: t001, t002, ... (stable across a resumed driver)
RUN_ID_KEY = "mlflow_run_id"
EXPERIMENT = "shortft-sweeps"  # MLflow experiment of sweeps (single runs go to "shortft")
TRIAL_CPUS = 0.1  # the trial process itself only waits on its Ray Train job



def settings(space: Space, name: str, storage_path: str, output_root: str, workers: int = 1, use_gpu: bool = False,
             gpus_per_worker: float = 1.0, cpus_per_worker: float | None = None, threads: int | None = None,
             tracking_uri: str | None = None, experiment: str = EXPERIMENT,
             parent_run_id: str | None = None) -> dict:
    """The constants every trial needs (plain values: they travel inside the trial config)."""
    return {"name": name, "base": space.base, "fixed": space.fixed, "storage_path": storage_path,
            "output_root": output_root, "workers": workers, "use_gpu": use_gpu, "gpus_per_worker": gpus_per_worker,
            "cpus_per_worker": cpus_per_worker, "threads": threads, "tracking_uri": tracking_uri,
            "experiment": experiment, "parent_run_id": parent_run_id}


def param_space(space: Space, sweep_settings: dict) -> dict:
    return {**to_tune(space), "sweep": sweep_settings}


def searched_values(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ("sweep", TRIAL_KEY, RUN_ID_KEY)}


@lru_cache(maxsize=256)
def _config_json(base: str, fixed: str, values: str, name: str | None) -> str:
    return json.dumps(to_dict(trial_config(json.loads(base), json.loads(fixed), json.loads(values), name=name)))


def config_of_trial(config: dict, name: str | None = None) -> Config:
    """The run config of the trial whose Tune `config` this is: built (and checked) once per process
    for the same values, however many places ask for it."""
    sweep = config["sweep"]
    key = (json.dumps(sweep["base"]), json.dumps(sweep["fixed"], sort_keys=True),
           json.dumps(searched_values(config), sort_keys=True), name)
    return from_dict(Config, json.loads(_config_json(*key)))


def stopped_early(config: dict, last_result: dict) -> bool:
    """The trial's last reported step is short of the steps its config plans (ASHA stopped it)."""
    if "sweep" not in config:
        return False
    return last_result.get("step", 0) < config_of_trial(config).train.steps


class EvalReport(TuneReportCallback):
    """Ray Train callback: forward to Tune only the steps that carry an evaluation (Tune wants the
    objective in every result), with the mean seconds per step and the peak memory since the start."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []
        self.peak = 0.0

    def after_report(self, run_context, metrics, checkpoint):
        m = metrics[0]
        self.seconds.append(m.get("seconds_per_step", 0.0))
        self.peak = max(self.peak, m.get("peak_memory_mb", 0.0))
        if OBJECTIVE in m:
            m = {**m, "mean_seconds_per_step": sum(self.seconds) / len(self.seconds), "peak_memory_mb": self.peak}
            super().after_report(run_context, [m, *metrics[1:]], checkpoint)


def trainable(config: dict) -> None:
    """One trial: build its run config and fit a Ray Train job that reports evaluations to Tune."""
    from shortft.distributed import train_with_ray

    sweep = config["sweep"]
    key = config.get(TRIAL_KEY) or tune.get_context().get_trial_id()
    name = f"{sweep['name']}-{key}"
    cfg = config_of_trial(config, name)
    cfg.train.output_dir = str(Path(sweep["output_root"]) / name)
    run_id = config.get(RUN_ID_KEY)
    if sweep["tracking_uri"] and not run_id:  # used without TrialRuns (e.g. plain OptunaSearch): own child run
        run_id = tracking.ensure_trial_run(sweep["tracking_uri"], sweep["experiment"], name, cfg, sweep["parent_run_id"])
    train_with_ray(cfg, sweep["workers"], use_gpu=sweep["use_gpu"], storage_path=sweep["storage_path"],
                   tracking_uri=sweep["tracking_uri"], experiment=sweep["experiment"], resume=True,
                   cpus_per_worker=sweep["cpus_per_worker"], run_id=run_id, name=name, threads=sweep["threads"],
                   gpus_per_worker=sweep["gpus_per_worker"], callbacks=[EvalReport()])
