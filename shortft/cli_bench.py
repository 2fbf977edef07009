"""`shortft bench`: the arms it is asked for, run, printed as a table, saved as JSON after every arm, and
logged as an MLflow run with `--tracking-uri`."""

from __future__ import annotations

import json
from pathlib import Path

from shortft.arguments import comma_items
from shortft.cli_parser import bool_list, int_list
from shortft.config import ConfigError
from shortft.out_paths import output_file


def run_bench(cfg, args) -> dict:
    from shortft import tracking
    from shortft.bench import run_bench as bench
    from shortft.bench_report import format_table, log_to_mlflow, save_json

    methods = comma_items("--methods", args.methods)
    if not methods:
        raise ConfigError(f"--methods {args.methods!r}: name at least one, e.g. --methods shortft,draft")
    path = output_file("--json", args.json) if args.json else None  # before the arms run, not after
    if args.tracking_uri:
        tracking.resolve_uri(args.tracking_uri)
    # every flag read before the header line: a bad one is the only line printed
    segments, batches = int_list("--segments", args.segments), int_list("--batch", args.batch)
    checkpointing = bool_list("--checkpointing", args.checkpointing)
    counts = read_json("--counts-from", args.counts_from) if args.counts_from else None
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
    weights = " (random weights)" if args.random_weights else ""
    result = bench(cfg, methods, segments, batches, args.steps, args.warmup, args.random_weights,
                   time_it=not args.count_only, progress=lambda line: print(line, flush=True), counts_from=counts,
                   checkpointing=checkpointing, profile=args.profile,
                   on_arm=(lambda so_far: save_json(path, so_far)) if path else None,
                   header=f"bench {cfg.name}: {cfg.model.pretrained}{weights}, N={cfg.chain.steps}")
    print(f"\n{result['device']} (host: {result['host_cpu']}, {result['threads']} torch threads), "
          f"{result['mixed_precision']} autocast, frozen weights {result['dtype']}, {result['date']}\n"
          + format_table(result))
    if args.tracking_uri:
        print(f"mlflow run {log_to_mlflow(result, args.tracking_uri, path)}")
    return result


def read_json(flag: str, path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{flag} {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise ConfigError(f"{flag} {path}: not JSON ({e}); give the file an earlier `shortft bench --json` wrote") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"method", "segments", "batch"} <= set(r)
                                             for r in rows):  # `{"rows": [{}]}`: a KeyError traceback
        raise ConfigError(f"{flag} {path}: not a `shortft bench --json` result (no rows of arms)")
    return data
