"""ShortFT against the baselines at equal compute, with the paper's ablations (docs/evidence.md):

    python tune/compare.py --time-budget-s 300                        # every arm, 3/2 seeds, toy world
    python tune/compare.py --arms shortft,alignprop --seeds 1 --lrs 1e-3 --call-budget 200
    python tune/compare.py --out runs/compare/compare --report-only   # the report again

Each arm first picks its own learning rate (one trial per --lrs value at seed 0), then runs its other
seeds at it; every trial gets the same budget and evaluation. Writes rows.jsonl, report.md,
objective_vs_seconds.png and grids/ under --out, and logs them to an MLflow parent run.
"""

import sys

try:
    from shortft.sweep.compare import main
except KeyboardInterrupt:  # Ctrl-C while Ray and torch import (seconds): not a traceback
    print("compare.py: interrupted while starting", file=sys.stderr)
    sys.exit(130)
except ImportError as e:  # the package must be installed next to Ray
    print(f"error: cannot import shortft ({e}); install the project first: pip install <project dir>",
          file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main())
