"""The SDXL class trains and samples with its LoRAs (the chain's equivalence with its pipeline: test_model_classes.py)."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from shortft import builtin


@pytest.fixture(scope="module")
def tiny_xl_dir(_cache):
    return builtin.resolve("builtin:tiny-xl")


def test_sdxl_trains_shortft_and_samples_with_its_loras(tiny_xl_dir, tmp_path):
    common = ["--config", "tiny", f"model.pretrained={tiny_xl_dir}", "chain.steps=8", "chain.segments=2"]
    t = subprocess.run([sys.executable, "-m", "shortft.cli", "train", *common, "train.steps=2", "train.lr=0.05",
                        f"train.output_dir={tmp_path}/run", "--no-mlflow"], capture_output=True, text=True, timeout=600)
    assert t.returncode == 0, t.stderr[-2000:]
    s = subprocess.run([sys.executable, "-m", "shortft.cli", "sample", *common, "--lora", f"{tmp_path}/run/lora",
                        "--prompt", "a red circle", "--compare", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=600)
    assert s.returncode == 0, s.stderr[-2000:]
    grid = np.asarray(Image.open(tmp_path / "out" / "compare.png"))
    assert grid.shape == (128, 256, 3) and not np.array_equal(grid[:, :128], grid[:, 128:])
