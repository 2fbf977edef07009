"""What `shortft train --resume` would do, read before anything loads or is made: the checkpoint it starts
from, its step and the settings changed since (a dry run prints it; a run is refused with it first), and a
run's own config.yaml given from another folder."""

from __future__ import annotations

from pathlib import Path

from shortft.config import ConfigError, flatten, to_dict


def check_resume_folder(cfg, args) -> None:
    """`--resume` with a run's own config.yaml from another folder: its relative `train.output_dir` named a
    folder here, and the resume started afresh there (status 0) beside the run it was meant to continue."""
    from shortft import checkpoint

    named = any(o.split("=", 1)[0] in ("name", "train.output_dir") for o in args.overrides)  # another folder, meant
    if args.resume is not True or named or not args.config or not Path(args.config).is_file():
        return
    folder = Path(args.config).resolve().parent
    held = checkpoint.latest(folder / "checkpoints")
    if held is None or folder == cfg.output_dir.resolve() or checkpoint.latest(cfg.output_dir / "checkpoints"):
        return
    raise ConfigError(f"--resume: no checkpoint under {cfg.output_dir / 'checkpoints'}; --config {args.config} is the "
                      f"config of the run in {folder} (checkpoints to step {checkpoint.step_of(held)}): add "
                      f"train.output_dir={folder} to continue it there")


def resume_line(cfg, args) -> str:
    """Where `train --resume` would start (a dry run): the checkpoint and its step, or step 0."""
    from shortft import checkpoint, new_run
    from shortft.plan import training_plan
    from shortft.resume_settings import changed_settings, check_workers

    check_resume_folder(cfg, args)
    if args.workers:
        return "resume: from the latest checkpoint Ray Train recorded in the storage path"
    if args.resume is not True:
        checkpoint.check_resume_path(args.resume)
        path = Path(args.resume)
        if new_run.is_fork(path, cfg.output_dir):  # a new run there: refused where a run is (the dry run said
            new_run.check_new_run(cfg.output_dir, cfg.train.output_dir, cfg.train.steps, path)  # "resume")
    else:
        path = checkpoint.latest(cfg.output_dir / "checkpoints")
        if path is None:
            return f"resume: no checkpoint under {cfg.output_dir / 'checkpoints'}; the run would start from step 0"
    state = checkpoint.read_state(path)
    check_workers(path, state, 1)  # the run itself refuses it: the dry run said it would resume
    changed = changed_settings(path, flatten(to_dict(cfg)), list(training_plan(cfg).adapters))  # or these
    return f"resume: from {path} at step {state['step']}" + (
        "; settings changed since the checkpoint: " + ", ".join(changed) if changed else "")
