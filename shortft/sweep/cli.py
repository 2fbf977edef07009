"""The sweep's command line (`python tune/sweep.py`, which `ray submit` runs on the head node)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from shortft import tracking
from shortft.arguments import OneLineParser, name_too_long
from shortft.config import ConfigError
from shortft.progress import quiet_libraries
from shortft.sweep.runner import run_sweep
from shortft.sweep.trials import EXPERIMENT, OBJECTIVE


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="tune/sweep.py", description="ShortFT sweep: Ray Tune + Optuna + MLflow.")
    p.add_argument("--space", default=None, help="built-in space name (sd15, toy) or YAML path (default: toy, for the toy config: a --config of "
                        "another model needs its own)")
    p.add_argument("--config", default=None, help="base config (name or YAML path); default: the space's base")
    p.add_argument("--num-samples", type=int, default=None, help="trials in all (default 6)")
    p.add_argument("--workers-per-trial", type=int, default=None, help="Ray Train workers per trial (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per worker (default 0 = CPU)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: what the cluster's GPUs hold, autoscaled nodes included; 1 on CPU)")
    mlflow = p.add_mutually_exclusive_group()  # both given: one was ignored without a word
    mlflow.add_argument("--tracking-uri", default="", help="MLflow URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    mlflow.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--experiment", default=None, help=f"MLflow experiment (default {EXPERIMENT})")
    p.add_argument("--storage-path", default=os.environ.get("SHORTFT_STORAGE_PATH"),
                   help="where Tune and Train keep state: a local dir, s3://..., or NFS (default: "
                        "$SHORTFT_STORAGE_PATH, else ./ray_results)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="Ray cluster address (default: $RAY_ADDRESS; "
                   "auto on a head node)")
    p.add_argument("--name", default=None, help="sweep name (default: <space>-<date>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the sweep --name (default: the latest) as it started: its space, config and sizes "
                        "are stored with it; a flag that differs is refused")
    p.add_argument("--smoke-test", action="store_const", const=True, default=None,
                   help="2 steps per trial, tiny evaluation: checks the plumbing")
    p.add_argument("--seed", type=int, default=None, help="Optuna sampler seed (default 0)")
    p.add_argument("--resource-wait-s", type=float, default=None,
                   help="a trial whose workers the cluster cannot place within this many seconds ends as ERROR "
                        "and the sweep goes on (default 1800; an autoscaler may need minutes to add a node)")
    p.add_argument("--no-baseline", action="store_true",
                   help="do not evaluate the untrained model (the results' first row, one evaluation per sweep)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    quiet_libraries()
    try:
        result = run_sweep(args.space, args.num_samples, args.config, args.name, args.storage_path,
                           None if args.no_mlflow else args.tracking_uri, args.experiment, args.workers_per_trial,
                           args.gpus_per_worker, args.max_concurrent, args.address, args.resume, args.smoke_test,
                           args.seed, resource_wait_s=args.resource_wait_s, baseline=not args.no_baseline)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {name_too_long(e)}", file=sys.stderr)
        return 2
    print("\n" + (result.table_path.parent / "results.md").read_text(), end="")
    n = len(result.rows)
    print(f"\nsweep {result.name}: {n} trial{'s' * (n != 1)} in {result.seconds:.0f} s"
          f"{' (this resume)' if args.resume else ''}; results: {result.table_path} (and results.md)")
    best = result.best
    if best:
        print(f"best trial {best['trial']}: {OBJECTIVE} {best['objective']:.4f} at step {best['step']} with "
              + ", ".join(f"{k}={v}" for k, v in best["values"].items()))
        if best.get("lora_dir"):
            lora = best["lora_dir"]
            print(f"its LoRAs at that step: {lora}; draw with them: shortft sample --config {lora.parent / 'config.yaml'} "
                  f"--lora {lora} --prompt \"...\"")
        else:
            print(f"sweep {result.name}: {best['lora_from']}", file=sys.stderr)
    if result.tracking_uri:
        print(tracking.ui_line(result.tracking_uri))
    if result.unfinished:  # Ctrl-C: Tune stopped the sweep and kept its state
        print(f"sweep {result.name} stopped before its end (Tune kept its state): the table holds the trials so far; "
              f"continue it with: python {_script()} --name {result.name} --resume --storage-path "
              f"{result.storage_path} (on a cluster: ray submit <cluster yaml> tune/sweep.py -- --name "
              f"{result.name} --resume)", file=sys.stderr)
        return 130
    failed = [r for r in result.rows if r["status"] == "ERROR"]
    if failed:
        print(f"{len(failed)} trial(s) failed: {', '.join(str(r['trial']) for r in failed)}; their error.txt is under "
              f"{result.storage_path}/{result.name}", file=sys.stderr)
        for r in failed:  # the reason of each (out of GPU memory, say, with the settings that fit)
            print(f"  {r['trial']}: {r.get('error') or 'no reason kept'}", file=sys.stderr)
    return 0 if result.best else 1


def _script() -> str:
    """This script as it was run (`python sweep.py` in the folder `ray submit` copies it to, a path from
    elsewhere): `tune/sweep.py` named a file only from the project's folder."""
    given = sys.argv[0] if sys.argv and sys.argv[0].endswith(".py") else "tune/sweep.py"
    return shlex.quote(given)
