"""ShortFT sweep: Ray Tune + Optuna over chain length, truncation point, LoRA rank and reward weights;
each trial trains in its Tune process (one worker) or as a Ray Train job (several); one MLflow parent
run per sweep, one nested run per trial.

    python tune/sweep.py                                  # small sweep, built-in toy model, local CPU
    python tune/sweep.py --smoke-test --num-samples 3     # plumbing check in a few minutes
    ray submit clusters/gpu.yaml tune/sweep.py -- --space sd15 --gpus-per-worker 1 \
        --storage-path s3://my-bucket/sweeps              # on a GPU cluster (see README)

`ray submit` copies only this file to the head node: all logic lives in the installed package
(`shortft.sweep`). `python tune/sweep.py --help` lists every flag.
"""

import sys

try:
    from shortft.sweep import main
except KeyboardInterrupt:  # Ctrl-C while Ray and torch import (seconds): not a traceback
    print("tune/sweep.py: interrupted while starting", file=sys.stderr)
    sys.exit(130)
except ImportError as e:  # the one file ray submit copies needs the package installed next to Ray
    print(f"error: cannot import shortft ({e}); install the project first: pip install <project dir>",
          file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main())
