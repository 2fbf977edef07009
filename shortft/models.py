"""Loading the frozen pipeline, the shortcut, and the LoRAs to train."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from shortft import builtin
from shortft.chain import Condition, Denoiser
from shortft.config import Config, ConfigError, check_device_name
from shortft.lora import AdapterSwitch, add_loras, adapter_names, unet_has_target

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORTCUT_ADAPTER = "shortcut"


def pick_device(name: str, flag: str = "model.device") -> torch.device:
    """The device `name` (auto, cpu, cuda, cuda:N) on this machine; a ConfigError naming `flag` if it has none."""
    check_device_name(flag, name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{flag}={name!r}: CUDA is not available here; use {flag}=cpu or auto")
    return torch.device(name)


@dataclass
class Models:
    pipe: object  # StableDiffusionPipeline holding the frozen parts (and the UNet with its LoRAs)
    denoiser: Denoiser
    adapters: list[str]
    device: torch.device

    @property
    def unet(self):
        return self.pipe.unet

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> [B, L, D] text states, as the SD pipeline encodes them (no clip skip)."""
        tok = self.pipe.tokenizer(prompts, padding="max_length", max_length=self.pipe.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt")
        return self.pipe.text_encoder(tok.input_ids.to(self.device))[0]

    def condition(self, prompts: list[str], guidance_scale: float, shortcut_guidance_scale: float | None) -> Condition:
        cond = self.encode(prompts)
        uncond = self.encode([""] * len(prompts)) if max(guidance_scale, shortcut_guidance_scale or 0) > 1 else None
        sc = guidance_scale if shortcut_guidance_scale is None else shortcut_guidance_scale
        return Condition(cond, uncond, guidance_scale, sc)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, 4, h, w] latents -> [B, 3, H, W] images in [0, 1], differentiable."""
        vae = self.pipe.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def initial_noise(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        unet = self.pipe.unet
        size = unet.config.sample_size
        shape = (batch, unet.config.in_channels, size, size)
        # Drawn on the CPU so that a seed gives the same noise on every device.
        return torch.randn(shape, generator=generator).to(self.device, self.pipe.unet.dtype)


def load_pipeline(pretrained: str, dtype: torch.dtype = torch.float32):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    path = builtin.resolve(pretrained)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            path, dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    except (OSError, ValueError, EnvironmentError) as e:
        raise ConfigError(f"model.pretrained={pretrained!r}: could not load a diffusers pipeline ({str(e).splitlines()[0]})") from None
    if not isinstance(pipe.scheduler, DDIMScheduler):
        # The chain's update is DDIM; a pipeline shipped with PNDM (SD 1.5) gets DDIM on the same betas.
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_models(cfg: Config, with_loras: bool = True) -> Models:
    """Load the pipeline, freeze everything, add the shortcut and the trainable LoRAs."""
    device = pick_device(cfg.model.device)
    dtype = DTYPES[cfg.model.dtype]
    pipe = load_pipeline(cfg.model.pretrained, dtype)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False).eval()

    shortcut_unet, shortcut_adapter = None, None
    kind, _, path = cfg.model.shortcut.partition(":")
    path = builtin.resolve_path(path, cfg.chain.segments)
    if kind == "lora":
        pipe.load_lora_weights(path, adapter_name=SHORTCUT_ADAPTER)
        shortcut_adapter = SHORTCUT_ADAPTER
    elif kind == "unet":
        from diffusers import UNet2DConditionModel

        sub = "unet" if (Path(path) / "unet").is_dir() else None
        shortcut_unet = UNet2DConditionModel.from_pretrained(path, subfolder=sub, dtype=dtype)
        shortcut_unet.requires_grad_(False).eval().to(device)

    adapters = adapter_names(cfg.chain.method, cfg.lora.timestep_aware, cfg.chain.segments)
    if with_loras:
        missing = unet_has_target(pipe.unet, cfg.lora.targets)
        if missing:
            raise ConfigError(f"lora.targets: {missing} match no UNet module; e.g. to_q, to_k, to_v, to_out.0")
        torch.manual_seed(cfg.train.seed)  # LoRA A is drawn at random: same seed, same start
        add_loras(pipe.unet, adapters, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
    pipe.unet.requires_grad_(False)  # LoRA params are made trainable by the loop, stage by stage
    pipe.to(device)
    denoiser = Denoiser(pipe.unet, pipe.scheduler, AdapterSwitch(pipe.unet), shortcut_unet, shortcut_adapter,
                        checkpointing=cfg.chain.checkpointing)
    return Models(pipe, denoiser, adapters if with_loras else [], device)
