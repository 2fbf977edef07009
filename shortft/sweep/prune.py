"""A trial that has ended gives back the disk its resume checkpoints took.

Each trial's loop keeps `train.keep_checkpoints` checkpoints (LoRAs in fp32 and AdamW's moments: 1.14
GiB each at the `sd15` config's rank) in its run folder, on the node it ran on, and they stayed there
after the trial ended (about 40 GB for 50 trials of `spaces/sd15.yaml`, counted from the LoRAs' parameters,
not measured), on top of Tune's copies.
A trial Tune completed (it finished, or ASHA stopped it) never runs again, not even on `--resume`, so
`Pruner` removes that folder's `checkpoints/` as the trial ends, on its node. What stays: the final LoRAs
(`lora/`), metrics, samples and config, and under the storage path Tune's copy of the trial's
best-evaluated checkpoint and its latest (`ray_reports.BEST_AND_LATEST`): the sweep's best LoRAs come from
there, and a finished trial can go on training from its latest with `shortft train --resume <it>`.
A trial that failed keeps its checkpoints (`--resume` tries it again); so does one a Ctrl-C stopped
(Tune does not complete it).
"""

from __future__ import annotations

import shutil
import sys
from functools import lru_cache
from pathlib import Path

from ray import tune

from shortft.sweep.trials import trial_name

WAIT_S = 600.0  # for a stopped trial's process to let go of its run folder (it may still be saving)
END_WAIT_S = 120.0  # at the sweep's end, for the removals still under way


def remove_checkpoints(folder: str) -> int:
    """Removes `folder/checkpoints` once no process trains in `folder` (its run lock); the bytes freed."""
    from shortft import run_lock

    root = Path(folder) / "checkpoints"
    if not root.is_dir():
        return 0
    with run_lock.held(Path(folder), wait_s=WAIT_S, quiet=True):
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        shutil.rmtree(root, ignore_errors=True)
    return size


@lru_cache(maxsize=1)
def _task():
    import ray

    return ray.remote(num_cpus=0, name="shortft-prune")(remove_checkpoints)  # runs beside a node's trials


class Pruner(tune.Callback):
    """Driver side: as a trial completes, a Ray task on the node it ran on (`node_id` of its results)
    removes its run folder's checkpoints; the sweep's end waits up to `END_WAIT_S` for them, says in one
    line each which could not be removed (a node gone), and in one line what was freed."""

    def __init__(self, sweep: dict):
        self.sweep, self.pending = sweep, {}

    def on_trial_complete(self, iteration, trials, trial, **info):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = (trial.last_result or {}).get("node_id")
        if not node:  # nothing reported: where it ran is not known
            return
        folder = Path(self.sweep["output_root"]) / trial_name(trial.config, self.sweep, trial.trial_id)
        task = _task().options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
        self.pending[task.remote(str(folder))] = (folder, node)

    def on_experiment_end(self, trials, **info):
        import ray

        if not self.pending:
            return
        done, left = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=END_WAIT_S)
        removed, freed = 0, 0
        for ref in [*done, *left]:
            folder, node = self.pending.pop(ref)
            try:
                if ref in done:
                    size = ray.get(ref)
                    removed, freed = removed + (size > 0), freed + size
                    continue
                why = f"not done within {END_WAIT_S:g} s"
            except ray.exceptions.TaskUnschedulableError:
                why = "its node has left the cluster"
            except Exception as e:  # noqa: BLE001 - a folder that would not go, a lock kept: told, not raised
                why = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
            print(f"sweep: {folder / 'checkpoints'} (node {node[:8]}) was not removed: {why}", file=sys.stderr)
        if removed:
            print(f"sweep: the checkpoints of {removed} ended trial(s) removed from their run folders "
                  f"({freed / 2**20:.1f} MiB; Tune keeps each one's best and latest under the storage path)", flush=True)
