"""The arguments of `shortft` (`parser()`, lists of values) and the command that continues an interrupted `train`;
`shortft.cli` runs the commands they name."""

from __future__ import annotations

import argparse
import math
import re
import shlex
import time
from pathlib import Path

from shortft.arguments import OneLineParser, comma_items
from shortft.config import ConfigError, builtin_configs
from shortft.interrupt import Interrupted


def at_least(low: int):
    """An argparse type: an integer >= `low` (argparse prints `argument --flag: ...`, status 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: must be >= {low}")
        return value

    return parse


def finite(text: str) -> float:
    """An argparse type: a finite number (nan or inf drew images of nothing, status 0)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text}: must be a finite number")
    return value


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="shortft", description="Shortcut-based reward fine-tuning of diffusion models.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", default="tiny",
                        help=f"built-in config ({', '.join(builtin_configs())}) or a YAML path (default: tiny)")
        sp.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. chain.steps=20")
        sp.add_argument("--quiet", action="store_true", help="no progress bars or per-step lines")

    t = sub.add_parser("train", help="fine-tune with the configured method")
    common(t)
    t.flag_keys = {word: ["train.output_dir"] for word in ("out", "output", "out_dir", "output_dir")}  # unknown flags
    t.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in the output dir (or the one given)")
    t.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, the timestep plan, a memory estimate and what would be downloaded; "
                        "download and load nothing")
    t.add_argument("--workers", type=at_least(0), default=0, help="Ray Train workers (0 = in this process, no Ray)")
    t.add_argument("--gpu", action="store_true", help="one GPU per Ray worker (NCCL)")
    t.add_argument("--storage-path", help="Ray checkpoints: a local dir, s3://... or an NFS path (default ./ray_results)")
    t.add_argument("--max-failures", type=at_least(0), default=1,
                   help="with --workers: worker-group restarts from the last checkpoint (default 1; a config "
                        "mistake, a non-finite stop, or out of GPU memory alone on the card ends the restart at once)")
    mlflow = t.add_mutually_exclusive_group()  # both given: one was ignored without a word
    mlflow.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    mlflow.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    t.add_argument("--experiment", help="MLflow experiment name (default shortft; on --resume, the run's own)")

    e = sub.add_parser("eval", help="evaluate with the original N-step sampler")
    common(e)
    e.add_argument("--lora", help="a LoRA dir written by train (omit for the base model)")
    e.add_argument("--grid", help="write the sample grid PNG here")

    sp = sub.add_parser("sample", help="images from the original sampler with a run's LoRAs (and the base model)")
    common(sp)
    sp.add_argument("--lora", required=True, help="the lora/ dir a train run wrote")
    sp.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for more)")
    sp.add_argument("--prompts", help="a prompts file as data.prompts takes it (a text file, one prompt per line; "
                    ".jsonl/.csv/.parquet with data.prompt_column; hf://, builtin:)")
    sp.add_argument("--seeds", default="0", help="comma-separated seeds; every prompt is drawn with each (default 0)")
    sp.add_argument("--steps", type=at_least(1), help="sampler steps N (default: the config's chain.steps)")
    sp.add_argument("--guidance", type=finite, help="guidance scale; <= 1 turns guidance off (default: the config's "
                    "chain.guidance_scale)")
    sp.add_argument("--out", default="samples", help="output dir (default ./samples)")
    sp.add_argument("--compare", action="store_true", help="also the base model, side by side, as one grid PNG")

    pl = sub.add_parser("plan", help="print the timestep plan of every stage (train --dry-run prints it "
                        "too, with the config, memory and sources)")
    common(pl)

    toy = sub.add_parser("toy", help="the toy world").add_subparsers(dest="toy_command", required=True)
    b = toy.add_parser("build", help="train the toy model, shortcuts, reward and judge from seeds")
    b.add_argument("--quick", action="store_true", help="a miniature build in under a minute (what the tests use)")
    b.add_argument("--out", help="output dir (default: $SHORTFT_TOY_DIR, else the package's shortft/toy/assets)")
    b.add_argument("--seed", type=at_least(0), default=0, help="the build's seed (default 0)")
    b.add_argument("--from-base", metavar="DIR", help="reuse this build's VAE/text encoder/UNet (and its reward and judge at the same --seed and "
                   "sizes); redo the rest")
    b.add_argument("--set", nargs="*", action="extend", default=[], metavar="key=value", help="build sizes, e.g. shortcut_steps=1500")
    b.add_argument("--device", default="cpu",
                   help="where the shortcut stage runs: cpu (default), cuda, cuda:N or auto; the rest runs on cpu")
    ck = toy.add_parser("check", help="recompute the toy build's figures from its files")
    ck.add_argument("--dir", help="assets dir (default: $SHORTFT_TOY_DIR, else the package's)")
    ck.add_argument("--samples", type=at_least(1), default=256,
                    help="images the figures are measured on, from fresh teacher paths (default 256)")

    bn = sub.add_parser("bench", help="seconds/step, memory, FLOPs and utilisation of each method")
    common(bn)
    bn.add_argument("--methods", default=",".join(("shortft", "full", "draft", "draft_lv", "alignprop", "drtune", "refl")),
                    help="comma-separated methods (full, checkpointed, always runs as the reference)")
    bn.add_argument("--segments", default="4", help="ShortFT segment counts k, e.g. 2,4,8 (default 4)")
    bn.add_argument("--batch", default="1", help="batch sizes, e.g. 1,2 (default 1)")
    bn.add_argument("--steps", type=at_least(1), default=3, help="timed training steps per arm (default 3)")
    bn.add_argument("--warmup", type=at_least(0), default=1, help="untimed steps first (default 1)")
    bn.add_argument("--random-weights", action="store_true",
                    help="random weights of the config's real architecture (SD 1.5, SDXL, tiny, toy): nothing downloaded")
    bn.add_argument("--count-only", action="store_true", help="FLOPs, calls and memory estimate only (no timing)")
    bn.add_argument("--json", help="write the results as JSON here")
    bn.add_argument("--counts-from", metavar="JSON", help="reuse FLOP counts and memory estimates of an earlier "
                    "--json (e.g. a --count-only run on a CPU) for the same arms")
    bn.add_argument("--checkpointing", default=None, metavar="false,true",
                    help="per-call checkpointing of each method but full (always on), refl and draft at "
                         "chain.last_k=1 (one call with gradient: one arm): one arm per value (default: the config's "
                         "chain.checkpointing)")
    bn.add_argument("--profile", action="store_true",
                    help="on a GPU, one more step under the profiler: kernels per step and the GPU's busy share")
    bn.add_argument("--tracking-uri", help="also log an MLflow run (experiment shortft-bench)")

    rw = sub.add_parser("rewards", help="the registered rewards; with --cost, seconds per image of each")
    common(rw)
    rw.add_argument("--cost", action="store_true", help="time each reward on random 224x224 images")
    rw.add_argument("--names", help="comma-separated rewards to time (default: the config's weights and eval terms)")
    rw.add_argument("--random-weights", action="store_true",
                    help="preference models as their real architectures with random weights: nothing downloaded")
    rw.add_argument("--batch", type=at_least(1), default=2, help="images per call (default 2)")
    rw.add_argument("--repeats", type=at_least(1), default=3, help="timed calls; the median is reported (default 3)")

    config_parser = sub.add_parser("config", help="print the resolved config, or every key with --keys")
    common(config_parser)
    config_parser.add_argument("--keys", action="store_true", help="list every key with its default and help")
    return p


def int_list(flag: str, text: str, low: int = 1, high: int | None = None) -> list[int]:
    """Comma-separated integers in [low, high), at least one, each once."""
    items = comma_items(flag, text)
    try:
        values = [int(v) for v in items]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated integers, e.g. 1,2") from None
    if not values:
        raise ConfigError(f"{flag} {text!r}: give at least one integer, e.g. {flag} {max(low, 1)},{max(low, 1) + 1}")
    for v in values:
        if v < low or (high is not None and v >= high):
            raise ConfigError(f"{flag} {v}: must be >= {low}" + (f" and < {high}" if high is not None else ""))
    twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
    if twice is not None:  # (`--seeds 0,0` drew the same images twice)
        raise ConfigError(f"{flag} {text!r}: {twice} is given twice; give each once")
    return values


def bool_list(flag: str, text: str | None) -> list[bool | None]:
    if text is None:
        return [None]
    values = [v.lower() for v in comma_items(flag, text)]
    bad = [v for v in values if v not in ("true", "false")]
    if bad or not values:
        raise ConfigError(f"{flag} {text!r}: expected true, false or both, e.g. {flag} false,true")
    return [v == "true" for v in values]


STARTED = time.time()  # this command's start, about: the CLI imports this module first


def interrupted_line(e: KeyboardInterrupt, args: argparse.Namespace, argv: list[str]) -> str:
    """The line of a command a signal stopped; an interrupted `train` names the whole command that continues it
    (the run's overrides too: `--resume` alone took a 60-step run on to the config's 200)."""
    if args.command == "bench" and getattr(args, "json", None):  # written after every arm (not an earlier bench's)
        kept = Path(args.json).is_file() and Path(args.json).stat().st_mtime >= STARTED
        return "interrupted" + (f"; {args.json} holds the arms that ended" if kept else "; no arm had ended")
    if args.command != "train":  # `eval`, `sample`: nothing to resume (they said `--resume`, which they lack)
        return f"interrupted: {e}" if str(e) else "interrupted"
    line = f"interrupted: {e}" if str(e) else "interrupted; continue with --resume"
    # A run stopped after a step (`Interrupted`) goes on from the checkpoint it wrote, its latest; one stopped
    # before (its set-up, the lock's wait, a second Ctrl-C in a save) from the one it was given, if any.
    since = None if isinstance(e, Interrupted) else args.resume
    return re.sub(r"continue (it )?with --resume( --workers \d+)?",
                  lambda _: f"continue with: {resume_command(argv, args.resume, since)}", line)


def resume_command(argv: list[str], resume: bool | str, since: bool | str | None = None) -> str:
    """The `shortft` command that continues an interrupted `train`: its own arguments with --resume, and the
    checkpoint `since` (a path) where it should go on from one the run was given, not from its latest."""
    kept = []
    for i, a in enumerate(argv):
        if a == "--resume" or a.startswith("--resume="):
            continue
        if isinstance(resume, str) and a == resume and i and argv[i - 1] == "--resume":
            continue
        kept.append(a)
    return shlex.join(["shortft", *kept, "--resume", *([since] if isinstance(since, str) else [])])
