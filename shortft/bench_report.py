"""`shortft bench`'s output: the one-line progress of an arm, the Markdown table, the MLflow run."""

from __future__ import annotations

import json
import time
from pathlib import Path

from shortft.out_paths import write_whole


def describe(row: dict) -> str:
    text = f"calls {row['calls']}/{row['grad_calls']}  {row['flops'] / 1e12:8.3g} TFLOP  {row.get('ops', 0):7d} ops"
    if "error" in row:
        return f"{text}  {row['error']}"
    if "seconds_per_step" in row:
        text += f"  {row['seconds_per_step']:.3f} s/step  peak {row['peak_memory_mb']:.0f} MB"
    if "gpu_busy_share" in row:
        text += f"  GPU busy {row['gpu_busy_share']:.0%} ({row['kernels_per_step']} kernels)"
    return text


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(result: dict) -> str:
    timed = any("seconds_per_step" in r or "error" in r for r in result["rows"])
    profiled = any("gpu_busy_share" in r for r in result["rows"])
    head = "| method | k | batch | calls (grad) | TFLOP/step | aten ops/step | est. memory MB |"
    if timed:
        head += " s/step (min-max) | peak MB | TFLOP/s | share of peak | s/step vs full | memory vs full |"
    if profiled:
        head += " GPU busy | kernels/step |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        line = (f"| {r['method']}{' (ckpt)' if r['checkpointing'] else ''} | {r['segments'] or '-'} | {r['batch']} | "
                f"{r['calls']} ({r['grad_calls']}) | {r['flops'] / 1e12:.3g} | {r.get('ops', '-')} | "
                f"{r['memory_estimate_mb']:.0f} |")
        if timed and "error" in r:  # this arm did not fit the card
            line += f" {r['error']} |" + " - |" * (5 + 2 * profiled)
        elif timed:
            share = f"{r['peak_share']:.0%}" if r["peak_share"] else "-"
            line += (f" {r['seconds_per_step']:.3f} ({r['seconds_min']:.3f}-{r['seconds_max']:.3f}) | "
                     f"{r['peak_memory_mb']:.0f} | {r['achieved_tflops']:.3g} | {share} | "
                     f"{_cell(r['seconds_per_step_vs_full'], '.2f')} | {_cell(r['peak_memory_mb_vs_full'], '.2f')} |")
            if profiled:
                line += f" {_cell(r.get('gpu_busy_share'), '.0%')} | {r.get('kernels_per_step', '-')} |"
        lines.append(line)
    return "\n".join(lines)


def save_json(path: Path, result: dict) -> None:
    """Written whole or not at all (a temp file renamed): a bench stopped mid-write keeps the previous arms."""
    write_whole(path, json.dumps(result, indent=1))


def log_to_mlflow(result: dict, tracking_uri: str, json_path: Path | None, experiment: str = "shortft-bench") -> str:
    from shortft import tracking

    tracking_uri = tracking.resolve_uri(tracking_uri)
    run_id = tracking.ensure_run(tracking_uri, experiment, f"bench/{time.time_ns()}", f"bench-{result['config']}",
                                 reuse=False)
    # `steps` is the chain's N (the JSON's name, which --counts-from reads); as a param beside timed_steps it read
    # as the steps timed
    tracking.log_dict_params(tracking_uri, run_id, {("chain.steps" if k == "steps" else k): v
                                                    for k, v in result.items() if k != "rows"})
    client = tracking.client(tracking_uri)
    for r in result["rows"]:
        label = f"{r['method']}_k{r['segments'] or 0}_b{r['batch']}" + ("_ckpt" if r["checkpointing"] else "")
        for key in ("seconds_per_step", "peak_memory_mb", "flops", "ops", "achieved_tflops", "calls", "grad_calls",
                    "gpu_busy_share", "kernels_per_step"):
            if r.get(key) is not None:
                client.log_metric(run_id, f"{label}/{key}", float(r[key]))
    if json_path:
        client.log_artifact(run_id, str(json_path))
    client.set_terminated(run_id, "FINISHED")
    return run_id
