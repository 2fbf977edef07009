"""A trial that has ended gives back the disk its resume checkpoints took.

Each trial's loop keeps `train.keep_checkpoints` checkpoints (LoRAs in fp32 and AdamW's moments: 1.14
GiB each at the `sd15` config's rank) in its run folder, on the node it ran on, and they stayed there
after the trial ended (about 40 GB for 50 trials of `spaces/sd15.yaml`, counted from the LoRAs' parameters,
not measured), on top of Tune's copies.
A trial Tune completed (it finished, or ASHA stopped it) never runs again, not even on `--resume`, so
`Pruner` removes that folder's `checkpoints/` as the trial ends, on every node the trial reported from (a
trial Tune restarted elsewhere left a folder on each). What stays: the final LoRAs (`lora/`), metrics,
samples and config, and under the storage path Tune's copy of the trial's best-evaluated checkpoint and its
latest (`ray_reports.BEST_AND_LATEST`): the sweep's best LoRAs come from there, and a finished trial can go
on training from its latest with `shortft train --resume <it>`.
A trial that failed keeps its checkpoints (`--resume` tries it again); so does one a Ctrl-C stopped
(Tune does not complete it). The removals not yet made are part of the sweep's saved state (Tune's callback
state), so `--resume` after a killed driver makes them, as it does for ended trials that a sweep started
before this behaviour left.
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
NODE_GONE = "its node has left the cluster"
LISTED = 3  # folders named per reason at the end; the rest counted


def remove_checkpoints(folder: str) -> int:
    """Removes `folder/checkpoints` once no process trains in `folder` (its run lock); the bytes freed."""
    from shortft import run_lock

    root = Path(folder) / "checkpoints"
    if not root.is_dir():
        return 0
    with run_lock.held(Path(folder), wait_s=WAIT_S, quiet=True, links_refused=False):
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        shutil.rmtree(root, ignore_errors=True)
    return size


@lru_cache(maxsize=1)
def _task():
    import ray

    return ray.remote(num_cpus=0, name="shortft-prune")(remove_checkpoints)  # runs beside a node's trials


class Pruner(tune.Callback):
    """Driver side: as a trial completes, a Ray task on each node it reported from (`node_id` of its
    results) removes its run folder's checkpoints; the sweep's end waits up to `END_WAIT_S` for them and
    says in one line what was freed and in one line per reason which were not (a node gone)."""

    def __init__(self, sweep: dict):
        self.sweep, self.pending, self.outcomes = sweep, {}, []
        self.nodes: dict[str, list[str]] = {}  # trial id -> the nodes it reported from
        self.settled: set[tuple[str, str]] = set()  # (trial id, node): removed, or its node gone
        self.restored = False  # a resumed sweep: its ended trials' removals not settled are made again

    # `Tuner.restore` brings back the callbacks the sweep started with, pickled then: only the settings
    # travel (a Pruner of an earlier version had other fields), and what was owed comes from `set_state`.
    def __getstate__(self) -> dict:
        return {"sweep": self.sweep}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["sweep"])
        self.restored = True

    def get_state(self) -> dict:
        return {"pruner": 1, "nodes": self.nodes, "settled": sorted(self.settled)}

    def set_state(self, state: dict) -> None:
        if state.get("pruner") == 1:  # Tune hands states back by position in the callback list
            self.nodes = {k: list(v) for k, v in state["nodes"].items()}
            self.settled = {tuple(s) for s in state["settled"]}

    def on_step_begin(self, iteration, trials, **info):
        self._resumed(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._seen(trial.trial_id, result.get("node_id"))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._remove(trial)

    def on_step_end(self, iteration, trials, **info):
        if self.pending:  # settled ones leave the saved state, so a resume does not make them again
            import ray

            self._collect(ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)[0])

    def on_experiment_end(self, trials, **info):
        import ray

        self._resumed(trials)  # a resumed sweep whose trials had all ended runs no step
        if self.pending:
            done, left = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=END_WAIT_S)
            self._collect(done)
            self.outcomes += [(self.pending.pop(ref)[1:3], f"not done within {END_WAIT_S:g} s", 0) for ref in left]
        self._report()

    def _resumed(self, trials) -> None:
        if self.restored:  # trials ended before this driver: their removals may have been cut short with it
            self.restored = False
            for trial in trials:
                if trial.status == trial.TERMINATED:
                    self._remove(trial, again=True)

    def _seen(self, trial_id: str, node: str | None) -> None:
        if node and node not in self.nodes.setdefault(trial_id, []):
            self.nodes[trial_id].append(node)

    def _remove(self, trial, again: bool = False) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self._seen(trial.trial_id, (trial.last_result or {}).get("node_id"))
        folder = Path(self.sweep["output_root"]) / trial_name(trial.config, self.sweep, trial.trial_id)
        for node in self.nodes.get(trial.trial_id, []):  # none reported: where it ran is not known
            owed = {(t, n) for t, _, n, _ in self.pending.values()}
            if (trial.trial_id, node) in self.settled | owed:
                continue
            task = _task().options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
            self.pending[task.remote(str(folder))] = (trial.trial_id, folder, node, again)

    def _collect(self, done: list) -> None:
        import ray

        for ref in done:
            trial_id, folder, node, again = self.pending.pop(ref)
            try:
                size, why = ray.get(ref), None
            except ray.exceptions.TaskUnschedulableError:
                size, why = 0, NODE_GONE
                if again:  # owed from before a resume: a local Ray started again is this machine under a new
                    # node id; what is still here is removed here, and what is not went before (a sweep's end
                    # saves its state before its removals) and is no news
                    if not (Path(folder) / "checkpoints").is_dir():
                        self.settled.add((trial_id, node))
                        continue
                    size, why = remove_checkpoints(str(folder)), None
            except Exception as e:  # noqa: BLE001 - a folder that would not go, a lock kept: told, not raised
                size, why = 0, str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
            if why in (None, NODE_GONE):  # nothing left to try; another error is tried again on --resume
                self.settled.add((trial_id, node))
            self.outcomes.append(((folder, node), why, size))

    def _report(self) -> None:
        freed = [(folder, size) for (folder, _), why, size in self.outcomes if why is None and size > 0]
        failed: dict[str, list] = {}
        for (folder, node), why, _ in self.outcomes:
            if why is not None:
                failed.setdefault(why, []).append(f"{folder / 'checkpoints'} (node {node[:8]})")
        self.outcomes = []
        for why, where in failed.items():
            more = f" and {len(where) - LISTED} more" if len(where) > LISTED else ""
            print(f"sweep: not removed ({why}): {', '.join(where[:LISTED])}{more}", file=sys.stderr)
        if freed:
            print(f"sweep: the checkpoints of {len({f for f, _ in freed})} ended trial(s) removed from their run "
                  f"folders ({sum(size for _, size in freed) / 2**20:.1f} MiB; Tune keeps each one's best and latest "
                  "under the storage path)", flush=True)
