"""Where a finished sweep's wall time went: training steps, evaluations, the untrained model's
evaluation, and everything else (Ray, Tune, Train and MLflow start-up and hand-over), from what MLflow
recorded.

    python tune/overhead.py [--tracking-uri sqlite:///mlflow.db] [--name <sweep>]   # default: latest sweep
"""

import argparse
import sys

from mlflow.tracking import MlflowClient

from shortft.arguments import OneLineParser
from shortft.config import ConfigError
from shortft.tracking import check_tracking_uri, default_tracking_uri, sqlite_path, take_credentials


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="overhead.py", description="Where a sweep's wall time went.")
    p.add_argument("--tracking-uri", default=None, help="the sweep's MLflow store (default $MLFLOW_TRACKING_URI or "
                   "sqlite:///mlflow.db)")
    p.add_argument("--experiment", default="shortft-sweeps")
    p.add_argument("--name", default=None, help="sweep name (default: the latest)")
    return p


def main() -> int:
    args = parser().parse_args()
    args.tracking_uri = take_credentials(args.tracking_uri or default_tracking_uri())  # as the sweep's own
    store = sqlite_path(args.tracking_uri)
    if store is not None and not store.is_file():  # MLflow would make an empty store there
        print(f"error: --tracking-uri {args.tracking_uri}: no such store; give the sweep's", file=sys.stderr)
        return 2
    try:  # a path, `bogus://x`: MLflow's tracebacks
        check_tracking_uri(args.tracking_uri)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = MlflowClient(args.tracking_uri)
    exp = c.get_experiment_by_name(args.experiment)
    runs = c.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"]) if exp else []
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and "sweep_seconds" in r.data.metrics]
    parent = next((r for r in parents if args.name in (None, r.info.run_name)), None)
    if parent is None:
        which = f"sweep {args.name!r}" if args.name else "finished sweep"
        print(f"error: no {which} in experiment {args.experiment!r} of {args.tracking_uri} (a sweep's parent run "
              "gets its sweep_seconds when the sweep ends)", file=sys.stderr)
        return 2
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    train = sum(m.value for ch in children for m in c.get_metric_history(ch.info.run_id, "seconds_per_step"))
    evals = sum(m.value for ch in children for m in c.get_metric_history(ch.info.run_id, "eval_seconds"))
    steps = sum(len(c.get_metric_history(ch.info.run_id, "seconds_per_step")) for ch in children)
    wall = parent.data.metrics["sweep_seconds"]
    base = parent.data.metrics.get("base/seconds", 0.0)
    # on CPUs it runs before the first trial; on GPUs beside the trials, so it is not part of the wall's sum
    beside = float(parent.data.params.get("gpus_per_worker", 0)) > 0
    rest = wall - train - evals - (0.0 if beside else base)
    print(f"sweep {parent.info.run_name}: {len(children)} trials, {steps} steps, wall {wall:.0f} s")
    print(f"  training steps {train:.0f} s ({train / wall:.0%}), evaluations {evals:.0f} s ({evals / wall:.0%}), "
          f"the untrained model {base:.0f} s ({'beside the trials' if beside else f'{base / wall:.0%}'}), "
          f"the rest {rest:.0f} s ({rest / wall:.0%}, {rest / max(1, len(children)):.0f} s per trial)")
    if "driver_cpu_seconds" in parent.data.metrics:  # Tune's loop, its state saves, the searcher: a core it takes
        cpu = parent.data.metrics["driver_cpu_seconds"]
        print(f"  the driver's own CPU time {cpu:.1f} s ({cpu / wall:.1%} of one core)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
