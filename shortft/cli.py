"""Command line: `shortft train|eval|plan|config`.

    shortft train --config tiny train.steps=50 reward.weights.symmetry=1.0
    shortft train --config tiny --dry-run          # print the timestep plan, load no model
    shortft train --config tiny --resume           # continue from the latest checkpoint
    shortft eval  --config tiny --lora runs/tiny/lora
    shortft config --config tiny                   # the resolved config as YAML
    shortft config --keys                          # every key with its default and help

User mistakes (bad keys, values, paths) print one line and exit 2, with no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from shortft.config import ConfigError, builtin_configs, describe, load_config, parse_overrides, to_dict


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shortft", description="Shortcut-based reward fine-tuning of diffusion models.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", default="tiny",
                        help=f"built-in config ({', '.join(builtin_configs())}) or a YAML path (default: tiny)")
        sp.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. chain.steps=20")

    t = sub.add_parser("train", help="fine-tune with the configured method")
    common(t)
    t.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in the output dir (or the one given)")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and timestep plan, then exit")
    t.add_argument("--workers", type=int, default=0, help="Ray Train workers (0 = in this process, no Ray)")
    t.add_argument("--gpu", action="store_true", help="one GPU per Ray worker (NCCL)")
    t.add_argument("--storage-path", help="Ray checkpoints: a local dir, s3://... or an NFS path (default ./ray_results)")
    t.add_argument("--max-failures", type=int, default=1, help="worker-group restarts from the last checkpoint")
    t.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    t.add_argument("--experiment", default="shortft", help="MLflow experiment name")
    t.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")

    e = sub.add_parser("eval", help="evaluate with the original N-step sampler")
    common(e)
    e.add_argument("--lora", help="a LoRA dir written by train (omit for the base model)")
    e.add_argument("--grid", help="write the sample grid PNG here")

    pl = sub.add_parser("plan", help="print the timestep plan of every stage (same as train --dry-run)")
    common(pl)

    toy = sub.add_parser("toy", help="the toy world").add_subparsers(dest="toy_command", required=True)
    b = toy.add_parser("build", help="train the toy model, shortcuts, reward and judge from seeds")
    b.add_argument("--quick", action="store_true", help="a miniature build in about a minute (tests)")
    b.add_argument("--out", help="output dir (default: the package's shortft/toy/assets)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--from-base", metavar="DIR", help="reuse this build's VAE/text encoder/UNet; redo the rest")
    b.add_argument("--set", nargs="*", default=[], metavar="key=value", help="build sizes, e.g. shortcut_steps=1500")
    b.add_argument("--device", default="cpu",
                   help="where the shortcut stage runs: cpu (default), cuda, cuda:N or auto; the rest runs on cpu")
    ck = toy.add_parser("check", help="recompute the toy build's figures from its files")
    ck.add_argument("--dir", help="assets dir (default: the package's)")
    ck.add_argument("--samples", type=int, default=256)

    c = sub.add_parser("config", help="print the resolved config, or every key with --keys")
    common(c)
    c.add_argument("--keys", action="store_true", help="list every key with its default and help")
    return p


def print_plan(cfg) -> None:
    from diffusers import DDIMScheduler

    from shortft import builtin
    from shortft.chain import plan_for
    from shortft.lora import adapter_names
    from shortft.loop import num_stages

    path = builtin.resolve(cfg.model.pretrained)
    try:
        sched = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
    except OSError as e:
        raise ConfigError(f"model.pretrained={cfg.model.pretrained!r}: no scheduler config ({str(e).splitlines()[0]})") from None
    sched.set_timesteps(cfg.chain.steps)
    ts = [int(t) for t in sched.timesteps]
    adapters = adapter_names(cfg.chain.method, cfg.lora.timestep_aware, cfg.chain.segments)
    stages = num_stages(cfg)
    print(f"method {cfg.chain.method}: N={cfg.chain.steps} original steps, k={cfg.chain.segments} segments, "
          f"{stages} stage(s), LoRAs: {', '.join(adapters)}")
    from shortft.plan import format_plan

    for stage in range(1, stages + 1):
        calls = plan_for(ts, cfg.chain, adapters, stage)
        print(f"\nstage {stage}/{stages}" + (f" (segments < {stage} run the original steps without gradient)"
                                            if stage > 1 else ""))
        print(format_plan(calls))


def main(argv: list[str] | None = None) -> int:
    # Import-time chatter of transformers/diffusers (optional backends) is noise on a command line.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    args = _parser().parse_args(argv)
    try:
        if args.command == "toy":
            from shortft.builtin import toy_dir
            from shortft.toy.build import build

            if args.toy_command == "build":
                sizes = parse_overrides(args.set)
                build(Path(args.out) if args.out else toy_dir(), quick=args.quick, seed=args.seed,
                      base=Path(args.from_base) if args.from_base else None, overrides=sizes, device=args.device)
            else:
                from shortft.toy.build import measure

                print(json.dumps(measure(args.dir or toy_dir(), samples=args.samples), indent=1))
            return 0
        if args.command == "config" and args.keys:
            for key, default, help in describe():
                print(f"{key:32s} {json.dumps(default):28s} {help}")
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "config":
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        elif args.command == "plan" or (args.command == "train" and args.dry_run):
            if args.command == "train":
                print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            print_plan(cfg)
        elif args.command == "train":
            return run_train(cfg, args)
        elif args.command == "eval":
            run_eval(cfg, args.lora, args.grid)
    except ConfigError as e:
        print(f"shortft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("shortft: interrupted; resume with --resume", file=sys.stderr)
        return 130
    return 0


def run_train(cfg, args) -> int:
    from shortft import tracking
    from shortft.loop import NonFiniteError, train

    uri = None if args.no_mlflow else (args.tracking_uri or tracking.default_tracking_uri())
    try:
        if args.workers > 0:
            from shortft.distributed import train_with_ray

            if args.resume not in (True, False):
                raise ConfigError("--resume with --workers takes no path: Ray resumes from its storage path")
            r = train_with_ray(cfg, args.workers, use_gpu=args.gpu, storage_path=args.storage_path,
                               max_failures=args.max_failures, tracking_uri=uri, experiment=args.experiment,
                               resume=bool(args.resume))
            print(f"done: run {r.run_name}; LoRA in {r.output_dir / 'lora'}; checkpoints in {r.storage_path}")
        else:
            if args.storage_path or args.gpu:
                print("shortft: note: --storage-path and --gpu apply with --workers N only", file=sys.stderr)
            callbacks = []
            if uri:
                tracking.check_tracking_uri(uri)
                run_id = tracking.ensure_run(uri, args.experiment, str(cfg.output_dir.resolve()), cfg.name, cfg,
                                             reuse=bool(args.resume))
                callbacks.append(tracking.MlflowLogger(uri, run_id))
            result = train(cfg, callbacks, resume=args.resume)
            print(f"done: LoRA in {result.lora_dir}; eval " + json.dumps(result.eval))
    except NonFiniteError as e:
        print(f"shortft: error: {e}", file=sys.stderr)
        return 1
    if uri:
        print(f"compare runs: mlflow ui --backend-store-uri {uri}")
    return 0


def run_eval(cfg, lora: str | None, grid: str | None) -> dict:
    import dataclasses

    from shortft.evaluate import evaluate
    from shortft.lora import PLAN_FILE, load_lora_state
    from shortft.models import load_models
    from shortft.rewards import Rewards

    if lora:
        plan_file = Path(lora) / PLAN_FILE
        if not plan_file.is_file():
            raise ConfigError(f"--lora {lora}: no {PLAN_FILE} there; give the lora/ dir a train run wrote")
        plan = json.loads(plan_file.read_text())
        chain = dataclasses.replace(cfg.chain, method=plan["method"], segments=plan["segments"])
        cfg = dataclasses.replace(cfg, chain=chain)
    models = load_models(cfg, with_loras=bool(lora))
    if lora:
        load_lora_state(models.unet, Path(lora), models.adapters)
    rewards = Rewards(cfg.reward.weights, cfg.reward.options, [cfg.eval.objective, *cfg.eval.terms], models.device)
    metrics = evaluate(models, cfg, rewards, Path(grid) if grid else None)
    print(json.dumps(metrics, indent=1))
    return metrics


if __name__ == "__main__":
    sys.exit(main())
