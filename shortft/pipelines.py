"""Loading a Stable Diffusion (1.x/2.x) or SDXL pipeline for the chain: the pipeline class and the model's
kind checked first (from their configs), then the weights (revision, variant), and DDIM on the model's
own betas in place of its scheduler."""

from __future__ import annotations

import torch

from shortft import builtin
from shortft.config import ConfigError
from shortft.progress import warn

PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def load_pipeline(pretrained: str, dtype: torch.dtype = torch.float32, revision: str | None = None,
                  variant: str | None = None):
    """A Stable Diffusion (1.x/2.x) or SDXL pipeline with a DDIM scheduler on its own betas (hub id at
    `revision`, weights `variant` such as fp16, or a local dir)."""
    import diffusers
    import transformers
    from diffusers import DDIMScheduler, DiffusionPipeline

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    path = builtin.resolve(pretrained)
    try:
        kind = DiffusionPipeline.load_config(path, revision=revision).get("_class_name")  # model_index.json only
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.pretrained={pretrained!r}: could not load a diffusers pipeline ({str(e).splitlines()[0]})") from None
    if kind not in PIPELINES:
        raise ConfigError(f"model.pretrained={pretrained!r}: a {kind}; supported: {', '.join(PIPELINES)}")
    check_ddpm_model(pretrained, path, revision)
    extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    try:
        pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype, revision=revision, variant=variant,
                                                 **(extra if kind == PIPELINES[0] else {}))
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.pretrained={pretrained!r}: could not load a diffusers pipeline ({str(e).splitlines()[0]})") from None
    # The chain's update is DDIM; a pipeline shipped with PNDM (SD 1.5) gets DDIM on the same betas. The chain
    # does not clip or threshold x0 (a latent is not in [-1, 1]), and neither may the pipeline's own sampler,
    # which DDIM's defaults would make clip wherever the shipped config does not name `clip_sample`.
    said = [k for k in ("clip_sample", "thresholding") if pipe.scheduler.config.get(k)]
    if said:
        warn(f"shortft: model.pretrained={pretrained!r}: its scheduler config sets {', '.join(said)}; the chain's DDIM "
             "update does not clip or threshold the predicted latent, so neither does the pipeline's sampler here")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, thresholding=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_ddpm_model(pretrained: str, path, revision: str | None) -> None:
    """The chain's DDIM update takes over the pipeline's scheduler on its betas, and decodes latents scaled
    by `scaling_factor` alone: an SDXL-class model trained otherwise (EDM, as Playground v2.5, with a VAE
    of `latents_mean`/`latents_std`) got DDPM's default betas and unshifted latents without a word."""
    from diffusers import AutoencoderKL, DDIMScheduler

    try:
        scheduler = DDIMScheduler.load_config(path, subfolder="scheduler", revision=revision)
        vae = AutoencoderKL.load_config(path, subfolder="vae", revision=revision)
    except (OSError, ValueError):  # the pipeline's own load says what is missing
        return
    why = ("its scheduler has no DDPM betas" if "beta_schedule" not in scheduler else
           "its VAE shifts latents (latents_mean, latents_std)" if vae.get("latents_mean") is not None else None)
    if why:
        raise ConfigError(f"model.pretrained={pretrained!r}: {why} ({scheduler.get('_class_name')}), an EDM-style "
                          "model; the chain's DDIM update takes DDPM-beta models (SD 1.x/2.x, SDXL) only")
