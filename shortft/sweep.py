"""The sweep: Ray Tune + Optuna over a search space; every trial is a Ray Train job; MLflow tracks it all.

    from shortft.sweep import run_sweep
    result = run_sweep("toy", num_samples=6)          # what `python tune/sweep.py` runs
    print(result.best["objective"], result.table_path)

Pieces, for use with `ray.tune.run` / `Tuner` directly (see the README):
- `trainable(config)`: the Tune function trainable. `config` holds the trial's searched keys
  (`chain.segments`, ...) and, under "sweep", the constants of the sweep (`settings(...)`).
- `param_space(space, settings)`, `searcher(space, ...)`, `scheduler(space)`.

The objective is the fixed evaluation metric on held-out prompts (`eval/objective`), reported to Tune
at every `eval.every` steps; never the weighted training reward, which a searcher could inflate by
raising the weights. MLflow: one parent run per sweep; one nested child run per trial, created in the
driver as the searcher suggests the trial (SQLite has one writer), logged to by the trial's rank 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.search import ConcurrencyLimiter

from shortft import tracking
from shortft.config import ConfigError, to_dict
from shortft.mlflow_relay import start_relay
from shortft.space import Space, load_space, to_tune, trial_config

OBJECTIVE = "eval/objective"
MODE = "max"
SMOKE_TEST = {"train.steps": 2, "eval.every": 1, "chain.steps": 10, "eval.samples_per_prompt": 1,
              "train.batch_size": 1, "train.checkpoint_every": 0, "train.log_every": 1}
TRIAL_KEY = "trial_key"  # set by TrialRuns: t001, t002, ... (stable across a resumed driver)
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


# -- the trial -------------------------------------------------------------------------------------
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

    s = config["sweep"]
    key = config.get(TRIAL_KEY) or tune.get_context().get_trial_id()
    name = f"{s['name']}-{key}"
    cfg = trial_config(s["base"], s["fixed"], searched_values(config), name=name)
    cfg.train.output_dir = str(Path(s["output_root"]) / name)
    run_id = config.get(RUN_ID_KEY)
    if s["tracking_uri"] and not run_id:  # used without TrialRuns (e.g. plain OptunaSearch): own child run
        run_id = tracking.ensure_trial_run(s["tracking_uri"], s["experiment"], name, cfg, s["parent_run_id"])
    train_with_ray(cfg, s["workers"], use_gpu=s["use_gpu"], storage_path=s["storage_path"],
                   tracking_uri=s["tracking_uri"], experiment=s["experiment"], resume=True,
                   cpus_per_worker=s["cpus_per_worker"], run_id=run_id, name=name, threads=s["threads"],
                   gpus_per_worker=s["gpus_per_worker"], callbacks=[EvalReport()])


# -- search and scheduling ------------------------------------------------------------------------
class TrialRuns(ConcurrencyLimiter):
    """Caps concurrency and, as each trial is suggested, creates its nested MLflow run here in the
    driver. Trials are numbered in suggestion order; a resumed driver that suggests trial n again
    finds the run it made before the crash instead of making a second one."""

    def __init__(self, searcher, max_concurrent: int, sweep_settings: dict):
        super().__init__(searcher, max_concurrent)
        self.sweep_settings, self.count = sweep_settings, 0

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        if not isinstance(config, dict):
            return config
        self.count += 1
        key = f"t{self.count:03d}"
        config[TRIAL_KEY] = key
        s = self.sweep_settings
        if s["tracking_uri"]:
            name = f"{s['name']}-{key}"
            cfg = trial_config(s["base"], s["fixed"], searched_values(config), name=name)
            config[RUN_ID_KEY] = tracking.ensure_trial_run(s["tracking_uri"], s["experiment"], name, cfg,
                                                           s["parent_run_id"])
        return config


def searcher(space: Space, sweep_settings: dict, seed: int = 0, max_concurrent: int = 1):
    """Seeded Optuna TPE, starting from the space's points_to_evaluate, wrapped by TrialRuns."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    inner = OptunaSearch(metric=OBJECTIVE, mode=MODE, points_to_evaluate=space.points_to_evaluate or None,
                         sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=3))
    return TrialRuns(inner, max_concurrent, sweep_settings)


def scheduler(space: Space):
    """ASHA on the evaluation objective, in training steps: a trial is first judged at its first evaluation."""
    from ray.tune.schedulers import ASHAScheduler

    cfg = trial_config(space.base, space.fixed, {k: d.corners()[0] for k, d in space.search.items()})
    every = cfg.eval.every or cfg.train.steps
    return ASHAScheduler(time_attr="step", metric=OBJECTIVE, mode=MODE, max_t=cfg.train.steps,
                         grace_period=min(every, cfg.train.steps), reduction_factor=2)


class RunCloser(tune.Callback):
    """Driver side: a trial that ends, is stopped early or fails gets its MLflow run closed with that
    status (an ASHA stop kills the trial's Train job before it could close the run itself)."""

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, "FAILED")

    def _close(self, trial, status: str) -> None:
        run_id = trial.config.get(RUN_ID_KEY)
        if not run_id:
            return
        c = tracking.client(self.tracking_uri)
        early = status == "FINISHED" and _stopped_early(trial.config, trial.last_result or {})
        c.set_tag(run_id, "shortft.trial_status", "stopped early" if early else status.lower())
        c.set_terminated(run_id, status)


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


# -- the whole sweep ---------------------------------------------------------------------------------
@dataclass
class SweepResult:
    name: str
    rows: list[dict]
    best: dict | None
    table_path: Path
    parent_run_id: str | None
    tracking_uri: str | None
    seconds: float
    storage_path: str


def _table(results, space: Space) -> list[dict]:
    """One row per trial: searched values, final and best objective, reward terms, speed, memory, status."""
    rows = []
    for r in results:
        cfg = r.config or {}
        m = r.metrics or {}
        history = r.metrics_dataframe
        best = float(history[OBJECTIVE].max()) if history is not None and OBJECTIVE in history else None
        row = {"trial": cfg.get(TRIAL_KEY) or m.get("trial_id"), "trial_id": m.get("trial_id"),
               "status": "ERROR" if r.error else ("STOPPED_EARLY" if _stopped_early(cfg, m) else "DONE"),
               **{k: cfg.get(k) for k in space.search},
               "objective_final": m.get(OBJECTIVE), "objective_best": best, "steps": m.get("step"),
               **{k: v for k, v in m.items() if k.startswith("eval/") and k != OBJECTIVE},
               **{f"train/{k}": v for k, v in m.items() if k.startswith("reward")},
               "seconds_per_step": m.get("mean_seconds_per_step"), "peak_memory_mb": m.get("peak_memory_mb"),
               "node_id": m.get("node_id"), "mlflow_run_id": cfg.get(RUN_ID_KEY)}
        rows.append(row)
    return sorted(rows, key=lambda row: str(row["trial"]))


def _stopped_early(config: dict, last_result: dict) -> bool:
    """The trial's last reported step is short of the steps its config plans (ASHA stopped it)."""
    if "sweep" not in config:
        return False
    s = config["sweep"]
    return last_result.get("step", 0) < trial_config(s["base"], s["fixed"], searched_values(config)).train.steps


def write_table(rows: list[dict], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = pa.Table.from_pylist([{k: row.get(k) for k in columns} for row in rows])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def _finish_parent(uri: str, run_id: str, rows: list[dict], best: dict | None, study, table_path: Path,
                   out_dir: Path, seconds: float) -> None:
    """Best trial's config and objective, Optuna's plots and the results table, on the parent run."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    import yaml

    c = tracking.client(uri)
    c.log_artifact(run_id, str(table_path))
    csv = out_dir / "results.csv"
    pacsv.write_csv(pq.read_table(table_path), csv)
    c.log_artifact(run_id, str(csv))
    c.log_metric(run_id, "sweep_seconds", seconds)
    c.log_metric(run_id, "trials", len(rows))
    if best:
        c.log_metric(run_id, "best_objective", best["objective"])
        c.set_tag(run_id, "best_trial", best["trial"])
        (out_dir / "best_config.yaml").write_text(yaml.safe_dump(best["config"], sort_keys=False))
        c.log_artifact(run_id, str(out_dir / "best_config.yaml"))
    for name, path in _optuna_plots(study, out_dir).items():
        c.log_artifact(run_id, str(path), "optuna")
    c.set_terminated(run_id, "FINISHED")


def _optuna_plots(study, out_dir: Path) -> dict:
    """Optimisation history and parameter importances as PNGs (importance needs >= 2 finished trials)."""
    import optuna

    if study is None or not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        return {}
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    out = {}
    for name, plot in (("optimization_history", ovm.plot_optimization_history),
                       ("param_importances", ovm.plot_param_importances)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = plot(study)
            path = out_dir / f"{name}.png"
            ax.figure.savefig(path, bbox_inches="tight", dpi=100)
            plt.close(ax.figure)
            out[name] = path
        except Exception as e:  # a plot Optuna cannot draw yet (too few trials) is skipped, not fatal
            print(f"optuna {name} plot skipped: {type(e).__name__}: {e}", file=sys.stderr)
    return out


def check_storage_for_cluster(storage_path: str) -> None:
    """Trials on other nodes need storage every node shares (Ray no longer syncs trial files to the
    head): refuse a local path when the cluster has several nodes, or when this node cannot run trials
    itself (a head with no CPUs for them, whose workers come up later)."""
    import ray

    if "://" in storage_path or os.environ.get("SHORTFT_SHARED_STORAGE"):
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.get_runtime_context().get_node_id()
    local_cpus = next((n["Resources"].get("CPU", 0) for n in nodes if n["NodeID"] == here), 0)
    if len(nodes) > 1 or local_cpus == 0:
        raise ConfigError(f"--storage-path {storage_path}: a local directory, but trials run on other nodes of this "
                          f"{len(nodes)}-node cluster; pass shared storage (s3://bucket/path, gs://bucket/path) or "
                          "an NFS path mounted on every node, with SHORTFT_SHARED_STORAGE=1")


def _start_autoscaling_coordinator() -> None:
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


def default_name(space: Space) -> str:
    return f"{space.name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def latest_sweep(storage_path: str) -> str | None:
    """The most recent sweep under a local storage path (for --resume without --name)."""
    root = Path(storage_path)
    found = sorted((p for p in root.glob("*/tuner.pkl")), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    return found[-1].parent.name if found else None


def run_sweep(space: str | Space = "toy", num_samples: int = 6, config: str | None = None, name: str | None = None,
              storage_path: str | None = None, tracking_uri: str | None = "", experiment: str = EXPERIMENT,
              workers_per_trial: int = 1, gpus_per_worker: float = 0.0, max_concurrent: int | None = None,
              address: str | None = None, resume: bool = False, smoke_test: bool = False, seed: int = 0,
              output_root: str | None = None) -> SweepResult:
    """Run (or resume) a sweep and return its results table; see `main` for what each argument means."""
    import ray

    from shortft.distributed import check_storage_path

    t_start = time.time()
    # 1. Everything a user can get wrong, before Ray starts.
    if num_samples < 1:
        raise ConfigError(f"--num-samples {num_samples}: must be >= 1")
    if workers_per_trial < 1:
        raise ConfigError(f"--workers-per-trial {workers_per_trial}: must be >= 1")
    if gpus_per_worker < 0:
        raise ConfigError(f"--gpus-per-worker {gpus_per_worker}: must be >= 0")
    if max_concurrent is not None and max_concurrent < 1:
        raise ConfigError(f"--max-concurrent {max_concurrent}: must be >= 1")
    if not isinstance(space, Space):
        space = load_space(space, base=config, overrides=SMOKE_TEST if smoke_test else None)
    if tracking_uri == "":
        tracking_uri = tracking.default_tracking_uri()
    if tracking_uri:
        tracking.check_tracking_uri(tracking_uri)
        tracking_uri = tracking.absolute_uri(tracking_uri)
    storage_path = storage_path or str(Path("ray_results").resolve())
    check_storage_path(storage_path)
    if resume and not name:
        name = latest_sweep(storage_path)
        if not name:
            raise ConfigError(f"--resume: no sweep under {storage_path}; pass --name and --storage-path of the sweep")
    name = name or default_name(space)
    exists = (Path(storage_path) / name / "tuner.pkl").is_file() if "://" not in storage_path else resume
    if resume and not exists:
        raise ConfigError(f"--resume: no sweep {name!r} under {storage_path}")
    if exists and not resume:
        raise ConfigError(f"sweep {name!r} already exists under {storage_path}; pass --resume, or another --name")
    output_root = str(Path(output_root or "runs/sweeps").resolve() / name)

    # 2. Ray: the given cluster, the one this machine is part of (`ray start`, e.g. a head node
    #    that `ray submit` runs this on), or else a local one.
    local_ray = False
    if not ray.is_initialized():
        from ray._private.services import canonicalize_bootstrap_address

        address = canonicalize_bootstrap_address(address) if address != "local" else None
        if address:
            ray.init(address=address)
        else:
            # No dashboard (seconds of start-up and ~0.3 GB on a laptop); without it Ray Train's placement-group
            # cleaner cannot query actor states and warns every second, so workers log errors only.
            # A laptop is not preempted: no preemption-watcher actor (one process start less per trial).
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
            ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
                     logging_config=ray.LoggingConfig(log_level="ERROR"))
            local_ray = True
    check_storage_for_cluster(storage_path)
    _start_autoscaling_coordinator()
    if tracking_uri:
        start_relay(tracking_uri)  # on the driver's node: trials on other nodes log through it
    use_gpu = gpus_per_worker > 0
    if max_concurrent is None:
        gpus = float(ray.cluster_resources().get("GPU", 0))
        max_concurrent = max(1, int(gpus // (workers_per_trial * gpus_per_worker))) if use_gpu else 1
    threads = None if use_gpu else max(1, (os.cpu_count() or 1) // (workers_per_trial * max_concurrent))

    # 3. MLflow parent run (found again on --resume).
    parent = None
    if tracking_uri:
        parent = tracking.ensure_run(tracking_uri, experiment, f"sweep/{name}", name,
                                     tags={"shortft.sweep": name, "shortft.space": space.name})
        if not resume:
            tracking.log_dict_params(tracking_uri, parent, {
                "space": space.name, "base": space.base, "num_samples": num_samples,
                "workers_per_trial": workers_per_trial, "gpus_per_worker": gpus_per_worker,
                **{f"fixed.{k}": v for k, v in space.fixed.items()},
                **{f"search.{k}": f"{d.kind} {d.args}" for k, d in space.search.items()}})
    s = settings(space, name, storage_path, output_root, workers_per_trial, use_gpu, gpus_per_worker or 1.0,
                 None if use_gpu else 1.0, threads, tracking_uri, experiment, parent)

    # 4. Tune.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")  # save sweep state at every event: resumes lose nothing
    trial_fn = tune.with_resources(trainable, {"CPU": TRIAL_CPUS})
    callbacks = [RunCloser(tracking_uri)] if tracking_uri else []
    if local_ray and max_concurrent == 1:
        callbacks.append(PlacementGroupReaper(TRIAL_CPUS))
    run_config = tune.RunConfig(name=name, storage_path=storage_path, failure_config=tune.FailureConfig(max_failures=1),
                                callbacks=callbacks, verbose=1)
    print(f"sweep {name}: {num_samples} trials of space {space.name!r} (base {space.base}), "
          f"{max_concurrent} at a time, {workers_per_trial} worker(s) each; storage {storage_path}", flush=True)
    if resume:
        tuner = tune.Tuner.restore(str(Path(storage_path) / name) if "://" not in storage_path else f"{storage_path}/{name}",
                                   trainable=trial_fn, resume_unfinished=True, resume_errored=True,
                                   param_space=param_space(space, s))
    else:
        search = searcher(space, s, seed=seed, max_concurrent=max_concurrent)
        tuner = tune.Tuner(trial_fn, param_space=param_space(space, s),
                           tune_config=tune.TuneConfig(search_alg=search, scheduler=scheduler(space),
                                                       num_samples=num_samples, reuse_actors=False),
                           run_config=run_config)
    grid = tuner.fit()

    # 5. Results table, best trial, parent run.
    rows = _table(grid, space)
    out_dir = Path(output_root)
    out_dir.mkdir(parents=True, exist_ok=True)
    table_path = write_table(rows, out_dir / "results.parquet")
    done = [r for r in rows if r["objective_best"] is not None]
    best = None
    if done:
        top = max(done, key=lambda r: r["objective_best"])
        values = {k: top[k] for k in space.search}
        best_cfg = trial_config(space.base, space.fixed, values, name=f"{name}-best")
        best = {"trial": top["trial"], "objective": top["objective_best"], "values": values,
                "config": to_dict(best_cfg), "mlflow_run_id": top["mlflow_run_id"]}
    seconds = time.time() - t_start
    if parent:
        _finish_parent(tracking_uri, parent, rows, best, _study_of(tuner), table_path, out_dir, seconds)
    return SweepResult(name, rows, best, table_path, parent, tracking_uri, seconds, storage_path)


def _study_of(tuner):
    """The Optuna study behind the searcher (for its plots); None if it cannot be reached."""
    try:
        alg = tuner._local_tuner._tune_config.search_alg
        return alg.searcher._ot_study
    except AttributeError:
        return None


# -- command line -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tune/sweep.py", description="ShortFT sweep: Ray Tune + Optuna + MLflow.")
    p.add_argument("--space", default="toy", help="built-in space name or YAML path (default: toy)")
    p.add_argument("--config", default=None, help="base config (name or YAML path); default: the space's base")
    p.add_argument("--num-samples", type=int, default=6, help="trials in all (default 6)")
    p.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers per trial")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (0 = CPU)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: cluster GPUs / GPUs per trial; 1 on CPU)")
    p.add_argument("--tracking-uri", default="", help="MLflow URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--experiment", default=EXPERIMENT, help=f"MLflow experiment (default {EXPERIMENT})")
    p.add_argument("--storage-path", default=os.environ.get("SHORTFT_STORAGE_PATH"),
                   help="where Tune and Train keep state: a local dir, s3://..., or NFS (default: ./ray_results)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="Ray cluster address (auto on a head node)")
    p.add_argument("--name", default=None, help="sweep name (default: <space>-<date>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the sweep --name (default: the latest) from storage; give the flags it started with")
    p.add_argument("--smoke-test", action="store_true", help="2 steps per trial, tiny evaluation: checks the plumbing")
    p.add_argument("--seed", type=int, default=0, help="Optuna sampler seed")
    args = p.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        result = run_sweep(args.space, args.num_samples, args.config, args.name, args.storage_path,
                           None if args.no_mlflow else args.tracking_uri, args.experiment, args.workers_per_trial,
                           args.gpus_per_worker, args.max_concurrent, args.address, args.resume, args.smoke_test,
                           args.seed)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\nsweep {result.name}: {len(result.rows)} trials in {result.seconds:.0f} s; results: {result.table_path}")
    if result.best:
        print(f"best trial {result.best['trial']}: {OBJECTIVE} {result.best['objective']:.4f} with "
              + ", ".join(f"{k}={v}" for k, v in result.best["values"].items()))
    if result.tracking_uri:
        print(f"compare the runs: mlflow ui --backend-store-uri {result.tracking_uri}")
    failed = [r["trial"] for r in result.rows if r["status"] == "ERROR"]
    if failed:
        print(f"{len(failed)} trial(s) failed: {', '.join(map(str, failed))}; their error.txt is under "
              f"{result.storage_path}/{result.name}", file=sys.stderr)
    return 0 if result.best else 1
