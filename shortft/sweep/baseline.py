"""The untrained model on a sweep's evaluation: the row every trial's gain is read from.

A short sweep can leave its trials level with the model it started from (the default toy sweep's best
trial is 1.9 paired standard errors above it, over the prompts); without that row a table of trials
reads as a table of gains.
The base model is evaluated once per sweep, on the same prompts, sampler, seeds and judge as every
trial's (the space's base config and fixed keys, no LoRA), and kept in `<output>/base.json` with its
sample grid in `<output>/grids/base.png`; a resumed sweep reads it back.

It runs as a Ray task with one trial worker's resources, so on a cluster whose head has no GPU it runs
on a GPU node (an autoscaler adds one as it would for a trial). On CPUs it runs before the first trial
(trials and it would share the cores); on GPUs beside the trials. A base that fails or is not placed
within the sweep's resource wait costs the row, never the sweep.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from shortft import raised
from shortft.config import Config, flatten, to_dict
from shortft.memory import explained
from shortft.out_paths import write_whole
from shortft.space import Space, trial_config
from shortft.sweep.eval_report import OBJECTIVE, OBJECTIVE_SE

BASE_FILE = "base.json"
EVALUATED_WITH = "evaluated_with"  # in base.json: the settings it was evaluated with (`evaluation_of`)
# Keys the evaluation reads (the model, its prompts, sampler, judge): a space that searches one has no
# single untrained score. The trial's chain, LoRA, learning rate and reward weights do not change it.
EVALUATION_KEYS = ("model.", "eval.", "data.", "reward.options.", "chain.steps", "chain.guidance_scale")


def searched_evaluation_keys(space: Space) -> list[str]:
    return [k for k in space.search if k.startswith(EVALUATION_KEYS)]


def evaluation_of(cfg: Config) -> dict:
    """The values of `cfg` the evaluation reads: two configs with the same ones evaluate the untrained
    model alike."""
    return {k: v for k, v in flatten(to_dict(cfg)).items() if k.startswith(EVALUATION_KEYS)}


def evaluate_base(base: str | dict, fixed: dict, out: str | Path) -> dict:
    """The evaluation of the untrained model (no LoRA; the same prompts, sampler, seeds and judge as
    every trial of config `base` with the keys `fixed` gets), in this process: written to
    `out/base.json`, its sample grid to `out/grids/base.png`."""
    from shortft.sample import evaluate_trained

    out = Path(out)
    cfg = trial_config(base, fixed, {})  # before the folder: a bad base left an empty out/grids/
    (out / "grids").mkdir(parents=True, exist_ok=True)
    with explained(cfg, "in the untrained model's evaluation", "sampling"):
        metrics = evaluate_trained(cfg, None, out / "grids" / "base.png")
    _write(out / BASE_FILE, metrics, evaluation_of(cfg))
    return metrics


def _write(path: Path, metrics: dict, evaluated_with: dict) -> None:
    write_whole(path, json.dumps({**metrics, EVALUATED_WITH: evaluated_with}, indent=1))


def _evaluate_in_task(base: str | dict, fixed: dict, use_gpu: bool, threads: int | None,
                      submitted: float) -> tuple[dict, bytes]:
    """`evaluate_base` in a Ray task, which may be on another node: the metrics, with `seconds` since
    the task was submitted (its placement, process start, model load and sampling), and the grid's PNG
    come back to the driver, which writes them."""
    import torch

    if use_gpu:
        fixed = {**fixed, "model.device": "cuda"}  # Ray made the task's GPU the only one it sees
    elif threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="shortft-base-") as tmp:
        metrics = evaluate_base(base, fixed, Path(tmp))
        return {**metrics, "seconds": time.time() - submitted}, (Path(tmp) / "grids" / "base.png").read_bytes()


@dataclass
class BaseEvaluation:
    """The untrained model's evaluation of one sweep, started by `start` and collected by `result`."""
    out_dir: Path
    metrics: dict | None = None
    task: object = None  # the Ray ObjectRef while it runs
    wait_s: float | None = None
    evaluated_with: dict | None = None  # `evaluation_of` the sweep's untrained config, kept in base.json

    def result(self) -> dict | None:
        """The metrics (also in `out_dir/base.json`), or None with a one-line reason on stderr."""
        if self.task is None:
            return self.metrics
        import ray

        ref, self.task = self.task, None
        try:
            metrics, png = ray.get(ref, timeout=self.wait_s)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=True)
            return _skip(f"its evaluation was not placed within --resource-wait-s {self.wait_s:.0f}")
        except ray.exceptions.RayError as e:
            lines = [line for line in str(e).splitlines() if line.strip()]
            ours = raised.found(e)  # out of GPU memory, say: the package's line, whole
            why = ours[1] if ours else lines[-1].strip() if lines else type(e).__name__
            return _skip(f"its evaluation failed: {why}")
        (self.out_dir / "grids").mkdir(parents=True, exist_ok=True)
        (self.out_dir / "grids" / "base.png").write_bytes(png)
        _write(self.out_dir / BASE_FILE, metrics, self.evaluated_with or {})
        self.metrics = metrics
        print(f"untrained model: {describe(metrics)} in {metrics['seconds']:.0f} s ({self.out_dir / BASE_FILE})",
              flush=True)
        return metrics


def read_base(path: Path, evaluated_with: dict | None = None) -> dict | None:
    """A kept base.json's metrics, or None where there is none, it cannot be read (cut short by a full
    disk, say: the untrained model is evaluated again, with a note, instead of every resume stopping on
    it) or it was evaluated with other settings than `evaluated_with` (a sweep name used again with another
    model or evaluation: its untrained row was the other's). A file that does not say is taken."""
    if not path.is_file():
        return None
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"note: {path} is unreadable ({type(e).__name__}); evaluating the untrained model again", flush=True)
        return None
    if not isinstance(kept, dict):
        return None
    was = kept.pop(EVALUATED_WITH, None)
    if evaluated_with is not None and isinstance(was, dict):
        now = json.loads(json.dumps(evaluated_with))  # as the file holds it (tuples as lists)
        changed = sorted(k for k in {*was, *now} if was.get(k) != now.get(k))
        if changed:
            print(f"note: {path} was evaluated with other settings ({', '.join(changed[:3])}"
                  f"{', ...' if len(changed) > 3 else ''}); evaluating the untrained model again", flush=True)
            return None
    return kept


def start(space: Space, out_dir: Path, sweep: dict) -> BaseEvaluation:
    """Read the sweep's base evaluation back, or start it as a Ray task with one worker's resources
    (`sweep`: the trials' settings); on CPUs, wait for it here, before any trial takes the cores."""
    import ray

    out_dir.mkdir(parents=True, exist_ok=True)
    pending = BaseEvaluation(out_dir, wait_s=sweep.get("resource_wait_s"))
    searched = searched_evaluation_keys(space)
    if searched:
        _skip(f"the space searches {', '.join(searched)}, which the evaluation reads (one base score per value)")
        return pending
    pending.evaluated_with = evaluation_of(trial_config(sweep["base"], sweep["fixed"], {}))
    kept = read_base(out_dir / BASE_FILE, pending.evaluated_with)
    if kept is not None:
        pending.metrics = kept
        print(f"untrained model: {describe(pending.metrics)} (kept in {out_dir / BASE_FILE})", flush=True)
        return pending
    use_gpu = sweep["use_gpu"]
    task = ray.remote(_evaluate_in_task).options(
        num_cpus=sweep["cpus_per_worker"] or 1.0, num_gpus=sweep["gpus_per_worker"] if use_gpu else 0, max_retries=0)
    print("untrained model: evaluating it on the trials' held-out prompts"
          + (" beside the trials" if use_gpu else " before the first trial"), flush=True)
    pending.task = task.remote(sweep["base"], sweep["fixed"], use_gpu, sweep["threads"], time.time())
    if not use_gpu:
        pending.result()
    return pending


def describe(metrics: dict) -> str:
    se = metrics.get(OBJECTIVE_SE)
    return f"{OBJECTIVE} {metrics[OBJECTIVE]:.4f}" + (f" ± {se:.4f}" if se is not None and se == se else "")


def _skip(reason: str) -> None:
    print(f"untrained model: no row in the results ({reason})", file=sys.stderr, flush=True)
    return None
