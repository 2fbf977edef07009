"""`run_sweep`: a whole sweep in one call. Checks every input before Ray starts, connects to (or starts)
Ray, opens the parent MLflow run, wires Tune (searcher, scheduler, callbacks) and writes the results."""

from __future__ import annotations

import datetime
import os
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ray import tune

from shortft import resources, run_status, tracking
from shortft.arguments import check_at_least
from shortft.config import ConfigError, check_name, to_dict
from shortft.hub import check_sources
from shortft.mlflow_relay import start_relay
from shortft.out_paths import write_whole
from shortft.ray_reports import BEST_AND_LATEST
from shortft.space import Space, check_default_space, configs, load_space, trial_config
from shortft.sweep import baseline as baseline_eval
from shortft.sweep import best as best_lora
from shortft.sweep import saved
from shortft.sweep.ray_compat import (canonical_address, ended_trials, restore_rungs, start_autoscaling_coordinator,
                                     study_of, trial_statuses)
from shortft.sweep.prune import Pruner
from shortft.sweep.results import finish_parent, markdown, results_table, write_table
from shortft.sweep.search import TIME_ATTR, scheduler, searcher
from shortft.sweep.trial_runs import RunCloser
from shortft.sweep.trials import (EXPERIMENT, OBJECTIVE, SMOKE_TEST, TRIAL_CPUS, TRIAL_SUFFIX_BYTES, cpu_threads,
                                  param_space, settings, stopped_early, trainable, trial_name)


def check_trial_folders(output_root: str, name: str) -> None:
    """A new sweep's trials may not start in folders that hold an earlier sweep's trial runs (its Tune state
    removed, or under another --storage-path): each trial was refused there, after Ray's start-up."""
    from shortft.new_run import holds_run

    root = Path(output_root)
    held = sorted(d.name for d in root.iterdir() if d.is_dir() and holds_run(d)) if root.is_dir() else []
    if held:
        raise ConfigError(f"sweep {name!r}: {root} holds an earlier sweep's trial runs ({', '.join(held[:3])}"
                          f"{', ...' if len(held) > 3 else ''}); pass another --name, or move that folder away")


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
    base: dict | None = None  # the untrained model's evaluation (`baseline`), None when not made
    unfinished: int = 0  # trials known unfinished (begun or not) when the sweep stopped (Ctrl-C); 0: it ended


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


def default_name(space: Space) -> str:
    return f"{space.name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def sweeps_in(storage_path: str) -> list[str]:
    """The sweeps under a storage path, a folder or a URI (`s3://...`: `--resume` without `--name` said
    "no sweep" there), oldest first (the last one: --resume without --name)."""
    if "://" in storage_path:
        import pyarrow.fs

        fs, root = pyarrow.fs.FileSystem.from_uri(storage_path)
        folders = [i.path for i in fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
                   if i.type == pyarrow.fs.FileType.Directory]
        found = [(i.mtime, i.path.rsplit("/", 2)[-2]) for i in fs.get_file_info([f"{f}/tuner.pkl" for f in folders])
                 if i.type == pyarrow.fs.FileType.File]
        return [name for _, name in sorted(found)]
    root = Path(storage_path)
    found = sorted((p for p in root.glob("*/tuner.pkl")), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    return [p.parent.name for p in found]


def run_sweep(space: str | Space | None = None, num_samples: int | None = None, config: str | None = None,
              name: str | None = None, storage_path: str | None = None, tracking_uri: str | None = "",
              experiment: str | None = None, workers_per_trial: int | None = None,
              gpus_per_worker: float | None = None, max_concurrent: int | None = None, address: str | None = None,
              resume: bool = False, smoke_test: bool | None = None, seed: int | None = None,
              output_root: str | None = None, resource_wait_s: float | None = None,
              baseline: bool = True) -> SweepResult:
    """Run (or resume) a sweep and return its `SweepResult` (the results table's rows, the best trial, the
    untrained model's evaluation, ...); see `main` for what each argument means.
    None means "not given": a new sweep takes the defaults (`saved.DEFAULTS`), a resumed one the values
    it started with (a given value that differs is refused). `baseline`: evaluate the untrained model
    once (a first row of the results; `sweep.baseline`)."""
    import ray

    from shortft.ray_storage import check_storage_path, resolve_storage_path

    t_start, cpu_start = time.time(), time.process_time()
    # 1. Everything a user can get wrong, before Ray starts.
    check_at_least((("--num-samples", num_samples, 1), ("--workers-per-trial", workers_per_trial, 1),
                    ("--max-concurrent", max_concurrent, 1), ("--seed", seed, 0)), whole=True)
    check_at_least((("--gpus-per-worker", gpus_per_worker, 0), ("--resource-wait-s", resource_wait_s, 1)))
    if seed is not None and seed >= 2**32:  # Optuna's sampler seeds numpy's RandomState
        raise ConfigError(f"--seed {seed}: must be < 2**32")
    if tracking_uri:
        tracking_uri = tracking.resolve_uri(tracking_uri)  # credentials move to the environment here
    storage_path = resolve_storage_path(storage_path)
    if name is not None:  # before it names a folder to read or write
        check_name("--name", name, room=TRIAL_SUFFIX_BYTES)
    where = ("pass --storage-path of the sweep: the one its first line printed (default: $SHORTFT_STORAGE_PATH where "
             "set, else ray_results in the folder it was started from)")
    if resume and "://" not in storage_path and not Path(storage_path).is_dir():  # before the check makes it
        raise ConfigError(f"--resume: no folder {storage_path}; {where}")
    check_storage_path(storage_path)
    if resume and not name:
        name = (sweeps_in(storage_path) or [None])[-1]
        if not name:
            raise ConfigError(f"--resume: no sweep under {storage_path}; pass --name, and {where.removeprefix('pass ')}")
    given = {"space": space if isinstance(space, (str, type(None))) else space.name, "config": config,
             "num_samples": num_samples, "workers_per_trial": workers_per_trial, "gpus_per_worker": gpus_per_worker,
             "max_concurrent": max_concurrent, "experiment": experiment, "smoke_test": smoke_test, "seed": seed,
             "resource_wait_s": resource_wait_s,
             # "" = not given; False = --no-mlflow. A resume logs where the sweep started, from any folder.
             "tracking_uri": None if tracking_uri == "" else (tracking_uri or False),
             "output_root": str(Path(output_root).resolve()) if output_root else None}
    values = saved.settle(given, storage_path, name, resume)
    if values["tracking_uri"] == "":  # a new sweep (or one stored before the URI was) takes the default
        values["tracking_uri"] = tracking.resolve_uri(tracking.default_tracking_uri())
    elif values["tracking_uri"] and tracking_uri == "":  # the stored one, checked again
        values["tracking_uri"] = tracking.resolve_uri(values["tracking_uri"])
    tracking_uri = values["tracking_uri"] or None
    values["output_root"] = values["output_root"] or str(Path("runs/sweeps").resolve())
    num_samples, workers_per_trial, gpus_per_worker = (values["num_samples"], values["workers_per_trial"],
                                                       values["gpus_per_worker"])
    max_concurrent, experiment, seed = values["max_concurrent"], values["experiment"], values["seed"]
    resource_wait_s = values["resource_wait_s"]
    if space is None and values["config"] and not resume:
        check_default_space(values["space"], values["config"])
    if not isinstance(space, Space):
        if values["smoke_test"]:  # the space as its real sweep runs it first: the smoke sizes fix some searched
            searched = load_space(values["space"], base=values["config"]).search  # keys, and a pair it refuses passed
            if dropped := [k for k in searched if k in SMOKE_TEST]:
                print(f"note: --smoke-test fixes {', '.join(f'{k}={SMOKE_TEST[k]}' for k in dropped)}, which the "
                      "space searches: its trials do not search them", file=sys.stderr)
        space = load_space(values["space"], base=values["config"],
                           overrides=SMOKE_TEST if values["smoke_test"] else None)
    if not name:  # the space's file name and the time: its trials' names must fit too
        name = default_name(space)
        check_name("the sweep's name (its space's file name and the time; pass --name)", name, room=TRIAL_SUFFIX_BYTES)
    exists = saved.sweep_exists(storage_path, name)
    if resume and not exists:
        there = sweeps_in(storage_path)[::-1]
        raise ConfigError(f"--resume: no sweep {name!r} under {storage_path}; " + (
            f"the sweeps there, newest first: {', '.join(there[:5])}{' ...' if len(there) > 5 else ''}; pass "
            "--name of one of them" if there else where))
    if exists and not resume:
        raise ConfigError(f"sweep {name!r} already exists under {storage_path}; pass --resume, or another --name")
    output_root = str(Path(values["output_root"]) / name)
    if not resume:
        check_trial_folders(output_root, name)
    address = None if ray.is_initialized() else canonical_address(address)
    # Every hub source of every trial, in this machine's hub cache or on the hub: else one line now, not a
    # half-minute of retries in the untrained model's evaluation and then in every trial, twice. Where the
    # trials load them on other machines (a cluster), a hub that cannot be asked from here is only told.
    check_sources(configs(space), here=not (address or ray.is_initialized()),
                  warn=lambda line: print(line, file=sys.stderr, flush=True))

    # 2. Ray: the given cluster, the one this machine is part of (`ray start`, e.g. a head node
    #    that `ray submit` runs this on), or else a local one.
    if not ray.is_initialized():
        if address:  # MLflow credentials go to the relay alone (`start_relay`), never to the job or its configs
            resources.connect(address=address)
        else:
            # With the dashboard (ray[default]): Ray Train's placement-group cleaner needs its state API to
            # release a finished or stopped trial's workers.
            resources.connect(num_cpus=max(4, os.cpu_count() or 1), logging_config=ray.LoggingConfig(log_level="ERROR"))
    check_storage_for_cluster(storage_path)
    # before any trial; "now" (not "later", when an autoscaler must add a node): one-worker trials train in-trial
    request = resources.Request(workers_per_trial, 1.0, gpus_per_worker, TRIAL_CPUS)
    verdict = resources.check(request)
    start_autoscaling_coordinator()
    if tracking_uri:
        start_relay(tracking_uri)  # on the driver's node: trials on other nodes log through it
    use_gpu = gpus_per_worker > 0
    if max_concurrent is None:  # a GPU cluster at its largest (the nodes its autoscaler may add too)
        max_concurrent = min(num_samples, resources.trials_at_most(request)) if use_gpu else 1
        if verdict == "later":
            print(f"note: up to {max_concurrent} trials at once, as the autoscaler adds nodes (--max-concurrent to "
                  "set it)", flush=True)
    threads = None if use_gpu else cpu_threads(workers_per_trial, max_concurrent)

    # 3. MLflow parent run: found again on --resume; a new sweep's own even where an earlier sweep of this name
    #    (another storage path, or its folder removed) left one in the store (it took that run over).
    parent = None
    if tracking_uri:
        parent = tracking.ensure_run(tracking_uri, experiment, f"sweep/{name}", name,
                                     tags={"shortft.sweep": name, "shortft.space": space.name}, reuse=resume)
        if not resume:
            tracking.log_dict_params(tracking_uri, parent, {
                "space": space.name, "base": space.base, "num_samples": num_samples,
                "workers_per_trial": workers_per_trial, "gpus_per_worker": gpus_per_worker, "seed": seed,
                "max_concurrent": max_concurrent, "smoke_test": values["smoke_test"],
                **{f"fixed.{k}": v for k, v in space.fixed.items()},
                **{f"search.{k}": f"{d.kind} {d.args}" for k, d in space.search.items()}})
    sweep_settings = settings(space, name, storage_path, output_root, workers_per_trial, use_gpu,
                              gpus_per_worker or 1.0, None if use_gpu else 1.0, threads, tracking_uri, experiment,
                              parent, resource_wait_s)
    sweep_settings.update(_driver_ready=True, fits_now=verdict == "now")  # checked, relay and coordinator started

    # 4-5 with the parent run closed KILLED or FAILED (with its line) if they raise: a second Ctrl-C, an
    # MLflow or Tune error left it RUNNING for ever
    with run_status.kept(tracking_uri, parent):
        # 4. Tune.
        # The sweep's state at most 1 s old, so that a killed driver's resume loses nothing: a trial writes no
        # checkpoint within 1 s of its start, and one that ended unsaved runs again from its own. At 0, Tune saved
        # (and synced to storage) at every pass of its loop, ~10 a second: the default sweep's driver took 20.4 s
        # of CPU against 6.4 s at 1 (docs/sweeps.md).
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
        trial_fn = trainable(sweep_settings)
        # The pruner last: a callback that raises before it makes Tune retry the trial, whose checkpoints must stay.
        callbacks = [*([RunCloser(tracking_uri, sweep_settings)] if tracking_uri else []), Pruner(sweep_settings)]
        run_config = tune.RunConfig(name=name, storage_path=storage_path,
                                    failure_config=tune.FailureConfig(max_failures=1),
                                    checkpoint_config=tune.CheckpointConfig(**BEST_AND_LATEST),
                                    callbacks=callbacks, verbose=1)
        print(f"sweep {name}: {num_samples} trials of space {space.name!r} (base {space.base}), "
              f"{max_concurrent} at a time, {workers_per_trial} worker(s) each; storage {storage_path}", flush=True)
        if resume:
            where = str(Path(storage_path) / name) if "://" not in storage_path else f"{storage_path}/{name}"
            try:
                tuner = tune.Tuner.restore(where, trainable=trial_fn, resume_unfinished=True, resume_errored=True,
                                           param_space=param_space(space))
            except (EOFError, pickle.UnpicklingError) as e:  # a driver killed as Tune wrote it (a traceback)
                raise ConfigError(f"--resume: the state of sweep {name!r} ({where}/tuner.pkl) is cut short or "
                                  f"unreadable ({type(e).__name__}); start it again under another --name") from None
            def ended_itself(result) -> bool:  # its function returned: not stopped by ASHA
                return not stopped_early(result.config, sweep_settings, result.metrics)

            if ended_trials(tuner) >= num_samples:  # (it printed its table again as if it had run them)
                print(f"note: sweep {name} had ended (its {num_samples} trials); nothing runs again", flush=True)
            if restore_rungs(tuner, TIME_ATTR, OBJECTIVE, ended_itself) is None:
                print("note: ASHA's rungs were not restored (Ray's scheduler moved; shortft/sweep/ray_compat.py): "
                      "its cut-offs weigh only the trials run from now", file=sys.stderr)
        else:
            saved.write(storage_path, name, values)  # only now: every check has passed, the sweep starts
            search = searcher(space, sweep_settings, seed=seed, max_concurrent=max_concurrent)
            tuner = tune.Tuner(trial_fn, param_space=param_space(space),
                               tune_config=tune.TuneConfig(search_alg=search, scheduler=scheduler(space),
                                                           num_samples=num_samples, reuse_actors=False),
                               run_config=run_config)
        out_dir = Path(output_root)
        untrained = baseline_eval.start(space, out_dir, sweep_settings) if baseline else None
        grid = tuner.fit()

        # 5. Results table (after the untrained model's row), best trial, parent run.
        base = untrained.result() if untrained else None
        rows = results_table(grid, space, sweep_settings, base, trial_statuses(grid))
        unfinished = sum(r["status"] == "UNFINISHED" for r in rows) + max(0, num_samples - len(rows))
        out_dir.mkdir(parents=True, exist_ok=True)
        table_path = write_table(rows, out_dir / "results.parquet")
        write_whole(out_dir / "results.md", markdown(rows, space, base))
        done = [r for r in rows if r["objective_best"] is not None]
        best = None
        if done:
            top = max(done, key=lambda r: r["objective_best"])
            values = {k: top[k] for k in space.search}
            best_cfg = trial_config(space.base, space.fixed, values, name=f"{name}-best")
            best = {"trial": top["trial"], "objective": top["objective_best"], "step": top["step_best"],
                    "values": values, "config": to_dict(best_cfg), "mlflow_run_id": top["mlflow_run_id"]}
            result = next(r for r in grid if (r.metrics or {}).get("trial_id") == top["trial_id"])
            folder = Path(output_root) / trial_name(result.config, sweep_settings, top["trial_id"])
            best["lora_dir"], best["lora_from"] = best_lora.export(result, top, best["config"], folder, out_dir)
        seconds = time.time() - t_start
        if parent:
            finish_parent(tracking_uri, parent, rows, best, study_of(tuner), table_path, out_dir, seconds, base,
                          "KILLED" if unfinished else "FINISHED", time.process_time() - cpu_start)
    return SweepResult(name, rows, best, table_path, parent, tracking_uri, seconds, storage_path, base, unfinished)
