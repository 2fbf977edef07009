"""The paper's comparison at equal compute: arms x seeds through the sweep's trainable, one budget.

    run_comparison("toy", arms=["shortft", "draft_lv", "drtune", "alignprop"], seeds=3, time_budget_s=300)

Each arm is a set of config overrides (`ARMS`). First each arm gets its own learning rate: one trial per
value of `lrs` at seed 0, the best final objective wins (so no arm loses for a rate tuned for another);
then the arm runs its other seeds at that rate. Every trial has the same budget (`train.time_budget_s`
or `train.call_budget`), prompts and evaluation (the config's held-out prompts, the original N-step
sampler, fixed seeds, its judge). Trials run one at a time, so the seconds of one arm are worth those of
another. Every evaluation each trial reported goes to `rows.jsonl` in `out`; `compare_report` turns
that into the table, the plot and the grids.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from shortft import raised, run_status
from shortft.arguments import OneLineParser, check_at_least, comma_items, name_too_long
from shortft.config import ConfigError, check_name, load_yaml, replaced
from shortft.hub import check_sources
from shortft.out_paths import output_folder, write_whole
from shortft.progress import quiet_libraries
from shortft.space import trial_config
from shortft.stats import finite
from shortft.sweep.baseline import evaluate_base
from shortft.sweep.compare_report import write_report
from shortft.sweep.ray_compat import trial_statuses
from shortft.sweep.results import UNFINISHED
from shortft.sweep.trials import OBJECTIVE, SMOKE_TEST, TRIAL_SUFFIX_BYTES, cpu_threads, trainable_for

ARMS: dict[str, dict] = {
    "shortft": {"chain.method": "shortft"},
    "shortft-no-timestep-aware": {"chain.method": "shortft", "lora.timestep_aware": False},
    "shortft-no-progressive": {"chain.method": "shortft", "train.progressive": False},
    "draft_lv": {"chain.method": "draft_lv"},
    "drtune": {"chain.method": "drtune"},
    "alignprop": {"chain.method": "alignprop"},
    "draft": {"chain.method": "draft", "chain.last_k": 1},
    "full": {"chain.method": "full", "chain.checkpointing": True},
}
MAIN = ("shortft", "draft_lv", "drtune", "alignprop")  # the paper's Table 1 comparison; the rest are ablations
class TrialFailed(RuntimeError):
    """No learning rate of an arm gave a finite objective: the comparison stops (its table would miss an arm)."""


KEPT = ("step", "train_seconds", "calls_total", "reward", "mean_seconds_per_step", "network_calls", "grad_calls")


def run_comparison(base: str, out: str | Path, arms: list[str] = tuple(ARMS), seeds: int = 3, ablation_seeds: int = 2,
                   lrs: list[float] = (3e-4, 1e-3, 3e-3), time_budget_s: float | None = None,
                   call_budget: int | None = None, fixed: dict | None = None, name: str = "compare",
                   tracking_uri: str | None = "", storage_path: str | None = None, smoke_test: bool = False,
                   progress=print) -> Path:
    """Run every arm (see the module docstring); returns the `rows.jsonl` written under `out`."""
    import ray
    from ray import tune

    from shortft import resources, tracking
    from shortft.ray_storage import check_storage_path, resolve_storage_path

    check_new(out, time_budget_s, call_budget, arms)
    budget = {"train.steps": 10**6, **({"train.time_budget_s": time_budget_s} if time_budget_s is not None else {}),
              **({"train.call_budget": call_budget} if call_budget is not None else {})}
    # the storage path and the MLflow store before Ray starts (a file as --storage-path was a line after it)
    storage_path = resolve_storage_path(storage_path)
    check_storage_path(storage_path)
    if tracking_uri == "":
        tracking_uri = tracking.default_tracking_uri()
    if tracking_uri:  # credentials out before comparison.json, the trials' configs and Ray see it
        tracking_uri = tracking.resolve_uri(tracking_uri)
    out = Path(out).resolve()
    rows_path, runs = out / "rows.jsonl", out / "runs"
    out.mkdir(parents=True, exist_ok=True)
    write_whole(rows_path, "")  # (renamed over: a link planted there is replaced, not written through)
    if not ray.is_initialized():
        resources.connect(log_to_driver=False)
    parent = parent_run(tracking_uri, name, out) if tracking_uri else None
    with run_status.kept(tracking_uri, parent):  # KILLED on Ctrl-C, FAILED on an error (it was left RUNNING)
        write_whole(out / "comparison.json", json.dumps({
            "base": base, "arms": list(arms), "seeds": seeds, "ablation_seeds": ablation_seeds, "lrs": list(lrs),
            "budget": budget, "fixed": fixed or {}, "smoke_test": smoke_test, "tracking_uri": tracking_uri,
            "parent_run_id": parent}, indent=1))
        # The untrained model on the same evaluation: what every arm's gain is measured from (loaded here,
        # as every arm's trials are: each hub source in this machine's cache or on the hub, else one line now).
        base_fixed = {**(SMOKE_TEST if smoke_test else {}), **(fixed or {})}  # as `trainable_for` merges them
        check_sources([trial_config(base, base_fixed, {})])
        base_eval = evaluate_base(base, base_fixed, out)
        progress(f"untrained base model: {OBJECTIVE} {base_eval[OBJECTIVE]:.3f}")
        # The checks of every arm before the first trial: a bad base, key or value fails in one line here.
        trainables = {arm: {} for arm in arms}
        for arm in arms:
            for phase in ("lr", "seeds"):
                trainables[arm][phase] = trainable_for(
                    base, smoke_test=smoke_test, fixed={**(fixed or {}), **ARMS[arm], **budget},
                    name=f"{name}-{arm}-{phase}", tracking_uri=tracking_uri, experiment="shortft-compare",
                    parent_run_id=parent, storage_path=storage_path, output_root=str(runs),
                    threads=cpu_threads(1, 1))  # one trial at a time
        for arm in arms:
            n_seeds = seeds if arm in MAIN else ablation_seeds
            lr_rows = _fit(trainables[arm]["lr"], {"train.lr": tune.grid_search(list(lrs)), "train.seed": 0},
                           f"{name}-{arm}-lr", storage_path, runs)
            best = choose_lr(lr_rows, arm)
            progress(f"{arm}: lr {best['lr']:g} (best of {len(lrs)}: "
                     + ", ".join(f"{r['lr']:g} -> {_said(r)}" for r in lr_rows) + ")")
            # A seed that fails is a row with its error (the table counts it out), not the end of the comparison.
            seed_rows = _fit(trainables[arm]["seeds"], {"train.lr": best["lr"],
                                                        "train.seed": tune.grid_search(list(range(1, n_seeds)))},
                             f"{name}-{arm}-seeds", storage_path, runs) if n_seeds > 1 else []
            for r in seed_rows:
                if "error" in r:
                    progress(f"{arm}: seed {r['seed']} failed ({r['error']})")
            with rows_path.open("a") as f:
                for r in [r for r in lr_rows if "error" not in r] + seed_rows:
                    chosen = r["lr"] == best["lr"]
                    f.write(json.dumps({"arm": arm, "lr_trials": len(lrs), "chosen": chosen, **r}) + "\n")
        report = write_report(rows_path, out, tracking_uri, parent)
        progress(f"report: {report}")
        if parent:
            tracking.client(tracking_uri).set_terminated(parent)
    return rows_path


def parent_run(tracking_uri: str, name: str, out: Path) -> str:
    """The comparison's MLflow parent run: the one `out` was started with (a comparison that stopped before
    its first row starts again), else a new one. Not found by `name`: another comparison of that name, in
    another folder or one already reported, keeps its own run, its nested trials and its report."""
    from mlflow.exceptions import MlflowException

    from shortft import tracking

    try:
        earlier = json.loads((out / "comparison.json").read_text())
    except (OSError, ValueError):
        earlier = {}
    if earlier.get("tracking_uri") == tracking_uri and earlier.get("parent_run_id"):
        try:
            if tracking.client(tracking_uri).get_run(earlier["parent_run_id"]).info.lifecycle_stage == "active":
                return earlier["parent_run_id"]
        except MlflowException:  # deleted for good (`mlflow gc`) or another store behind the same URI
            pass
    return tracking.ensure_run(tracking_uri, "shortft-compare", f"compare/{name}", name, reuse=False)


def check_new(out: str | Path, time_budget_s: float | None, call_budget: int | None, arms: list[str],
              base: str | None = None, fixed: dict | None = None) -> None:
    """A comparison's arms, budget, folder and (given `base`) base config with its `--set` keys, in one line
    before Ray starts (an unknown arm was refused after a local Ray had started)."""
    if not arms:  # `--arms ""`: minutes of the untrained model's evaluation, then a report of it alone
        raise ConfigError(f"--arms: name at least one arm, from {','.join(ARMS)}")
    output_folder("--out", out)  # a file: a traceback once Ray had started
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ConfigError(f"--arms {','.join(unknown)}: unknown; choose from {','.join(ARMS)}")
    if base is not None:
        trial_config(base, fixed or {}, {})
    if time_budget_s is None and call_budget is None:
        raise ConfigError("a comparison needs a budget: --time-budget-s or --call-budget (equal compute)")
    for flag, value in (("--time-budget-s", time_budget_s), ("--call-budget", call_budget)):
        if value is not None and not 0 < value < float("inf"):  # 0 was no budget: a million steps each
            raise ConfigError(f"{flag} {value}: give a budget > 0")
    rows = Path(out) / "rows.jsonl"
    if rows.is_file() and rows.stat().st_size:  # it was emptied: the earlier comparison's rows were lost
        raise ConfigError(f"--out {out} holds a comparison (rows.jsonl); pass another --name or --out, or "
                          "--report-only to write its report again")


def _said(row: dict) -> str:
    value = row["final"].get(OBJECTIVE) if "final" in row else None
    return f"{value:.3f}" if finite(value) is not None else f"failed ({row['error']})" if "error" in row else "not finite"


def choose_lr(rows: list[dict], arm: str) -> dict:
    """The seed-0 trial with the best final objective (the smaller rate on a tie). A rate that diverged (its
    trial failed, or its objective is not finite) is no candidate; before, a failed one ended the comparison,
    and a NaN objective first in the list won (`max` never replaces it)."""
    candidates = [r for r in rows if "error" not in r and finite(r["final"].get(OBJECTIVE)) is not None]
    if not candidates:
        raise TrialFailed(f"{arm}: no learning rate gave a finite objective: "
                          + "; ".join(f"{r['lr']:g} -> {_said(r)}" for r in rows))
    return max(candidates, key=lambda r: (r["final"][OBJECTIVE], -r["lr"]))


def _fit(trainable, param_space: dict, name: str, storage_path: str, runs: Path) -> list[dict]:
    """One Tuner, one trial at a time; per trial: its lr, seed, run folder, evaluations and final one, or for
    a trial that failed its `error` line."""
    from ray import tune

    tuner = tune.Tuner(trainable, param_space=param_space,
                       tune_config=tune.TuneConfig(metric=OBJECTIVE, mode="max", max_concurrent_trials=1),
                       run_config=tune.RunConfig(name=name, storage_path=storage_path, verbose=0))
    rows, grid = [], tuner.fit()
    if any(status in UNFINISHED for status in trial_statuses(grid).values()):  # Tune stopped on Ctrl-C: its
        raise KeyboardInterrupt(f"in {name}")  # trial cut short was counted as a whole seed, and the rest ran on
    for result in grid:
        if result.error:
            rows.append({"lr": float(result.config["train.lr"]), "seed": int(result.config["train.seed"]),
                         "error": raised.one_line(result.error)})
            continue
        evals = [{k: v for k, v in rec.items() if k in KEPT or k.startswith("eval/")}
                 for rec in result.metrics_dataframe.to_dict("records")]
        rows.append({"lr": float(result.config["train.lr"]), "seed": int(result.config["train.seed"]),
                     "run_dir": str(runs / name / f"{name}-{result.metrics['trial_id']}"),
                     "evals": evals, "final": evals[-1]})
    return sorted(rows, key=lambda r: (r["lr"], r["seed"]))


def parser():
    p = OneLineParser(prog="compare.py", description="ShortFT against the baselines at equal compute")
    p.add_argument("--config", default="toy", help="base config (built-in name or YAML path; default toy)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {','.join(ARMS)}")
    p.add_argument("--seeds", type=int, default=3, help=f"seeds of the main arms ({', '.join(MAIN)}); default 3")
    p.add_argument("--ablation-seeds", type=int, default=2, help="seeds of the other arms (default 2)")
    p.add_argument("--lrs", default="3e-4,1e-3,3e-3",
                   help="learning rates each arm tries at seed 0 (default 3e-4,1e-3,3e-3)")
    p.add_argument("--time-budget-s", type=float, help="training seconds per trial (evaluation excluded)")
    p.add_argument("--call-budget", type=int, help="network calls per trial (with gradient and without)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="fixed config keys for every arm")
    p.add_argument("--name", default="compare")
    p.add_argument("--out", default=None, help="results folder (default runs/compare/<name>)")
    p.add_argument("--storage-path", default=None, help="Ray Tune storage (default as the sweep's)")
    mlflow = p.add_mutually_exclusive_group()
    mlflow.add_argument("--tracking-uri", default="", help="MLflow (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    mlflow.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--smoke-test", action="store_true", help="the sweep's smoke sizes (10-step chains, batch 1, "
                   "one evaluation sample): a plumbing check; each trial still runs to the budget, so give a small one "
                   "(--call-budget 20)")
    p.add_argument("--report-only", action="store_true", help="write the report of an earlier run in --out")
    return p


def main(argv: list[str] | None = None) -> int:
    """`python tune/compare.py`: the comparison, then its report (docs/evidence.md)."""
    import sys

    p = parser()
    args = p.parse_args(argv)
    quiet_libraries()
    out = Path(args.out or f"runs/compare/{args.name}")
    try:
        lrs = learning_rates(args.lrs)
        if args.report_only:
            if not (out / "rows.jsonl").is_file():
                raise ConfigError(f"--out {out}: no rows.jsonl there; run the comparison first")
            print(f"report: {write_report(out / 'rows.jsonl', out)}")
            return 0
        # its trials are `<name>-<arm>-seeds-t001`: a name that left them no room (or held a /) failed every one
        check_name("--name", args.name, room=len(f"-{max(ARMS, key=len)}-seeds") + TRIAL_SUFFIX_BYTES)
        fixed = dict(_key_value(kv) for kv in args.set)
        for line in replaced(args.set):  # the dict keeps the last
            print(f"note: {line}", file=sys.stderr)
        arms = comma_items("--arms", args.arms)
        check_at_least((("--seeds", args.seeds, 1), ("--ablation-seeds", args.ablation_seeds, 1)), whole=True)
        check_new(out, args.time_budget_s, args.call_budget, arms, args.config,
                  {**(SMOKE_TEST if args.smoke_test else {}), **fixed})
        rows = run_comparison(args.config, out, arms, args.seeds,
                              args.ablation_seeds, lrs, args.time_budget_s, args.call_budget, fixed, args.name,
                              None if args.no_mlflow else args.tracking_uri, args.storage_path, args.smoke_test)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {name_too_long(e)}", file=sys.stderr)
        return 2
    except TrialFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        ended = (out / "rows.jsonl").is_file() and (out / "rows.jsonl").stat().st_size
        print(f"compare.py: interrupted{f' {e}' if str(e) else ''}; " + (
            f"{out / 'rows.jsonl'} holds the arms that ended (--report-only writes their report); a comparison starts "
            "over: run it again under another --name" if ended else "no arm had ended: the same command starts it "
            "over"), file=sys.stderr)
        return 130
    print(f"rows: {rows}")
    return 0


def learning_rates(text: str) -> list[float]:
    """`--lrs`: at least one rate, each finite and > 0 (`--lrs ,` left a grid of none, `nan` trained nothing)."""
    items = comma_items("--lrs", text)  # its own line (inside the try below, it was said twice)
    try:
        lrs = [float(v) for v in items]
    except ValueError as e:
        raise ConfigError(f"--lrs {text!r}: {e}") from None
    if not lrs or not all(math.isfinite(v) and v > 0 for v in lrs):
        raise ConfigError(f"--lrs {text!r}: give learning rates > 0, e.g. --lrs 3e-4,1e-3")
    if len(set(lrs)) < len(lrs):  # `1e-3,0.001`: one seed counted twice in the report, with a ± 0.000
        raise ConfigError(f"--lrs {text!r}: a learning rate is given twice; give each once")
    return lrs


def _key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.batch_size=2")
    return key, load_yaml(value)
