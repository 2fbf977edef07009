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


def test_a_stock_sdxl_pipeline_with_the_timestep_switch_samples_as_the_runs_own_sampler(tiny_xl_dir, tmp_path):
    """The README's inference block with `StableDiffusionXLPipeline`: its micro-conditioning and second text
    encoder beside the run's LoRAs switched per timestep give the samples the run's own sampler gives."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    import shortft
    from shortft.chain import original_sampler
    from shortft.lora import enable_timestep_aware
    from shortft.sample import load_trained

    cfg = shortft.load_config("tiny", [f"model.pretrained={tiny_xl_dir}", f"train.output_dir={tmp_path}/run",
                                       "train.steps=4", "train.lr=0.05", "chain.steps=8", "chain.segments=2",
                                       "train.checkpoint_every=0", "train.log_every=100", "lora.alpha=16"])
    result = shortft.train(cfg)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_xl_dir)
    pipe.set_progress_bar_config(disable=True)
    side = pipe.unet.config.sample_size
    noise = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))

    def run():
        return pipe("a red circle", num_inference_steps=8, guidance_scale=7.5, latents=noise.clone(),
                    output_type="latent").images

    base = run()
    with enable_timestep_aware(pipe, result.lora_dir):
        tuned = run()
    assert (tuned - base).abs().max() > 1e-4
    assert torch.equal(run(), base)  # left as it was
    models = load_trained(cfg, str(result.lora_dir))
    calls = models.plan.inference_calls(models.denoiser.timesteps(8))
    ours = original_sampler(models.denoiser, noise.clone(), models.condition(["a red circle"], 7.5, 7.5), calls)
    assert (ours - tuned).abs().max().item() <= 1e-4, (ours - tuned).abs().max().item()
