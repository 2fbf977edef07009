"""What a sweep leaves behind: the results table (Parquet and CSV, one row per trial), the best trial,
Optuna's plots, all logged to the sweep's parent MLflow run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from shortft import raised, stats, tracking
from shortft.evaluate import scalars
from shortft.out_paths import whole, write_whole
from shortft.space import Space
from shortft.sweep import best as best_lora
from shortft.sweep.baseline import searched_evaluation_keys
from shortft.sweep.eval_report import NOT_TERMS, OBJECTIVE_SAMPLES
from shortft.sweep.trials import OBJECTIVE, OBJECTIVE_SE, RUN_ID_KEY, TRIAL_KEY, stopped_early

SAMPLES = "objective_samples"  # a row's objective on each sample of its best evaluation, by prompt (Parquet, not CSV)
UNFINISHED = ("PENDING", "RUNNING", "PAUSED")  # Tune's statuses of the trials a stopped sweep had not finished


def unfinished(metrics: dict, statuses: dict[str, str] | None) -> bool:
    """A trial Tune had not finished when the sweep stopped (Ctrl-C): pending or running by its status, or
    without one reported step (ASHA stops a trial at a reported evaluation; Tune's graceful stop marks the
    trial it interrupts TERMINATED, and a resume runs it again)."""
    return (statuses or {}).get(metrics.get("trial_id")) in UNFINISHED or "step" not in metrics


def results_table(results, space: Space, sweep: dict, base: dict | None = None,
                  statuses: dict[str, str] | None = None) -> list[dict]:
    """One row per trial: searched values, final and best objective, reward terms, speed, memory, status;
    with `base` (the untrained model's evaluation) the best evaluation's gain over it and that gain's
    standard error sample by sample (`gain`, `gain_se`). `statuses` (trial id -> Tune's status): a trial the
    sweep had not finished when it was stopped is UNFINISHED (it read as STOPPED_EARLY, ASHA's stop)."""
    pairs = not searched_evaluation_keys(space)  # else trials differ in what their samples are
    rows = []
    for r in results:
        cfg = r.config or {}
        m = r.metrics or {}
        if not r.error and "step" not in m and not any(k in cfg for k in space.search):
            continue  # a trial a Ctrl-C left PENDING before it had its values: a row of dashes, by its Tune id
        history = r.metrics_dataframe
        best, se, samples, step = None, None, None, None  # the best evaluation: objective, se, samples, step
        if history is not None and OBJECTIVE in history and history[OBJECTIVE].notna().any():
            at = history[OBJECTIVE][::-1].idxmax()  # of equal ones the last: the one Ray keeps (sweep/best.py)
            best = float(history[OBJECTIVE][at])
            step = int(history["step"][at]) if "step" in history else None
            se = float(history[OBJECTIVE_SE][at]) if OBJECTIVE_SE in history else None
            value = history[OBJECTIVE_SAMPLES][at] if OBJECTIVE_SAMPLES in history else None
            samples = value if pairs and isinstance(value, list) else None
        gain = stats.paired(samples, (base or {}).get(OBJECTIVE_SAMPLES))
        row = {"trial": cfg.get(TRIAL_KEY) or m.get("trial_id"), "trial_id": m.get("trial_id"),
               "status": "ERROR" if r.error else "UNFINISHED" if unfinished(m, statuses)
               else ("STOPPED_EARLY" if stopped_early(cfg, sweep, m) else "DONE"),
               **{k: cfg.get(k) for k in space.search},
               "objective_final": m.get(OBJECTIVE), "objective_best": best, "objective_se": se, "step_best": step,
               "gain": gain[0] if gain else None, "gain_se": gain[1] if gain else None, "steps": m.get("step"),
               **{k: v for k, v in m.items() if k.startswith("eval/") and k not in NOT_TERMS},
               **{f"train/{k}": v for k, v in m.items() if k.startswith("reward")},
               # the mean over the trial's steps, named so: MLflow's `seconds_per_step` is each step's own
               "mean_seconds_per_step": m.get("mean_seconds_per_step"), "peak_memory_mb": m.get("peak_memory_mb"),
               "node_id": m.get("node_id"), "mlflow_run_id": cfg.get(RUN_ID_KEY), "error": raised.one_line(r.error),
               SAMPLES: samples}
        rows.append(row)
    return sorted(rows, key=lambda row: str(row["trial"]))


def markdown(rows: list[dict], space: Space, base: dict | None = None) -> str:
    """The results table as Markdown: with `base` (the untrained model's evaluation) a first row for it,
    then a row per trial (searched values, best objective ± its standard error, with `base` its gain ±
    the gain's paired standard error, steps, seconds per step, peak memory), then the spreads in
    standard errors: best - worst, and best - untrained."""
    keys = list(space.search)
    untrained = None
    if base is not None:
        untrained = {"trial": "untrained", "status": "BASE", "objective_best": base.get(OBJECTIVE),
                     "objective_se": base.get(OBJECTIVE_SE), "steps": 0, SAMPLES: base.get(OBJECTIVE_SAMPLES)}
    gains = any(row.get("gain") is not None for row in rows)
    head = ["trial", "status", *(k.split(".")[-1] for k in keys), "objective (best) ± se",
            *(["gain ± paired se"] if gains else []), "steps", "mean s/step", "peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in ([untrained] if untrained else []) + rows:
        best, se, gain = row.get("objective_best"), stats.finite(row.get("objective_se")), row.get("gain")
        cells = [str(row["trial"]), row["status"], *(_cell(row.get(k)) for k in keys),
                 "-" if best is None else f"{best:.4f}" + (f" ± {se:.4f}" if se is not None else ""),
                 *([f"{gain:+.4f} ± {row['gain_se']:.4f}" if gain is not None else "-"] if gains else []),
                 _cell(row.get("steps")), _cell(row.get("mean_seconds_per_step")), _cell(row.get("peak_memory_mb"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    done = [r for r in rows if r.get("objective_best") is not None]
    best = max(done, key=lambda r: r["objective_best"]) if done else None
    if len(done) >= 2:
        lines += ["", _spread("best - worst", best, min(done, key=lambda r: r["objective_best"]), "")]
    if best and untrained and stats.finite(untrained["objective_best"]) is not None:  # a NaN: no line
        lines += ["", _spread("best - untrained", best, untrained, "+")]  # negative: no trial beat the base
    return "\n".join(lines) + "\n"


def _samples(samples: list) -> str:
    """'20 prompts, 2 samples each' (or '40 samples', recorded before the samples were kept by prompt)."""
    per = set(stats.shape(samples))
    if all(not isinstance(s, list) for s in samples):
        return f"{len(samples)} samples"
    each = per.pop() if len(per) == 1 else None
    return (f"{len(samples)} prompt{'s' * (len(samples) != 1)}, "
            + (f"{each} sample{'s' * (each != 1)} each" if each is not None else "their samples"))


def _spread(label: str, hi: dict, lo: dict, sign: str) -> str:
    """'label: gap = n x the paired standard error (se, ...)' of two rows' best objectives, where both
    evaluations' samples are at hand; else 'n x the combined standard error (se)' of the two, as if
    independent (the larger one alone overstated the gap by up to sqrt(2))."""
    gap = hi["objective_best"] - lo["objective_best"]
    both = stats.paired(hi.get(SAMPLES), lo.get(SAMPLES))
    if both and both[1] > 0:
        return (f"{label}: {gap:{sign}.4f} = {gap / both[1]:.1f} x the paired standard error ({both[1]:.4f}, "
                f"over the same {_samples(hi[SAMPLES])})")
    ses = [se for se in (stats.finite(r.get("objective_se")) for r in (hi, lo)) if se]
    if not ses:
        return f"{label}: {gap:{sign}.4f}"
    se = math.sqrt(sum(v * v for v in ses))
    what = "the combined standard error" if len(ses) == 2 else "the one standard error known"
    return f"{label}: {gap:{sign}.4f} = {gap / se:.1f} x {what} ({se:.4f}, as if independent)"


def _cell(value, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)


def write_table(rows: list[dict], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = pa.Table.from_pylist([{k: row.get(k) for k in columns} for row in rows])
    path.parent.mkdir(parents=True, exist_ok=True)
    with whole(path) as tmp:  # renamed over: a link planted at results.parquet is replaced, not written through
        pq.write_table(table, tmp)
    return path


STALE_TAG = "shortft.best_stale"


def finish_parent(uri: str, run_id: str, rows: list[dict], best: dict | None, study, table_path: Path,
                   out_dir: Path, seconds: float, base: dict | None = None, status: str = "FINISHED",
                   cpu_seconds: float | None = None) -> None:
    """Best trial's config and objective, the untrained model's evaluation (`base/...` metrics,
    base.json and its grid), Optuna's plots and the results table, on the parent run. `seconds`: this
    driver's wall time, `cpu_seconds` its own CPU time (Tune's loop, its state saves, the searcher); the
    run's `sweep_seconds` and `driver_cpu_seconds` add those of the sweep's earlier drivers (a resume)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    import yaml

    client = tracking.client(uri)
    client.log_artifact(run_id, str(table_path))
    csv = out_dir / "results.csv"
    table = pq.read_table(table_path)
    pacsv.write_csv(table.drop_columns([SAMPLES]) if SAMPLES in table.column_names else table, csv)  # lists: no CSV
    client.log_artifact(run_id, str(csv))
    if (out_dir / "results.md").is_file():
        client.log_artifact(run_id, str(out_dir / "results.md"))
    if base is not None:
        for key, value in scalars(base).items():  # eval/objective -> base/objective; seconds -> base/seconds
            client.log_metric(run_id, "base/" + key.split("/", 1)[-1], value)
        for path, folder in ((out_dir / "base.json", None), (out_dir / "grids" / "base.png", "grids")):
            if path.is_file():
                client.log_artifact(run_id, str(path), folder)
    # over every driver of the sweep: a resumed sweep's earlier ones, whose trials' steps are in its runs too
    # (tune/overhead.py read the last driver's wall against all of them), are added to this one's
    before = client.get_run(run_id).data.metrics
    client.log_metric(run_id, "sweep_seconds", before.get("sweep_seconds", 0.0) + seconds)
    if cpu_seconds is not None:
        client.log_metric(run_id, "driver_cpu_seconds", before.get("driver_cpu_seconds", 0.0) + cpu_seconds)
    client.log_metric(run_id, "trials", len(rows))
    if best:
        client.log_metric(run_id, "best_objective", best["objective"])
        client.set_tag(run_id, "best_trial", best["trial"])
        if best.get("mlflow_run_id"):  # the trial's own run, one click away (its name is <sweep>-<trial>)
            client.set_tag(run_id, "best_run_id", best["mlflow_run_id"])
        write_whole(out_dir / "best_config.yaml", yaml.safe_dump(best["config"], sort_keys=False))
        client.log_artifact(run_id, str(out_dir / "best_config.yaml"))
        # the best evaluation's LoRAs, its config and best.json (sweep/best.py), and none of an earlier end's
        folder = Path(best["lora_dir"]).parent if best.get("lora_dir") else None
        cleared = tracking.replace_artifacts(client, run_id, folder, best_lora.FOLDER)
        if folder is None:
            why = best.get("lora_from") or "none kept"
            client.log_text(run_id, json.dumps({"trial": best["trial"], "lora": None, "why": why}, indent=1),
                            f"{best_lora.FOLDER}/{best_lora.INFO}")
        if cleared is False:
            client.set_tag(run_id, STALE_TAG, "best/ may hold files of an earlier end of this sweep beside this "
                           "one's (this artifact store deleted none): best/best.json is this end's")
        elif cleared and STALE_TAG in client.get_run(run_id).data.tags:  # an earlier end's: untrue now
            client.delete_tag(run_id, STALE_TAG)
    for name, path in optuna_plots(study, out_dir).items():
        client.log_artifact(run_id, str(path), "optuna")
    client.set_terminated(run_id, status)  # KILLED: stopped before its end (a resume finishes it)


def optuna_plots(study, out_dir: Path) -> dict:
    """Optimisation history and parameter importances as PNGs (importance needs >= 2 finished trials, and
    of the searched values only those that differ between them)."""
    import optuna

    if study is None or not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        return {}
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    # the searched values that differ between finished trials: one every trial had got an importance as large
    # as the others' (five constants at 0.17 each beside the one varied value at 0.04, three trials)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    varied = [p for p in dict.fromkeys(k for t in done for k in t.params) if len({t.params.get(p) for t in done}) > 1]
    plots = [("optimization_history", ovm.plot_optimization_history)]
    if varied:
        plots.append(("param_importances", lambda s: ovm.plot_param_importances(s, params=varied)))
    out = {}
    for name, plot in plots:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = plot(study)
            path = out_dir / f"{name}.png"
            with whole(path) as tmp:
                ax.figure.savefig(tmp, bbox_inches="tight", dpi=100, format="png")
            plt.close(ax.figure)
            out[name] = path
        except Exception as e:  # a plot Optuna cannot draw yet (too few trials) is skipped, not fatal
            print(f"optuna {name} plot skipped: {type(e).__name__}: {e}", file=sys.stderr)
    return out
