"""Loading the frozen pipeline, the shortcut and the LoRAs to train; text encoding and VAE decoding.

Stable Diffusion 1.x/2.x (`StableDiffusionPipeline`) and SDXL (`StableDiffusionXLPipeline`: two text
encoders, pooled embeddings and the added time ids) load through the same `from_pretrained` path,
from a hub id, a local diffusers dir or `builtin:<name>`.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from shortft.compiling import check_compile, compile_graphs, compile_unet
from shortft.config import Config, ConfigError, check_device_name
from shortft.denoiser import Condition, Denoiser
from shortft.lora import AdapterSwitch, add_loras, check_targets
from shortft.pipelines import load_pipeline
from shortft.plan import TrainingPlan, training_plan
from shortft.progress import say, warn
from shortft.shortcut import load_lora_shortcut, load_unet_shortcut, steps_warning

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str, flag: str = "model.device") -> torch.device:
    """The device `name` (auto, cpu, cuda, cuda:N) on this machine; a ConfigError naming `flag` if it has none."""
    check_device_name(flag, name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{flag}={name!r}: CUDA is not available here; use {flag}=cpu or auto")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():  # else "invalid device ordinal" later
        raise ConfigError(f"{flag}={name!r}: this machine sees {torch.cuda.device_count()} GPU(s), cuda:0 to "
                          f"cuda:{torch.cuda.device_count() - 1} (CUDA_VISIBLE_DEVICES counts)")
    return torch.device(name)


def keeps_cfg(shortcut) -> bool:
    """A shortcut LoRA distilled with classifier-free guidance kept, by its file name
    (`Hyper-SD15-8steps-CFG-lora.safetensors`)."""
    return shortcut.kind == "lora" and bool(re.search(r"[-_.]cfg[-_.]", f"-{shortcut.weight_name or shortcut.path}-".lower()))


def is_sdxl(pipe) -> bool:
    return type(pipe).__name__ == "StableDiffusionXLPipeline"


@dataclass
class Models:
    pipe: "diffusers.DiffusionPipeline"  # noqa: F821  the frozen parts, and the UNet with its LoRAs
    denoiser: Denoiser
    plan: TrainingPlan
    device: torch.device
    resolution: int  # image side in pixels
    vae_batch_size: int = 0  # images per VAE decode (0 = all)
    vae_checkpointing: bool = False
    empty_prompt: list = field(default_factory=list, repr=False)  # [states, pooled] of "", made on first use
    seen_prompts: set = field(default_factory=set, repr=False)  # told apart once: longer than the encoder takes

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def adapters(self) -> tuple[str, ...]:
        return self.plan.adapters

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompts -> ([B, L, D] text states, [B, P] pooled states or None), as the pipeline encodes them."""
        warn_truncated(self.pipe.tokenizer, prompts, self.seen_prompts)
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
        """SDXL micro-conditioning as the pipeline computes it by default: (original size, crop
        top-left (0, 0), target size), all at the run's resolution."""
        if pooled is None:
            return None
        size = self.resolution
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=pooled.dtype, device=self.device)
        return {"text_embeds": pooled, "time_ids": time_ids.expand(batch, -1)}

    def condition(self, prompts: list[str], guidance_scale: float, shortcut_guidance_scale: float | None) -> Condition:
        cond, pooled = self.encode(prompts)
        shortcut_scale = shortcut_guidance_scale
        if shortcut_scale is None:
            # Hyper-SD, TCD and LCM LoRAs (and few-step UNets) are distilled to run without CFG; the base
            # model jumping on its own (shortcut none) is guided like every other call, and so is a LoRA
            # whose file says it kept CFG (Hyper-SD's `-CFG-` files: guidance 5-8 by their card).
            shortcut_scale = guidance_scale if self.plan.shortcut.kind == "none" or keeps_cfg(self.plan.shortcut) else 1.0
        uncond, uncond_pooled = None, None
        if max(guidance_scale, shortcut_scale) > 1:
            uncond, uncond_pooled = self._unconditional(len(prompts))
        return Condition(cond, uncond, guidance_scale, shortcut_scale, self._added(pooled, len(prompts)),
                         self._added(uncond_pooled, len(prompts)))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, 4, h, w] latents -> [B, 3, H, W] images in [0, 1], differentiable."""
        return decode_latents(self.pipe.vae, latents, self.vae_batch_size, self.vae_checkpointing)

    def initial_noise(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        unet = self.pipe.unet
        size = self.resolution // self.pipe.vae_scale_factor
        shape = (batch, unet.config.in_channels, size, size)
        # Drawn on the CPU so that a seed gives the same noise on every device.
        return torch.randn(shape, generator=generator).to(self.device, unet.dtype)


def warn_truncated(tokenizer, prompts: list[str], seen: set) -> None:
    """One line for the prompts (not in `seen`) longer than the text encoder takes: they are cut there, as
    diffusers' pipelines cut them, whose warning the project's quiet logging hid."""
    new = [p for p in dict.fromkeys(prompts) if p not in seen]
    if not new:
        return
    seen.update(new)
    limit = tokenizer.model_max_length
    cut = [p for p, ids in zip(new, tokenizer(new, truncation=False).input_ids) if len(ids) > limit]
    if cut:
        warn(f"shortft: {len(cut)} prompt(s) longer than the text encoder's {limit} tokens are cut there "
             f"(e.g. {cut[0][:80]!r})")


def encode_text(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Prompts -> [B, L, D] last hidden states, as the SD 1.x/2.x pipelines encode them (no clip skip)."""
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    return text_encoder(tokens.input_ids.to(text_encoder.device))[0]


def decode_latents(vae, latents: torch.Tensor, batch_size: int = 0, checkpointed: bool = False) -> torch.Tensor:
    """[B, 4, h, w] latents -> [B, 3, H, W] images in [0, 1] (differentiable), `batch_size` at a time
    (0 = all), each recomputed in backward if `checkpointed` (the decoder's activations at 512-1024 px
    are larger than the UNet's)."""

    def decode(z: torch.Tensor) -> torch.Tensor:
        with _own_precision(vae, z.device):
            return vae.decode(z.to(vae.dtype) / vae.config.scaling_factor).sample

    parts = latents.split(batch_size) if batch_size else (latents,)
    if checkpointed and torch.is_grad_enabled():
        images = [checkpoint(decode, z, use_reentrant=False) for z in parts]
    else:
        images = [decode(z) for z in parts]
    return (torch.cat(images).float() / 2 + 0.5).clamp(0, 1)


def _own_precision(vae, device: torch.device):
    """A VAE that overflows in fp16 (SDXL's: `force_upcast`, its weights upcast at load) decodes in fp32 under
    an fp16 autocast too (`train.mixed_precision=fp16`): its convolutions ran in fp16 there, weights or not,
    and gave NaN images; diffusers' pipelines upcast it where no autocast is on."""
    kind = device.type
    if (getattr(vae.config, "force_upcast", False) and torch.amp.is_autocast_available(kind)
            and torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.float16):
        return torch.autocast(kind, enabled=False)
    return nullcontext()


def frozen_parts(pipe) -> list[torch.nn.Module]:
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    return [getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None]


def load_models(cfg: Config, with_loras: bool = True, plan: TrainingPlan | None = None) -> Models:
    """Load the pipeline, freeze everything, add the shortcut and the trainable LoRAs of `plan`
    (default: the config's own training plan)."""
    check_compile(cfg.model, pick_device(cfg.model.device))  # before the weights load
    pipe = load_pipeline(cfg.model.pretrained, DTYPES[cfg.model.dtype], cfg.model.revision, cfg.model.variant)
    return prepare_models(cfg, pipe, with_loras, plan)


def prepare_models(cfg: Config, pipe, with_loras: bool = True, plan: TrainingPlan | None = None,
                   device: torch.device | None = None) -> Models:
    """Freeze a loaded (or random-weight) pipeline, add the shortcut and the trainable LoRAs."""
    plan = plan or training_plan(cfg)
    device = device or pick_device(cfg.model.device)
    check_compile(cfg.model, device)
    dtype = DTYPES[cfg.model.dtype]
    for part in frozen_parts(pipe):
        part.requires_grad_(False).eval()

    if cfg.model.timestep_spacing:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, timestep_spacing=cfg.model.timestep_spacing)
    resolution = model_resolution(cfg, pipe)

    shortcut_unet, shortcut_adapter = None, None
    if plan.shortcut.kind == "lora":
        shortcut_adapter = load_lora_shortcut(pipe, cfg, plan.shortcut)
    elif plan.shortcut.kind == "unet":
        shortcut_unet = load_unet_shortcut(plan.shortcut, pipe.unet, dtype, device, cfg.model.shortcut_revision,
                                           cfg.model.variant)
        guided = cfg.model.shortcut_guidance_scale
        if getattr(shortcut_unet.config, "time_cond_proj_dim", None) and guided is not None and guided > 1:
            raise ConfigError(f"model.shortcut_guidance_scale={guided}: this LCM-distilled shortcut UNet takes its "
                              "guidance as an embedding of chain.guidance_scale; guided again it would be guided twice; "
                              "leave model.shortcut_guidance_scale unset")
    warning = steps_warning(cfg, plan.shortcut)
    if warning:
        warn(warning)

    if with_loras:
        check_targets(pipe.unet, cfg.lora.targets)
        torch.manual_seed(cfg.train.seed)  # LoRA A is drawn at random: same seed, same start
        add_loras(pipe.unet, plan.adapters, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
    else:
        from dataclasses import replace

        plan = replace(plan, adapters=())
    pipe.unet.requires_grad_(False)  # LoRA params are made trainable by the loop, stage by stage
    if pipe.vae.dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
        pipe.vae.to(torch.float32)  # SDXL's VAE overflows in fp16; its pipeline upcasts it the same way
    pipe.to(device)
    switch = AdapterSwitch(pipe.unet)
    if cfg.model.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing(checkpoint_with_adapters(switch))
        if shortcut_unet is not None:  # ShortFT's gradient crosses its jumps: it kept every activation
            shortcut_unet.enable_gradient_checkpointing()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.model.tf32
    if cfg.model.compile:
        limit = compile_graphs(plan)
        for unet in (pipe.unet, shortcut_unet):
            if unet is not None:
                compile_unet(unet, limit, cfg.model.compile_backend)
        say(f"model.compile: the UNets compile during the first steps and the first evaluation, up to "
            f"{limit} graphs (one per set of LoRAs, grad mode and batch size)")
    denoiser = Denoiser(pipe.unet, pipe.scheduler, switch, shortcut_unet, shortcut_adapter,
                        checkpointing=cfg.chain.checkpointing)
    return Models(pipe, denoiser, plan, device, resolution, cfg.model.vae_batch_size, cfg.model.vae_checkpointing)


def model_resolution(cfg: Config, pipe) -> int:
    """`model.resolution`, or the model's own (UNet sample size x VAE factor); a multiple of the VAE factor."""
    factor = pipe.vae_scale_factor
    if cfg.model.resolution is None:
        return pipe.unet.config.sample_size * factor
    if cfg.model.resolution % factor:
        low = cfg.model.resolution // factor * factor
        raise ConfigError(f"model.resolution={cfg.model.resolution}: not a multiple of this model's VAE factor "
                          f"{factor}; use {low or factor} or {low + factor}")
    return cfg.model.resolution


def checkpoint_with_adapters(switch: AdapterSwitch):
    """diffusers' gradient-checkpointing function, made to recompute each block with the LoRAs that were
    active when it ran forward: the chain switches LoRAs between calls, and by the time backward
    recomputes a block another set is active."""

    def run(module, *args):
        active = switch.active

        def forward(*inputs):
            if active is not None:
                switch.activate(active)
            return module(*inputs)

        return checkpoint(forward, *args, use_reentrant=False)

    return run
