"""The sweep's model: the best trial's LoRAs as they were at its best evaluation, in
`runs/sweeps/<name>/best/` (`lora/`, `config.yaml`, `best.json`), ready for `shortft sample` and
`shortft eval`.

The table ranks trials by their best evaluation, which need not be their last: a trial's final LoRAs
(its `lora/`) are not the model that was scored when it peaked earlier, and a trial ASHA stopped has no
final LoRAs at all. Ray keeps each trial's best-evaluated checkpoint beside its latest
(`ray_reports.BEST_AND_LATEST`: Tune for a one-worker trial, Ray Train for a trial of several workers),
under the storage path every node and the driver reach; the LoRAs of that checkpoint are copied here.
Failing that, the trial's final LoRAs serve when its best evaluation was its last step and its run
folder is on this machine.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

FOLDER = "best"
INFO = "best.json"


def _at_step(checkpoints, step: int):
    """The checkpoint Tune kept with the result of `step`, or None."""
    return next((ckpt for ckpt, metrics in checkpoints or [] if (metrics or {}).get("step") == step), None)


def _train_job_checkpoint(result, step: int):
    """A Ray Train trial's checkpoint of `step` (its path rides in the reported metrics), where it still is."""
    from ray.train import Checkpoint
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    history = result.metrics_dataframe
    if history is None or CHECKPOINT_PATH_KEY not in history or "step" not in history:
        return None
    paths = history[CHECKPOINT_PATH_KEY][history["step"] == step].dropna()
    if paths.empty:
        return None
    ckpt = Checkpoint(path=str(paths.iloc[-1]), filesystem=result.filesystem)
    info = ckpt.filesystem.get_file_info(f"{ckpt.path}/lora")
    return ckpt if info.type.name == "Directory" else None


def _write(best: Path, path: str, filesystem, config: dict, info: dict) -> None:
    """`best/`: the LoRA folder at `path` (a local, NFS or s3:// path) as `lora/`, `config.yaml` and
    `best.json`, whole or not at all (the folder is made beside it, then put in its place): a kill between
    the LoRAs and their config left one trial's LoRAs beside another's config, or beside none."""
    import pyarrow.fs
    import yaml

    tmp = best.with_name(f".tmp-{best.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "lora").mkdir(parents=True)
        pyarrow.fs.copy_files(path, str(tmp / "lora"), source_filesystem=filesystem,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (tmp / INFO).write_text(json.dumps(info, indent=1))
        shutil.rmtree(best, ignore_errors=True)
        tmp.rename(best)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # what a failure left


def export(result, row: dict, config: dict, run_folder: Path, out_dir: Path) -> tuple[Path | None, str]:
    """The LoRAs of `row`'s best evaluation (step `row["step_best"]`) from Tune's result of that trial into
    `out_dir/best/lora`, with the trial's `config` (`config.yaml`) and what they are (`best.json`). Returns
    the folder and where the LoRAs came from, or None and why none was kept (a folder of an earlier end of
    this sweep is removed then: it is not this model)."""
    best = Path(out_dir) / FOLDER
    try:
        return _export(result, row, config, Path(run_folder), best)
    except OSError as e:  # a full disk, storage that went away: the sweep's results stand without them
        shutil.rmtree(best, ignore_errors=True)
        return None, f"the LoRAs of {row['trial']}'s best evaluation were not copied: {e}"


def _export(result, row: dict, config: dict, run_folder: Path, best: Path) -> tuple[Path | None, str]:
    import pyarrow.fs

    step = row["step_best"]
    ckpt = _at_step(result.best_checkpoints, step) or _train_job_checkpoint(result, step)
    final = run_folder / "lora"
    if ckpt is not None:
        source, filesystem = f"{ckpt.path}/lora", ckpt.filesystem
    elif step == row.get("steps") and final.is_dir():  # its last step was its best: its final LoRAs
        source, filesystem = str(final), pyarrow.fs.LocalFileSystem()
    else:
        shutil.rmtree(best, ignore_errors=True)
        return None, (f"the LoRAs of {row['trial']}'s best evaluation (step {step}) were not kept: no checkpoint "
                      "was written at that step (train.checkpoint_every) or it was removed since")
    _write(best, source, filesystem, config, {"trial": row["trial"], "step": step, "objective": row["objective_best"],
                                              "objective_se": row.get("objective_se"), "from": source})
    return best / "lora", source
