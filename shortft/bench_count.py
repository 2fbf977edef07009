"""One training step of an arm, counted: FLOPs, aten ops, calls, and a memory estimate (`shortft bench`).

The step runs on random weights of the same architecture: on the GPU itself, on a CPU for small
models, and on meta tensors for SD 1.5 and SDXL on a CPU (no memory), where attention and autocast are
made to behave as they do on a GPU (`shortft.counting`). The estimate is the peak of what backward keeps
alive: every parameter (frozen models, LoRAs, reward models), the LoRAs' gradients and AdamW state,
plus the larger of (a) every tensor saved for backward, as the forward ends, and (b) the chain's own
saved tensors plus what is recomputed while backward passes it: one network call under
`chain.checkpointing`, one image's decoder under `model.vae_checkpointing` (the reward's and the
decoder's saved tensors are freed by then). Checked against the H200's measured peaks in BENCHMARKS.md.
"""

from __future__ import annotations

from contextlib import ExitStack, nullcontext

import torch

from shortft.architectures import random_pipeline
from shortft.config import Config
from shortft.counting import FLOP_FORMULAS, OpCount, gpu_attention, gpu_autocast
from shortft.loop import autocast_for, micro_batch_loss
from shortft.models import DTYPES, checkpoint_with_adapters, decode_latents, frozen_parts, prepare_models
from shortft.pipelines import load_pipeline
from shortft.preflight import SavedBytes
from shortft.rewards import Rewards

PROMPTS = ["a photo of a cat", "a painting of a lighthouse", "concept art of a city", "an anime portrait"]


def build_pipeline(cfg: Config, random_weights: bool, device: torch.device | str, dtype: torch.dtype):
    if random_weights:
        return random_pipeline(cfg.model.pretrained, device, dtype)
    return load_pipeline(cfg.model.pretrained, dtype)


def draws() -> torch.Generator:
    """The random cuts and copies of alignprop, drtune, refl and draft_lv: one fixed draw for every
    counted and timed step, so that an arm's FLOPs, calls and seconds describe the same step."""
    return torch.Generator().manual_seed(0)


def step_inputs(models, batch: int):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    models.seen_prompts.update(PROMPTS)  # the bench's own stand-ins: a toy tokenizer's cut of them is no news
    return prompts, models.initial_noise(batch, torch.Generator().manual_seed(0))


def count_device(cfg: Config, target: torch.device) -> torch.device:
    """Where the counting step runs: the GPU itself, a CPU for small models, meta tensors for the real
    architectures on a CPU (no memory, but slow: every op runs in Python there)."""
    from shortft.architectures import HUB_IDS

    if target.type == "cpu" and cfg.model.pretrained in HUB_IDS:
        return torch.device("meta")
    return target


def count(cfg: Config, target: torch.device, rewards: Rewards | None = None) -> dict:
    """FLOPs and aten ops of one training step, its calls, and the memory estimate (module docstring) for
    `target`, in MB."""
    from torch.utils.flop_counter import FlopCounterMode

    autocast, amp = autocast_for(cfg, target)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    device = count_device(cfg, target)
    # Meta tensors have no autocast: `gpu_autocast` casts as CUDA's would.
    meta_amp, autocast = (amp_dtype, nullcontext()) if device.type == "meta" else (None, autocast)
    models = prepare_models(cfg, build_pipeline(cfg, True, device, amp_dtype or DTYPES[cfg.model.dtype]), device=device)
    rewards = rewards or Rewards(cfg.reward.weights, cfg.reward.options, device=device, random_weights=True)
    trainable = make_trainable(models)
    prompts, noise = step_inputs(models, cfg.train.batch_size)
    noise = noise.to(device)

    def gpu_like(with_autocast: bool = True) -> ExitStack:
        stack = ExitStack()
        for context in (gpu_attention(), gpu_autocast(meta_amp), *([autocast] if with_autocast else [])):
            stack.enter_context(context)
        return stack

    # Every parameter (frozen, LoRA, the reward models') is counted once, apart from what backward keeps.
    modules = [*frozen_parts(models.pipe), models.denoiser.shortcut_unet,
               *(m for m in rewards.fns.values() if isinstance(m, torch.nn.Module))]
    params = list({id(p): p for m in modules if m is not None for p in m.parameters()}.values())
    saved = _saved_bytes(models, params, blocks=cfg.model.gradient_checkpointing and not cfg.chain.checkpointing)
    decode = models.decode
    models.decode = lambda latents: (saved.mark(), decode(latents))[1]  # what the chain alone saved
    # (micro_batch_loss enters the real autocast itself)
    with gpu_like(False), FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter, OpCount() as ops:
        with saved.hooks():
            loss, _, _ = micro_batch_loss(models, rewards, cfg, prompts, noise, 1, draws(), autocast)
        loss.backward()
    del models.decode
    calls, grad_calls = models.denoiser.count.calls, models.denoiser.count.grad_calls
    recomputed = 0
    if cfg.chain.checkpointing:  # one call's activations exist again while its backward runs
        one_call = _saved_bytes(models, params, blocks=cfg.model.gradient_checkpointing)
        first = models.plan.calls(models.denoiser.timesteps(cfg.chain.steps))[0]
        condition = models.condition(prompts, cfg.chain.guidance_scale, cfg.model.shortcut_guidance_scale)
        models.denoiser.checkpointing = False
        with gpu_like(), one_call.hooks():
            models.denoiser.predict(noise, first, condition)
        recomputed = one_call.total
    if cfg.model.vae_checkpointing:  # one image's decoder, recomputed while backward passes it
        one_image = SavedBytes(params)
        with gpu_like(), one_image.hooks():
            decode_latents(models.pipe.vae, noise[:1].detach().requires_grad_(True))
        recomputed = max(recomputed, one_image.total)
    weights = sum(p.numel() * p.element_size() for p in params)  # the LoRAs' fp32 values among them
    lora = sum(p.numel() for p in trainable) * 4 * 3  # fp32 grad and AdamW's two moments
    kept = max(saved.total, saved.marked + recomputed)
    return {"flops": counter.get_total_flops(), "ops": ops.ops, "calls": calls, "grad_calls": grad_calls,
            "memory_estimate_mb": (weights + lora + kept) / 2**20}


def _saved_bytes(models, params: list[torch.nn.Parameter], blocks: bool) -> SavedBytes:
    """A counter of what backward keeps, `params` aside; with `blocks` (UNet gradient checkpointing),
    each checkpointed block's inputs too: they never pass the saved-tensor hooks (the checkpoint's own
    hooks take the block's tensors). Inside a checkpointed call (`chain.checkpointing`) not even those."""
    saved = SavedBytes(params)
    if blocks:
        models.unet.enable_gradient_checkpointing(saved.counting(checkpoint_with_adapters(models.denoiser.switch)))
    return saved


def make_trainable(models) -> list[torch.nn.Parameter]:
    """The LoRA parameters the first stage trains, made trainable."""
    names = models.plan.trainable(1)
    params = [p for n, p in models.unet.named_parameters() if "lora_" in n and any(f".{a}." in n for a in names)]
    for p in params:
        p.requires_grad_(True)
    return params
