"""How far each trial of a finished sweep is from the untrained model, sample by sample.

    python tune/paired.py runs/sweeps/<name>      # where the trials' folders are (the driver's, locally)

Every trial and the untrained model are evaluated on the same held-out prompts and noise seeds, so
their difference on each sample cancels what the samples share (an easy prompt, a lucky seed). The
results table's `best - untrained` divides by the larger of the two standard errors, as if the two
evaluations were independent; the paired standard error (of the per-sample differences) is smaller
wherever the two models' samples agree. This evaluates, in this process, the final LoRA of each trial
that has one (`<name>-tNNN/lora`: trials ASHA stopped have none) and the untrained model of each
trial's evaluation, and prints per trial: the final objective, the gain over the untrained model, its
paired standard error, the gain in those, and the correlation of the two models' samples. The table
also goes to `paired.md` in the sweep's folder.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from shortft.config import Config, ConfigError
from shortft.progress import quiet_libraries
from shortft.sweep.baseline import evaluation_of


def sample_objective(cfg: Config, lora: str | None):
    """The evaluation objective of every held-out sample ([S], float64) of the model with `lora`'s
    adapters (None: the untrained model)."""
    from shortft.evaluate import sample_terms
    from shortft.rewards import Rewards
    from shortft.sample import load_trained

    models = load_trained(cfg, lora)
    rewards = Rewards(cfg.reward.weights, cfg.reward.options, [cfg.eval.objective], models.device)
    return sample_terms(models, cfg, rewards)[0][cfg.eval.objective].double()


def paired_gains(sweep_dir: str | Path, progress=print) -> list[dict]:
    """One row per trial with a final LoRA under `sweep_dir`: trial, objective, gain, paired_se, z, corr."""
    import torch

    from shortft import load_config

    root = Path(sweep_dir)
    trials = sorted(d for d in root.glob("*-t[0-9][0-9][0-9]*") if (d / "lora").is_dir() and (d / "config.yaml").is_file())
    if not trials:
        raise ConfigError(f"{sweep_dir}: no trial folder with a final LoRA (<name>-tNNN/lora) there; pass the "
                          "runs/sweeps/<name> folder of a finished sweep, on the machine that holds it")
    untrained: dict[str, torch.Tensor] = {}
    rows = []
    for d in trials:
        cfg = load_config(str(d / "config.yaml"))
        key = json.dumps(evaluation_of(cfg), sort_keys=True)  # one untrained evaluation per distinct one
        if key not in untrained:
            untrained[key] = sample_objective(cfg, None)
        base, tuned = untrained[key], sample_objective(cfg, str(d / "lora"))
        diff = tuned - base
        se = float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
        corr = float(torch.corrcoef(torch.stack([tuned, base]))[0, 1]) if len(diff) > 1 else float("nan")
        row = {"trial": d.name.rsplit("-", 1)[-1], "samples": len(diff), "untrained": float(base.mean()),
               "objective": float(tuned.mean()), "gain": float(diff.mean()), "paired_se": se,
               "z": float(diff.mean()) / se if se else float("nan"), "corr": corr}
        progress(f"{row['trial']}: {cfg.eval.objective} {row['objective']:.4f}, gain {row['gain']:+.4f} = "
                 f"{row['z']:.1f} paired se ({row['paired_se']:.4f})")
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| trial | untrained | objective (final LoRA) | gain | paired se | gain / paired se | correlation |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['trial']} | {r['untrained']:.4f} | {r['objective']:.4f} | {r['gain']:+.4f} | {r['paired_se']:.4f} "
              f"| {r['z']:.1f} | {r['corr']:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tune/paired.py",
                                description="each trial's gain over the untrained model, sample by sample")
    p.add_argument("sweep_dir", help="runs/sweeps/<name> of a finished sweep")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    quiet_libraries()
    try:
        rows = paired_gains(args.sweep_dir, progress=lambda line: print(line, file=sys.stderr, flush=True))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = markdown(rows)
    (Path(args.sweep_dir) / "paired.md").write_text(table)
    print(table, end="")
    return 0
