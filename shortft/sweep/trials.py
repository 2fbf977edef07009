"""One trial of a sweep: its settings, its run config (built once), and the Tune trainable that trains in
its own process (one worker that fits now) or fits a Ray Train job, and reports its evaluations to Tune.

    trainable = trainable_for("toy", tracking_uri="sqlite:///mlflow.db")    # settings travel with it
    tune.run(trainable, config={"chain.segments": tune.choice([2, 4, 8])}, num_samples=4,
             metric="eval/objective", mode="max")

A trial's Tune `config` holds only dotted ShortFT keys (plus the keys `TrialRuns` adds); the sweep's
constants (`settings`) are bound to the trainable with `tune.with_parameters`. Each trial's config is
checked in the driver as Tune creates the trial (Tune asks the trainable for its resources there), so
an unknown key or a bad value stops `tune.run` before that trial starts, with the key in one line.
"""

from __future__ import annotations

import json
import os
import sys
from functools import lru_cache, partial
from pathlib import Path

from ray import tune

from shortft import attempts, resources, tracking
from shortft.arguments import check_at_least
from shortft.checks import check_types
from shortft.config import Config, ConfigError, builtin_names, check_name, from_dict, pin_paths, read_mapping, to_dict
from shortft.mlflow_relay import RELAY, relay_call, start_relay
from shortft.space import Space, load_space, to_tune, trial_config
from shortft.sweep.eval_report import OBJECTIVE, OBJECTIVE_SE, EvalReport
from shortft.sweep.ray_compat import start_autoscaling_coordinator, tune_metric

MODE = "max"
# Smoke size: 2 steps of 10-step chains, one evaluation at the end (ASHA cannot stop a 2-step trial).
SMOKE_TEST = {"train.steps": 2, "eval.every": 2, "chain.steps": 10, "eval.samples_per_prompt": 1,
              "train.batch_size": 1, "train.checkpoint_every": 0, "train.log_every": 1}
TRIAL_KEY = "trial_key"  # set by trial_runs.TrialRuns: t001, t002, ... (stable across a resumed driver)
RUN_ID_KEY = "mlflow_run_id"
EXPERIMENT = "shortft-sweeps"  # MLflow experiment of sweeps (single runs go to "shortft")
TRIAL_CPUS = 0.1  # a trial that fits a Ray Train job only waits on it
RESOURCE_WAIT_S = 1800.0  # a trial whose workers are not placed within this ends as ERROR



def cpu_threads(workers: int, concurrent: int) -> int:
    """Torch threads of each CPU worker when `concurrent` trials of `workers` share this machine: one core
    is left to the driver and Ray's own processes (on the 2-core CPU a trial's worker with 2 threads did
    31 steps in 75 s, with 1 thread 39; same config, seed and lr)."""
    return max(1, ((os.cpu_count() or 1) - 1) // (workers * concurrent))


def settings(space: Space, name: str, storage_path: str, output_root: str, workers: int = 1, use_gpu: bool = False,
             gpus_per_worker: float = 1.0, cpus_per_worker: float | None = None, threads: int | None = None,
             tracking_uri: str | None = None, experiment: str = EXPERIMENT,
             parent_run_id: str | None = None, resource_wait_s: float | None = RESOURCE_WAIT_S) -> dict:
    """The constants every trial needs (plain values, bound to the trainable). The base config travels as
    its mapping, and relative local paths in it and in the fixed keys as absolute ones (`pin_paths`): a
    trial runs in its own folder, perhaps on another node."""
    base = pin_paths(read_mapping(space.base) if isinstance(space.base, str) else space.base)
    return {"name": name, "base": base, "fixed": pin_paths(space.fixed), "storage_path": storage_path,
            "output_root": output_root, "workers": workers, "use_gpu": use_gpu, "gpus_per_worker": gpus_per_worker,
            "cpus_per_worker": cpus_per_worker, "threads": threads, "tracking_uri": tracking_uri,
            "experiment": experiment, "parent_run_id": parent_run_id, "resource_wait_s": resource_wait_s,
            "attempt": attempts.new_attempt()}  # a resumed sweep is a new attempt: its errored trials try again


def as_space(space: Space | str) -> Space:
    """A Space, or the space file (built-in name or YAML path) `space` names: `param_space("toy")` was an
    AttributeError of a str."""
    if isinstance(space, (str, os.PathLike)):
        return load_space(str(space))
    if not isinstance(space, Space):
        raise ConfigError(f"space {space!r:.60}: give a space name ({', '.join(builtin_names('shortft.spaces'))}), a "
                          "YAML path or a Space from shortft.space.load_space")
    return space


def param_space(space: Space | str) -> dict:
    return to_tune(as_space(space))


def searched_values(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in (TRIAL_KEY, RUN_ID_KEY)}


@lru_cache(maxsize=256)
def _config_json(base: str, fixed: str, values: str, name: str | None) -> str:
    return json.dumps(to_dict(trial_config(json.loads(base), json.loads(fixed), json.loads(values), name=name)))


def config_of_trial(config: dict, sweep: dict, name: str | None = None) -> Config:
    """The run config of the trial whose Tune `config` this is: built (and checked) once per process
    for the same values, however many places ask for it."""
    key = (json.dumps(sweep["base"]), json.dumps(sweep["fixed"], sort_keys=True),
           json.dumps(searched_values(config), sort_keys=True), name)
    return from_dict(Config, json.loads(_config_json(*key)))


def trial_run_config(config: dict, sweep: dict, name: str) -> Config:
    """The trial's config as it trains, its folder under the sweep's `output_root` filled in: its MLflow run's
    params said `train.output_dir: runs/{name}`, where it wrote to runs/sweeps/<sweep>/<name>."""
    cfg = config_of_trial(config, sweep, name)
    cfg.train.output_dir = str(Path(sweep["output_root"]) / name)
    return cfg


def stopped_early(config: dict, sweep: dict, last_result: dict) -> bool:
    """The trial's last reported step is short of the steps its config plans and of its budgets (ASHA
    stopped it)."""
    from shortft.budget import ends_run

    return not ends_run(config_of_trial(config, sweep).train, last_result)


TRIAL_SUFFIX_BYTES = 16  # what `trial_name` adds: `-t001`, or `-<Tune's trial id>` under a Tuner's own searcher


def trial_name(config: dict, sweep: dict, trial_id: str) -> str:
    """The run name of the trial with this Tune `config`, and its folder's under `output_root`."""
    return f"{sweep['name']}-{config.get(TRIAL_KEY) or trial_id}"


def run_trial(config: dict, sweep: dict) -> None:
    """One trial: build its run config and train, in this process when Tune gave it the worker's own
    resources (`trial_resources`), else as a Ray Train job; either reports its evaluations to Tune."""
    context = tune.get_context()
    name = trial_name(config, sweep, context.get_trial_id())
    # Tune's retry of a final failure ends at once; values valid alone, not together, fail here, for good
    with attempts.once(Path(sweep["output_root"]) / name, sweep.get("attempt")):
        cfg = trial_run_config(config, sweep, name)
        run_id = config.get(RUN_ID_KEY)
        if sweep["tracking_uri"] and not run_id:  # plain tune.run / Tuner: its own child run, made by the
            # relay the driver started (trials that start together would otherwise race on SQLite), tagged
            # with the trial for the driver's `trial_runs.RunCloser`
            tagged = (context.get_experiment_name(), context.get_trial_id())
            run_id = relay_call(RELAY, tracking.ensure_trial_run, sweep["experiment"], name, cfg,
                                sweep["parent_run_id"], tagged)
        if context.get_trial_resources().required_resources != {"CPU": TRIAL_CPUS}:  # its worker's
            from shortft.sweep.in_trial import train_in_trial

            train_in_trial(cfg, sweep, run_id)
            return
        _train_job(cfg, sweep, run_id, name)


def _train_job(cfg: Config, sweep: dict, run_id: str | None, name: str) -> None:
    from shortft.distributed import train_with_ray

    # a failure (a --resource-wait-s wait too) closes the trial's run as FAILED with its line: the driver's
    # `trial_runs.RunCloser`
    train_with_ray(cfg, sweep["workers"], use_gpu=sweep["use_gpu"], storage_path=sweep["storage_path"],
                   tracking_uri=sweep["tracking_uri"], experiment=sweep["experiment"], resume=True,
                   cpus_per_worker=sweep["cpus_per_worker"], run_id=run_id, name=name, threads=sweep["threads"],
                   gpus_per_worker=sweep["gpus_per_worker"], callbacks=[EvalReport()],
                   resource_wait_s=sweep.get("resource_wait_s"), check_resources=False, keep_best=True)


def trial_resources(sweep: dict, fits_now: bool) -> dict:
    """What a trial asks Tune for. A one-worker trial that the cluster can place now asks for its
    worker's CPU (and GPU) and trains in its own process (`in_trial`): no Ray Train job, four processes
    and half a minute of start-up fewer per trial. Otherwise the trial asks for `TRIAL_CPUS` and fits a
    Ray Train job, whose workers wait up to `resource_wait_s` for an autoscaler to add their nodes."""
    if sweep["workers"] != 1 or not fits_now:
        return {"CPU": TRIAL_CPUS}
    return {"CPU": sweep["cpus_per_worker"] or 1.0, **({"GPU": sweep["gpus_per_worker"]} if sweep["use_gpu"] else {})}


def reported_metrics(cfg: Config) -> set[str]:
    """The names a trial of `cfg` reports to Tune with each evaluation."""
    from shortft.loop import STEP_METRICS

    evals = {OBJECTIVE, OBJECTIVE_SE, *(f"eval/{n}" for n in [cfg.eval.objective, *cfg.eval.terms])}
    return evals | {"reward", *(f"reward/{n}" for n in cfg.reward.trained())} | set(STEP_METRICS) | {
        "mean_seconds_per_step", "node_id"}


def combination_error(config: dict, sweep: dict) -> str | None:
    """The line of a trial whose searched values are valid alone but not together (`chain.steps=6` with
    `chain.segments=8`); None when its config is valid. A key or value that fails the same way alone on the
    base config (an unknown key, `lora.rank=-3`) raises its ConfigError: every trial that draws it would."""
    try:
        config_of_trial(config, sweep)
        return None
    except ConfigError as e:
        for key, value in searched_values(config).items():
            try:
                config_of_trial({key: value}, sweep)
            except ConfigError as alone:
                if str(alone) == str(e):  # (`chain.steps=3` alone fails on the base's segments: another line)
                    raise
        return str(e)


def _checked_resources(sweep: dict, config: dict) -> dict:
    # Tune calls this in the driver as it creates each trial: the place to refuse a bad config before
    # the trial starts (a ConfigError naming the key ends tune.run), and a request that can never fit.
    # Values valid one at a time but not together end that trial only (in its process, with the line):
    # a search drew them, and the sweep goes on.
    why = combination_error(config, sweep)
    if why:
        print(f"shortft: note: trial {config.get(TRIAL_KEY) or searched_values(config)} cannot run ({why}); it "
              "fails, and the sweep goes on", file=sys.stderr, flush=True)
    cfg = config_of_trial({} if why else config, sweep)
    metric = tune_metric()
    if metric is not None and metric not in reported_metrics(cfg):
        terms = ", ".join(f"eval/{n}" for n in dict.fromkeys([cfg.eval.objective, *cfg.eval.terms]))
        raise ConfigError(f"metric={metric!r}: a ShortFT trial never reports it; use {OBJECTIVE} (the "
                          f"evaluation objective, {cfg.eval.objective}), {terms}, loss or reward")
    if not sweep.get("_driver_ready"):  # once, in the driver, before the first trial
        verdict = resources.check(resources.Request(sweep["workers"], sweep["cpus_per_worker"] or 1.0,
                                                    sweep["gpus_per_worker"] if sweep["use_gpu"] else 0.0, TRIAL_CPUS))
        sweep["fits_now"] = verdict == "now"
        if sweep["tracking_uri"]:
            tracking.experiment_id(sweep["tracking_uri"], sweep["experiment"])  # creates the store's tables
            start_relay(sweep["tracking_uri"], RELAY)  # owned by the driver: lives as long as the sweep
        start_autoscaling_coordinator()
        sweep["_driver_ready"] = True
    return trial_resources(sweep, sweep["fits_now"])


def trainable(sweep: dict):
    """The Tune trainable of a sweep with these settings: `run_trial` with the settings bound, asking
    for `trial_resources` (the driver's first call checks the cluster can place them)."""
    bound = tune.with_parameters(run_trial, sweep=sweep)
    return tune.with_resources(bound, resources=partial(_checked_resources, dict(sweep)))


def trainable_for(base: str = "toy", *, smoke_test: bool = False, fixed: dict | None = None,
                  name: str = "from-python", tracking_uri: str | None = "", experiment: str = EXPERIMENT,
                  parent_run_id: str | None = None, workers: int = 1, gpus_per_worker: float = 0.0,
                  storage_path: str | None = None, output_root: str = "runs/sweeps",
                  resource_wait_s: float = RESOURCE_WAIT_S, threads: int | None = None) -> object:
    """A Tune trainable for ShortFT runs of config `base` (a built-in name or a YAML path), in the shape of
    Ray's examples: pass it to `tune.run` or `tune.Tuner` with a `config` of dotted keys
    (`{"chain.segments": tune.choice([2, 4, 8])}`); it reports `eval/objective` (maximise) and `step`.

    `fixed`: dotted keys every trial gets (`smoke_test` adds the smoke sizes: 2 steps of 10-step chains).
    `tracking_uri`: MLflow ("" = $MLFLOW_TRACKING_URI or sqlite:///mlflow.db, None = off); one run per
    trial, nested under `parent_run_id` when given. `workers`/`gpus_per_worker`: each trial's Ray Train
    job; one whose workers are not placed within `resource_wait_s` fails. `threads`: torch threads of each
    CPU worker (default: its CPUs, 1). Raises ConfigError (one line,
    naming the key) for a bad base, fixed key or value, name or count. A trial that fails leaves its MLflow
    run RUNNING unless `RunCloser(tracking_uri)` is among tune.run's callbacks (it closes it FAILED)."""
    import ray

    from shortft.ray_storage import check_storage_path, resolve_storage_path

    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        # tune.run will start a local Ray, whose processes inherit this environment: a laptop is not
        # preempted, so no preemption-watcher actor (one process start less per trial).
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # what fails every trial, here before Tune starts: a bad base config, fixed key, name or count
    check_at_least((("workers", workers, 1), ("threads", threads, 1)), whole=True)
    check_at_least((("gpus_per_worker", gpus_per_worker, 0), ("resource_wait_s", resource_wait_s, 1)))
    check_name("name", name, room=TRIAL_SUFFIX_BYTES)
    check_types(base, fixed=fixed or {})  # before they merge
    fixed = {**(SMOKE_TEST if smoke_test else {}), **(fixed or {})}
    trial_config(base, fixed, {})
    if tracking_uri == "":
        tracking_uri = tracking.default_tracking_uri()
    if tracking_uri:
        tracking_uri = tracking.resolve_uri(tracking_uri)  # credentials move to the environment
    storage_path = resolve_storage_path(storage_path)
    check_storage_path(storage_path)
    use_gpu = gpus_per_worker > 0
    sweep = settings(Space(name, base, fixed, {}, []), name, storage_path, str(Path(output_root).resolve() / name),
                     workers, use_gpu, gpus_per_worker or 1.0, None if use_gpu else 1.0, threads, tracking_uri,
                     experiment, parent_run_id, resource_wait_s)
    return trainable(sweep)
