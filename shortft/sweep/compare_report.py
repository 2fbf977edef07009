"""The comparison's report, from its `rows.jsonl`: a Markdown table per arm (mean +- standard error over
seeds at the arm's chosen learning rate), the evaluation objective against training seconds with a band
over seeds (PNG), and the final sample grid of each arm's first seed (same prompts and seeds for all)."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

from shortft import stats
from shortft.config import check_name
from shortft.out_paths import whole, write_whole
from shortft.progress import warn
from shortft.sweep.eval_report import NOT_TERMS, OBJECTIVE


def read_rows(path: Path) -> dict[str, list[dict]]:
    """{arm: [the chosen-lr trials, by seed]} in the order the arms ran; a failed seed is a trial with its
    `error` and no evaluations. A line cut short (a driver killed as it wrote) is left out, with a warning."""
    arms: dict[str, list[dict]] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError:
            warn(f"{path}: line {number} is cut short or not JSON; left out of the report")
            continue
        check_name(f"{path}: line {number}: arm", str(row["arm"]))  # it names a file: `../x` wrote elsewhere
        arms.setdefault(row["arm"], [])
        if row["chosen"]:
            arms[row["arm"]].append(row)
    return {arm: sorted(trials, key=lambda r: r["seed"]) for arm, trials in arms.items()}


def _mean_se(values: list[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    mean, se = stats.mean_se(values)
    return f"{mean:.3f}" if len(values) < 2 else f"{mean:.3f} ± {se:.3f}"


def table(arms: dict[str, list[dict]], base: dict | None = None) -> str:
    """A row per arm; with `base` (the untrained model's evaluation) a first row for it and a column of
    each arm's objective gain over it, with the seeds' standard deviation of the objective in brackets."""
    finals = [t["final"] for trials in arms.values() for t in trials if "final" in t]
    terms = sorted({k for f in finals for k in f if k.startswith("eval/") and k not in NOT_TERMS
                    and any(f.get(k) != f.get(OBJECTIVE) for f in finals)})  # not the objective's own term again
    head = ["arm", "seeds", "lr (of trials)", f"{OBJECTIVE}", *terms, "training reward", "steps", "s/step", "calls/step",
            "train s"]
    if base is not None:
        head.insert(4, "gain (seed sd)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if base is not None:
        cells = ["untrained base", "-", "-", f"{base[OBJECTIVE]:.3f}", "-", *(_mean_se([base.get(k)]) for k in terms),
                 "-", "0", "-", "-", "0"]
        lines.append("| " + " | ".join(cells) + " |")
    for arm, trials in arms.items():
        finals = [t["final"] for t in trials if "final" in t]
        steps = [f["step"] for f in finals]
        per_step = [f["calls_total"] / f["step"] for f in finals if f.get("calls_total") and f.get("step")]
        spent = [f["train_seconds"] for f in finals if f.get("train_seconds") is not None]
        # every mean below is over the seeds counted here: a failed seed, or a non-finite objective, is said
        counted = sum(f.get(OBJECTIVE) is not None and math.isfinite(f[OBJECTIVE]) for f in finals)
        cells = [arm, str(counted) if counted == len(trials) else f"{counted} of {len(trials)}",
                 f"{trials[0]['lr']:g} (of {trials[0]['lr_trials']})",
                 _mean_se([f.get(OBJECTIVE) for f in finals]), *(_mean_se([f.get(k) for f in finals]) for k in terms),
                 _mean_se([f.get("reward") for f in finals]), f"{statistics.fmean(steps):.0f}" if steps else "-",
                 _mean_se([f.get("mean_seconds_per_step") for f in finals]),
                 f"{statistics.fmean(per_step):.1f}" if per_step else "-",
                 f"{statistics.fmean(spent):.1f}" if spent else "-"]
        if base is not None:
            cells.insert(4, _gain([f.get(OBJECTIVE) for f in finals], base[OBJECTIVE]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _gain(values: list[float], base: float) -> str:
    """Mean gain over the base model and the seeds' standard deviation: '+0.120 (0.030)'."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    sd = f" ({statistics.stdev(values):.3f})" if len(values) > 1 else ""
    return f"{statistics.fmean(values) - base:+.3f}{sd}"


def curve(trials: list[dict]) -> tuple[list[float], list[list[float]]]:
    """An arm's points: the evaluations every seed made at the same step, then the seeds' final ones (the
    table's values). Under a time budget seeds stop at different steps: cut to the shortest seed, the
    plot ended before the longer seeds' last evaluations, below or above the table's mean."""
    shared = 0
    while all(shared < len(t["evals"]) - 1 for t in trials) and len({t["evals"][shared].get("step")
                                                                       for t in trials}) == 1:
        shared += 1
    points = [[t["evals"][i] for t in trials] for i in range(shared)] + [[t["evals"][-1] for t in trials]]
    return ([statistics.fmean(e["train_seconds"] for e in point) for point in points],
            [[e[OBJECTIVE] for e in point] for point in points])


def plot(arms: dict[str, list[dict]], path: Path, base: dict | None = None) -> Path:
    """Objective against training seconds: per arm the mean over seeds at each evaluation, and a band
    from the lowest to the highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, trials in arms.items():
        trials = [t for t in trials if t.get("evals")]  # a failed seed has none
        if not trials:
            continue
        seconds, values = curve(trials)
        line, = ax.plot(seconds, [statistics.fmean(v) for v in values], marker="o", label=f"{arm} ({len(trials)})")
        if len(trials) > 1:
            ax.fill_between(seconds, [min(v) for v in values], [max(v) for v in values], color=line.get_color(),
                            alpha=0.2)
    if base is not None:
        ax.axhline(base[OBJECTIVE], color="grey", linestyle="--", label="untrained base")
    ax.set_xlabel("training seconds (evaluation excluded)")
    ax.set_ylabel(OBJECTIVE)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with whole(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def write_report(rows_path: Path, out: Path | None = None, tracking_uri: str | None = None,
                 parent_run_id: str | None = None) -> Path:
    """report.md, objective_vs_seconds.png and grids/<arm>.png under `out` (default: beside the rows)."""
    rows_path = Path(rows_path)
    out = Path(out or rows_path.parent)
    arms = read_rows(rows_path)
    base_path = rows_path.parent / "base.json"
    base = None
    if base_path.is_file():
        try:
            base = json.loads(base_path.read_text())
        except (OSError, ValueError):  # cut short (a full disk): the report without the base's row, not a traceback
            warn(f"compare: {base_path} is unreadable; the report's table leaves out the untrained model")
    grids = out / "grids"
    grids.mkdir(parents=True, exist_ok=True)
    lines = ["# Comparison at equal compute", "", table(arms, base), "", "![objective](objective_vs_seconds.png)", ""]
    plot(arms, out / "objective_vs_seconds.png", base)
    if (grids / "base.png").is_file():
        lines.append("untrained base: ![base](grids/base.png)")
    for arm, trials in arms.items():
        trials = [t for t in trials if t.get("run_dir")]
        samples = sorted((Path(trials[0]["run_dir"]) / "samples").glob("step_*.png")) if trials else []
        if samples:
            with whole(grids / f"{arm}.png") as tmp:  # a new file renamed over: a link planted there stays untouched
                shutil.copyfile(samples[-1], tmp)
            lines.append(f"{arm} (seed {trials[0]['seed']}, step {samples[-1].stem[5:].lstrip('0')}): "
                         f"![{arm}](grids/{arm}.png)")
    report = out / "report.md"
    write_whole(report, "\n".join(lines) + "\n")
    if tracking_uri and parent_run_id:
        from shortft import tracking

        client = tracking.client(tracking_uri)
        for path in (report, out / "objective_vs_seconds.png"):
            client.log_artifact(parent_run_id, str(path))
        client.log_artifacts(parent_run_id, str(grids), "grids")
    return report
