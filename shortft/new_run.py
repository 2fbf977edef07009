"""Whether a run folder may take a new run: `check_new_run` refuses one that holds a run (its checkpoints, or
a finished run's result.json), naming how to continue it or where to start another; `is_fork` tells a
`--resume PATH` of another folder's checkpoint (a new run here from it) from a resume of this folder's run."""

from __future__ import annotations

import json
from pathlib import Path

from shortft.checkpoint import latest, step_of
from shortft.config import ConfigError


def holds_run(folder: Path) -> bool:
    """`folder` holds a run: checkpoints, or a finished run's result.json (its checkpoints removed)."""
    return latest(Path(folder) / "checkpoints") is not None or (Path(folder) / "result.json").is_file()


def is_fork(resume, out: Path) -> bool:
    """`--resume PATH` of a checkpoint outside `out`/checkpoints: a new run in `out` from that checkpoint."""
    return isinstance(resume, (str, Path)) and Path(resume).resolve().parent.parent != Path(out).resolve()


def check_new_run(out: Path, template: str = "{name}", steps: int | None = None, fork: Path | None = None) -> None:
    """A new run (no resume) may not start in a run folder that holds checkpoints: it wrote its steps beside
    them and its metrics over the old ones, and a later `--resume` took the newest checkpoint of either run.
    Nor in one that holds a finished run whose checkpoints were removed: its LoRAs and result went.
    `template`: the config's train.output_dir, to name the setting that moves the run (a run's or a sweep
    trial's config.yaml holds its folder itself: there name= moved nothing); `steps`: the new run's
    train.steps, to say what --resume of a finished run would do (at its steps: nothing); `fork`: the checkpoint
    of another folder the new run starts from (the line said "pass --resume" to a run given --resume PATH)."""
    other = ("set name=<new name> (or train.output_dir) to start another" if "{name}" in template else
             "set train.output_dir=<another folder> to start another (this config's train.output_dir names the "
             "folder itself, without {name}: name= does not move it)")
    held, result = latest(Path(out) / "checkpoints"), _result_steps(Path(out) / "result.json")
    if fork is not None and (held is not None or result is not None):
        raise ConfigError(f"--resume {fork}: a checkpoint outside {Path(out) / 'checkpoints'} starts a new run in "
                          f"{out} from it, and that folder holds a run" + (
                              f" (checkpoints to step {step_of(held)})" if held is not None else "") +
                          f"; {other}, or pass --resume alone to continue the one there")
    if held is not None:
        step = step_of(held)
        finished = result is not None and result >= step  # one trained on past its result and stopped: not finished
        if not finished:
            go_on = "pass --resume to continue it"
        elif steps is not None and steps > step:
            go_on = f"pass --resume to train it on to step {steps} (train.steps)"
        else:
            go_on = f"pass --resume train.steps=<more than {step}> to train it further"
        past = f"; its result.json is of step {result}" if result is not None and not finished else ""
        raise ConfigError(f"train.output_dir {out} holds a {'finished ' if finished else ''}run (checkpoints to step "
                          f"{step}{past}); {go_on}, or {other}")
    if (Path(out) / "result.json").is_file():
        raise ConfigError(f"train.output_dir {out} holds a finished run (result.json, lora/); {other}")


def _result_steps(path: Path) -> int | None:
    """The steps of a run's result.json; None where there is none (one unreadable counts as the run's end)."""
    try:
        return int(json.loads(path.read_text())["steps"]) if path.is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        return 1 << 62
