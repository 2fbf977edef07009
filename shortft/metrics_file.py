"""A run's `metrics.jsonl`: one row per step, read back by a resume, MLflow's logger and a sweep trial;
the last evaluation among its rows."""

from __future__ import annotations

import json
from pathlib import Path

from shortft.progress import warn


def read_metrics(path: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (one per step), [] when there is none. A line cut short (a kill
    or a full disk as it was written) is left out with a warning; the run's resume writes the file again."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines() if Path(path).is_file() else [], 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            warn(f"{path}: line {number} is cut short or not JSON; left out")
    return rows


def last_evaluation(rows: list[dict]) -> tuple[int | None, dict[str, float]]:
    """The step of the last row with `eval/*` metrics and those metrics; (None, {}) where no row has them."""
    for row in reversed(rows):
        evaluated = {k: v for k, v in row.items() if k.startswith("eval/")}
        if evaluated:
            return row.get("step"), evaluated
    return None, {}
