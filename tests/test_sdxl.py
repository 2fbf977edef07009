"""The SDXL class trains and samples with its LoRAs (the chain's equivalence with its pipeline: test_model_classes.py;
a stock SDXL pipeline with the timestep switch: test_train.py)."""

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


def test_the_sdxl_vae_decodes_in_fp32_under_an_fp16_autocast(tiny_xl_dir):
    """SDXL's VAE overflows in fp16 (`force_upcast`): its weights were upcast at load, but under
    `train.mixed_precision=fp16` the decode ran inside the loop's autocast, its convolutions in fp16 (NaN
    images with the real VAE). bf16 and no autocast are left as they were."""
    import torch

    from diffusers import AutoencoderKL

    from shortft.models import decode_latents

    vae = AutoencoderKL.from_pretrained(tiny_xl_dir, subfolder="vae")
    assert vae.config.force_upcast and vae.dtype == torch.float32
    ran = []
    vae.decoder.conv_out.register_forward_hook(lambda m, a, out: ran.append(out.dtype))
    latents = torch.randn(1, vae.config.latent_channels, 8, 8)
    for dtype, expected in ((torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)):
        with torch.autocast("cpu", dtype=dtype):
            images = decode_latents(vae, latents)
        assert ran.pop() == expected and images.dtype == torch.float32
    vae.register_to_config(force_upcast=False)  # a VAE that is fine in fp16 runs as the autocast says
    with torch.autocast("cpu", dtype=torch.float16):
        decode_latents(vae, latents)
    assert ran.pop() == torch.float16

