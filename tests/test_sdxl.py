"""The SDXL class: the chain reproduces the pipeline's own sampling, trains, and samples with its LoRAs."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import shortft
from shortft import builtin
from shortft.chain import ChainInput, sample
from shortft.models import load_models


@pytest.fixture(scope="module")
def tiny_xl_dir(_cache):
    return builtin.resolve("builtin:tiny-xl")


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_full_chain_matches_the_sdxl_pipeline(tiny_xl_dir, tmp_path, guidance):
    cfg = shortft.load_config("tiny", [f"model.pretrained={tiny_xl_dir}", "chain.method=full", "chain.steps=10",
                                       f"chain.guidance_scale={guidance}", f"train.output_dir={tmp_path}"])
    models = load_models(cfg)
    assert type(models.pipe).__name__ == "StableDiffusionXLPipeline"
    prompts = ["a red circle", "a blue square on a white background"]
    noise = models.initial_noise(2, torch.Generator().manual_seed(3))
    models.denoiser.switch.activate(())
    ref = models.pipe(prompts, num_inference_steps=10, guidance_scale=guidance, latents=noise.clone(),
                      height=32, width=32, output_type="latent").images
    with torch.no_grad():
        ours = sample(models.denoiser, ChainInput(noise, models.condition(prompts, guidance, None)), models.plan)
    assert (ours - ref).abs().max().item() <= 1e-4


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
