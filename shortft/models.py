"""Loading the frozen pipeline, the shortcut and the LoRAs to train; text encoding and VAE decoding.

Stable Diffusion 1.x/2.x (`StableDiffusionPipeline`) and SDXL (`StableDiffusionXLPipeline`: two text
encoders, pooled embeddings and the added time ids) load through the same `from_pretrained` path,
from a hub id, a local diffusers dir or `builtin:<name>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from shortft import builtin
from shortft.config import Config, ConfigError, check_device_name
from shortft.denoiser import Condition, Denoiser
from shortft.lora import AdapterSwitch, add_loras, unet_has_target
from shortft.plan import TrainingPlan, training_plan

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORTCUT_ADAPTER = "shortcut"
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def pick_device(name: str, flag: str = "model.device") -> torch.device:
    """The device `name` (auto, cpu, cuda, cuda:N) on this machine; a ConfigError naming `flag` if it has none."""
    check_device_name(flag, name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{flag}={name!r}: CUDA is not available here; use {flag}=cpu or auto")
    return torch.device(name)


def is_sdxl(pipe) -> bool:
    return type(pipe).__name__ == "StableDiffusionXLPipeline"


@dataclass
class Models:
    pipe: "diffusers.DiffusionPipeline"  # noqa: F821  the frozen parts, and the UNet with its LoRAs
    denoiser: Denoiser
    plan: TrainingPlan
    device: torch.device
    empty_prompt: list = field(default_factory=list, repr=False)  # [states, pooled] of "", made on first use

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def adapters(self) -> tuple[str, ...]:
        return self.plan.adapters

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompts -> ([B, L, D] text states, [B, P] pooled states or None), as the pipeline encodes them."""
        if is_sdxl(self.pipe):
            states, _, pooled, _ = self.pipe.encode_prompt(prompts, device=self.device, num_images_per_prompt=1,
                                                           do_classifier_free_guidance=False)
            return states, pooled
        return encode_text(self.pipe.tokenizer, self.pipe.text_encoder, prompts), None

    def _unconditional(self, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        # The empty prompt's states are the same every step (the text encoders are frozen): once.
        if not self.empty_prompt:
            states, pooled = self.encode([""])
            if is_sdxl(self.pipe) and self.pipe.config.force_zeros_for_empty_prompt:
                states, pooled = torch.zeros_like(states), torch.zeros_like(pooled)  # as SDXL's pipeline does
            self.empty_prompt.extend([states, pooled])
        states, pooled = self.empty_prompt
        return states.expand(batch, -1, -1), None if pooled is None else pooled.expand(batch, -1)

    def _added(self, pooled: torch.Tensor | None, batch: int) -> dict | None:
        """SDXL micro-conditioning as the pipeline computes it for its default sizes: (original size,
        crop top-left (0, 0), target size), all at the model's resolution."""
        if pooled is None:
            return None
        size = self.unet.config.sample_size * self.pipe.vae_scale_factor
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=pooled.dtype, device=self.device)
        return {"text_embeds": pooled, "time_ids": time_ids.expand(batch, -1)}

    def condition(self, prompts: list[str], guidance_scale: float, shortcut_guidance_scale: float | None) -> Condition:
        cond, pooled = self.encode(prompts)
        shortcut_scale = guidance_scale if shortcut_guidance_scale is None else shortcut_guidance_scale
        uncond, uncond_pooled = None, None
        if max(guidance_scale, shortcut_scale) > 1:
            uncond, uncond_pooled = self._unconditional(len(prompts))
        return Condition(cond, uncond, guidance_scale, shortcut_scale, self._added(pooled, len(prompts)),
                         self._added(uncond_pooled, len(prompts)))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, 4, h, w] latents -> [B, 3, H, W] images in [0, 1], differentiable."""
        return decode_latents(self.pipe.vae, latents)

    def initial_noise(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        unet = self.pipe.unet
        size = unet.config.sample_size
        shape = (batch, unet.config.in_channels, size, size)
        # Drawn on the CPU so that a seed gives the same noise on every device.
        return torch.randn(shape, generator=generator).to(self.device, unet.dtype)


def encode_text(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Prompts -> [B, L, D] last hidden states, as the SD 1.x/2.x pipelines encode them (no clip skip)."""
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    return text_encoder(tokens.input_ids.to(text_encoder.device))[0]


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """[B, 4, h, w] latents -> [B, 3, H, W] images in [0, 1] (differentiable)."""
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def load_pipeline(pretrained: str, dtype: torch.dtype = torch.float32):
    """A Stable Diffusion (1.x/2.x) or SDXL pipeline with a DDIM scheduler on its own betas."""
    import diffusers
    import transformers
    from diffusers import DDIMScheduler, DiffusionPipeline

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    path = builtin.resolve(pretrained)
    try:
        kind = DiffusionPipeline.load_config(path).get("_class_name")  # model_index.json only: no weights yet
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.pretrained={pretrained!r}: could not load a diffusers pipeline ({str(e).splitlines()[0]})") from None
    if kind not in PIPELINES:
        raise ConfigError(f"model.pretrained={pretrained!r}: a {kind}; supported: {', '.join(PIPELINES)}")
    extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    try:
        pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype, **(extra if kind == PIPELINES[0] else {}))
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.pretrained={pretrained!r}: could not load a diffusers pipeline ({str(e).splitlines()[0]})") from None
    if not isinstance(pipe.scheduler, DDIMScheduler):
        # The chain's update is DDIM; a pipeline shipped with PNDM (SD 1.5) gets DDIM on the same betas.
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def frozen_parts(pipe) -> list[torch.nn.Module]:
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    return [getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None]


def load_models(cfg: Config, with_loras: bool = True, plan: TrainingPlan | None = None) -> Models:
    """Load the pipeline, freeze everything, add the shortcut and the trainable LoRAs of `plan`
    (default: the config's own training plan)."""
    pipe = load_pipeline(cfg.model.pretrained, DTYPES[cfg.model.dtype])
    return prepare_models(cfg, pipe, with_loras, plan)


def prepare_models(cfg: Config, pipe, with_loras: bool = True, plan: TrainingPlan | None = None,
                   device: torch.device | None = None) -> Models:
    """Freeze a loaded (or random-weight) pipeline, add the shortcut and the trainable LoRAs."""
    plan = plan or training_plan(cfg)
    device = device or pick_device(cfg.model.device)
    dtype = DTYPES[cfg.model.dtype]
    for part in frozen_parts(pipe):
        part.requires_grad_(False).eval()

    shortcut_unet, shortcut_adapter = None, None
    if plan.shortcut.kind == "lora":
        extra = {"weight_name": plan.shortcut.weight_name} if plan.shortcut.weight_name else {}
        pipe.load_lora_weights(plan.shortcut.path, adapter_name=SHORTCUT_ADAPTER, **extra)
        shortcut_adapter = SHORTCUT_ADAPTER
    elif plan.shortcut.kind == "unet":
        from diffusers import UNet2DConditionModel

        sub = "unet" if (Path(plan.shortcut.path) / "unet").is_dir() else None
        shortcut_unet = UNet2DConditionModel.from_pretrained(plan.shortcut.path, subfolder=sub, dtype=dtype)
        shortcut_unet.requires_grad_(False).eval().to(device)

    if with_loras:
        missing = unet_has_target(pipe.unet, cfg.lora.targets)
        if missing:
            raise ConfigError(f"lora.targets: {missing} match no UNet module; e.g. to_q, to_k, to_v, to_out.0")
        torch.manual_seed(cfg.train.seed)  # LoRA A is drawn at random: same seed, same start
        add_loras(pipe.unet, plan.adapters, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
    else:
        from dataclasses import replace

        plan = replace(plan, adapters=())
    pipe.unet.requires_grad_(False)  # LoRA params are made trainable by the loop, stage by stage
    pipe.to(device)
    denoiser = Denoiser(pipe.unet, pipe.scheduler, AdapterSwitch(pipe.unet), shortcut_unet, shortcut_adapter,
                        checkpointing=cfg.chain.checkpointing)
    return Models(pipe, denoiser, plan, device)
