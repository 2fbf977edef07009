"""Command line: `shortft train|eval|sample|plan|bench|rewards|config|toy`.

    shortft train --config tiny train.steps=50 reward.weights.symmetry=1.0
    shortft train --config tiny --dry-run          # print the timestep plan, load no model
    shortft train --config tiny --resume           # continue from the latest checkpoint
    shortft eval  --config tiny --lora runs/tiny/lora
    shortft sample --config tiny --lora runs/tiny/lora --prompt "a red circle" --seeds 0,1 --compare
    shortft config --config tiny                   # the resolved config as YAML
    shortft config --keys                          # every key with its default and help
    shortft rewards --cost --random-weights        # the rewards, and seconds per image of each

User mistakes (bad keys, values, paths) print one line and exit 2, with no traceback.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import suppress
from pathlib import Path

import yaml

from shortft.arguments import comma_items, command_parser, name_too_long, pipe_closed
from shortft.checks import load_config
from shortft.cli_parser import int_list, interrupted_line, parser as _parser
from shortft.config import PARTS, READS, ConfigError, describe, parse_overrides, replaced, to_dict
from shortft.memory import OutOfMemory, explained
from shortft.out_paths import image_suffixes, output_file, output_folder
from shortft.progress import printable, quiet_libraries
from shortft.resume_preview import check_resume_folder, resume_line
from shortft.safe_load import Unreadable


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    resume = getattr(args, "resume", None)
    if isinstance(resume, str) and "=" in resume and not Path(resume).exists():
        # `--resume train.steps=400`: argparse gave the override to --resume (it takes an optional path)
        args.overrides, args.resume = [*args.overrides, resume], True
    # `key=value` overrides may come after flags too (`train --no-mlflow chain.steps=20`); argparse
    # takes positionals in one run only, so it hands the later ones back here.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        command_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "overrides", None):  # as written: a later one replaces an earlier one, whichever flag took it
        given, order = set(args.overrides), list(sys.argv[1:] if argv is None else argv)
        args.overrides = [a for a in order if a in given]
    for line in replaced(getattr(args, "overrides", None) or []) + replaced(getattr(args, "set", None) or []):
        print(f"shortft: note: {line}", file=sys.stderr)
    if getattr(args, "quiet", False):
        from shortft.progress import QUIET_ENV

        os.environ[QUIET_ENV] = "1"  # Ray workers inherit it
    try:
        if args.command == "toy":
            from shortft.builtin import toy_dir, world_module

            build = world_module("toy", "build")
            given = ("--from-base", getattr(args, "from_base", None)) if args.toy_command == "build" else (
                "--dir", args.dir) if args.dir else ("$SHORTFT_TOY_DIR", os.environ.get("SHORTFT_TOY_DIR"))
            if given[1] and not (Path(given[1]) / "model_index.json").is_file():  # not as model.pretrained, from
                what = "no toy build in that folder" if Path(given[1]).is_dir() else "no such folder"  # the loaders
                raise ConfigError(f"{given[0]} {given[1]}: {what}; give a toy build's folder (shortft toy build --out "
                                  "DIR writes one)")
            if args.toy_command == "build":
                sizes = parse_overrides(args.set, keep_text=False)
                build.build(Path(args.out) if args.out else toy_dir(), quick=args.quick, seed=args.seed,
                            base=Path(args.from_base) if args.from_base else None, overrides=sizes, device=args.device)
            else:
                print(json.dumps(world_module("toy", "checks").measure(args.dir or toy_dir(), samples=args.samples),
                                 indent=1))
            return 0
        if args.command == "config" and args.keys:  # --config's own value beside each default it changes
            given = to_dict(load_config(args.config, args.overrides, ()))
            print(f"# key, default, value in --config {args.config} where it differs, help")
            for key, default, help in describe():
                value = given  # by its path: a dict's (reward.weights) is one value, not flattened keys
                for part in key.split("."):
                    value = value[part]
                differs = json.dumps(value) if value != default else ""
                print(f"{key:32s} {json.dumps(default):20s} {differs:20s} {help}")
            return 0
        parts = READS.get(args.command, PARTS)
        cfg = load_config(args.config, args.overrides, parts)
        if args.command in ("eval", "sample"):
            from shortft.sample import for_sampling

            cfg = for_sampling(cfg)  # the N-step sampler: no shortcut to check or load
        if (args.command in ("eval", "sample") or (args.command == "bench" and not args.random_weights)
                or (args.command == "train" and not args.dry_run)):  # one line now, not retries in each loader
            from shortft.hub import check_sources
            from shortft.resources import starts_local_ray

            # Ray Train workers on a cluster load them on their own nodes: an unreachable hub is only told
            here = not getattr(args, "workers", 0) or starts_local_ray()
            check_sources([cfg], here=here, warn=lambda line: print(f"shortft: {line}", file=sys.stderr), parts=parts)
        if args.command == "config":
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        elif args.command == "plan" or (args.command == "train" and args.dry_run):
            if args.command == "train":
                note_unused_flags(args)
                check_device_here(cfg, args, planning=True)
                print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            from shortft.preflight import print_plan, report, too_big

            print_plan(cfg)
            if args.command == "train":
                text, need = report(cfg)
                print("\n" + text)
                if args.workers <= 0 and (big := too_big(cfg, need)):  # (workers: on their own nodes)
                    if big[1]:
                        raise ConfigError(big[0])
                    print(f"shortft: note: {big[0]}", file=sys.stderr)
                if args.resume:
                    print(resume_line(cfg, args))
                else:  # the line (and status) the run itself would stop with
                    from shortft.new_run import check_new_run

                    check_new_run(cfg.output_dir, cfg.train.output_dir, cfg.train.steps)
        elif args.command == "train":
            return run_train(cfg, args)
        elif args.command == "eval":
            with explained(cfg, "in the evaluation", "sampling"):
                run_eval(cfg, args.lora, args.grid)
        elif args.command == "bench":
            from shortft.cli_bench import run_bench

            run_bench(cfg, args)
        elif args.command == "sample":
            from shortft.sample import run_sample

            seeds = int_list("--seeds", args.seeds, 0, 2**64)  # what torch's generator takes, as train.seed >= 0
            with explained(cfg, "while sampling", "sampling"):
                run_sample(cfg, args.lora, args.prompt, args.prompts, seeds, args.steps, args.guidance, Path(args.out),
                           args.compare)
        elif args.command == "rewards":
            run_rewards(cfg, args)
    except (ConfigError, OutOfMemory) as e:  # a user's mistake: 2; out of GPU memory in `eval`, `sample`: 1
        print(f"shortft: error: {printable(str(e))}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except BrokenPipeError:
        return pipe_closed()
    except OSError as e:
        print(f"shortft: error: {name_too_long(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # `Interrupted`: after a step and its checkpoint; else wherever it came
        print(f"shortft: {interrupted_line(e, args, sys.argv[1:] if argv is None else argv)}", file=sys.stderr)
        return getattr(e, "code", 130)
    return 0


def run_rewards(cfg, args) -> None:
    from shortft.rewards import cost

    if not args.cost:
        if args.names or args.random_weights:
            print("shortft: note: --names and --random-weights apply with --cost only", file=sys.stderr)
        for row in cost.describe():
            print(f"{row['name']:20s} {'' if row['gradient'] else '(evaluation only) '}{row['about']}")
        return
    names = None if args.names is None else comma_items("--names", args.names)
    if names == []:  # `--names ""` timed the config's rewards as if no flag were given
        raise ConfigError(f"--names {args.names!r}: name at least one reward, e.g. --names symmetry,pickscore "
                          "(without the flag: the config's rewards)")
    print(cost.run(cfg, names, args.random_weights, args.batch, args.repeats))


def run_train(cfg, args) -> int:
    """What a run would be refused for, read first (nothing made); then the run folder locked (`run_lock`)
    before its record and MLflow run are made, for the whole run in this process; with --workers, only
    whether another process trains there now (the workers lock it where they train)."""
    from shortft import run_lock, run_store
    from shortft.new_run import check_new_run

    output_folder("train.output_dir", cfg.output_dir)
    check_device_here(cfg, args)
    # credentials leave the URI here, before anything prints or stores it; a resume logs where the run started
    uri, experiment, note = (None, None, None) if args.no_mlflow else run_store.settle(
        cfg.output_dir, args.tracking_uri, args.experiment, resume=bool(args.resume))
    if note:
        print(f"shortft: note: {note}", file=sys.stderr)
    check_resume_folder(cfg, args)
    if not args.resume:  # before the MLflow run is made: a refused run left a FAILED one, which --resume took up
        check_new_run(cfg.output_dir, cfg.train.output_dir, cfg.train.steps)
    elif args.workers <= 0:  # its checkpoint's settings (refused once the models had loaded)
        with suppress(Unreadable):  # the run goes back to the checkpoint before it, saying so
            resume_line(cfg, args)
    if args.workers > 0:  # a folder not made yet has no run in it (made here, it stayed behind a refused run)
        if cfg.output_dir.exists():
            with run_lock.held(cfg.output_dir):
                pass
        return _run_train(cfg, args, uri, experiment)
    with run_lock.held(cfg.output_dir):
        return _run_train(cfg, args, uri, experiment)


def _run_train(cfg, args, uri: str | None, experiment: str | None) -> int:
    from shortft import run_status, run_store, tracking
    from shortft.checkpoint import CheckpointWriteError
    from shortft.evaluate import scalars
    from shortft.guard import NonFiniteError
    from shortft.loop import train
    from shortft.mlflow_logger import MlflowLogger

    try:
        if args.workers > 0:
            from shortft.distributed import train_with_ray

            if args.resume not in (True, False):
                raise ConfigError("--resume with --workers takes no path: Ray resumes from its storage path")
            r = train_with_ray(cfg, args.workers, use_gpu=args.gpu, storage_path=args.storage_path,
                               max_failures=args.max_failures, tracking_uri=uri,
                               experiment=experiment or tracking.DEFAULT_EXPERIMENT, resume=bool(args.resume))
            print(f"done: run {r.run_name}; LoRA in {r.output_dir / 'lora'}; checkpoints in "
                  f"{r.storage_path.rstrip('/')}/{r.run_name}")
        else:
            note_unused_flags(args)
            callbacks, run_id = [], None
            if uri:
                run_id = run_store.open_run(uri, experiment, str(cfg.output_dir.resolve()), cfg.name, cfg,
                                            reuse=bool(args.resume))
                run_store.remember(cfg.output_dir, uri, experiment, run_id)
                callbacks.append(MlflowLogger(uri, run_id, metrics_file=cfg.output_dir / "metrics.jsonl"))
            with run_status.kept(uri, run_id):
                result = train(cfg, callbacks, resume=args.resume)
            print(f"done: LoRA in {result.lora_dir}; eval " + json.dumps(scalars(result.eval)))
    except (ConfigError, NonFiniteError, CheckpointWriteError, OutOfMemory) as e:
        if args.workers > 0:
            import ray

            ray.shutdown()  # Ray's echo of the workers' tracebacks first: the reason is the last line
        if isinstance(e, ConfigError):  # status 2, printed by main
            raise
        print(f"shortft: error: {e}", file=sys.stderr)
        return 1
    if uri:
        print(tracking.ui_line(uri))
    return 0


def check_device_here(cfg, args, planning: bool = False) -> None:
    """The device a run in this process trains on, and model.compile there (refused as the model loaded: after
    the run's folder and MLflow run were made; a dry run said nothing). `planning` (a dry run): model.device=auto
    on a machine without a GPU may plan a GPU run elsewhere, unchecked."""
    import torch

    if args.workers <= 0 and not (planning and cfg.model.device == "auto" and not torch.cuda.is_available()):
        from shortft.compiling import check_compile
        from shortft.models import pick_device

        check_compile(cfg.model, pick_device(cfg.model.device))


def note_unused_flags(args) -> None:
    if not args.workers and (args.storage_path or args.gpu):
        print("shortft: note: --storage-path and --gpu apply with --workers N only", file=sys.stderr)


def run_eval(cfg, lora: str | None, grid: str | None) -> dict:
    from shortft.evaluate import scalars
    from shortft.sample import evaluate_trained

    grid_path = output_file("--grid", grid, image_suffixes()) if grid else None  # before sampling, not after
    metrics = evaluate_trained(cfg, lora, grid_path)
    print(json.dumps(scalars(metrics), indent=1))
    return metrics


if __name__ == "__main__":
    sys.exit(main())
