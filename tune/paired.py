"""Each trial's gain over the untrained model, sample by sample (docs/sweeps.md):

    python tune/paired.py runs/sweeps/<name>

Re-evaluates the final LoRA of every trial that has one, and the untrained model, on the sweep's
held-out samples; prints (and writes to <name>/paired.md) the gain and its paired standard error.
"""

import sys

try:
    from shortft.sweep.paired import main
except ImportError as e:  # the package must be installed
    print(f"error: cannot import shortft ({e}); install the project first: pip install <project dir>",
          file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main())
