"""Toy build stage 5 and `shortft toy check`: the base model's judge accuracy on held-out prompts, the
shortcuts' jump errors and the reward/judge ranking, recomputed from the files of a build."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shortft.chain import original_sampler
from shortft.denoiser import Condition, Denoiser
from shortft.lora import AdapterSwitch, load_unet_lora
from shortft.models import decode_latents, encode_text
from shortft.pipelines import load_pipeline
from shortft.plan import sampler_plan
from shortft.toy import grammar
from shortft.toy.judge_training import ranking_accuracy
from shortft.toy.judges import AttributeNet, prompt_score, shape_and_colour_right
from shortft.toy.shortcuts import jump_errors, teacher_trajectories
from shortft.toy.sizes import SEGMENTS, BuildSize


@torch.no_grad()
def base_samples(denoiser: Denoiser, tokenizer, text_encoder, vae, prompts: list[str], noise: torch.Tensor,
                 steps: int, guidance: float, chunk: int = 64) -> torch.Tensor:
    """[B, 3, 32, 32] images of the base model (no LoRA): the N-step guided DDIM sampler, in chunks."""
    calls = sampler_plan(denoiser.timesteps(steps), 1, lambda segment: ())
    images = []
    for i in range(0, len(prompts), chunk):
        cond = encode_text(tokenizer, text_encoder, prompts[i:i + chunk])
        uncond = encode_text(tokenizer, text_encoder, [""]).expand_as(cond)
        latents = original_sampler(denoiser, noise[i:i + chunk], Condition(cond, uncond, guidance, guidance), calls)
        images.append(decode_latents(vae, latents))
    return torch.cat(images)


@torch.no_grad()
def measure(path: str | Path, samples: int = 256, steps: int = 50, seed: int = 0) -> dict:
    """The acceptance figures of a toy build, recomputed from the files on disk."""
    path = Path(path)
    pipe = load_pipeline(str(path))
    pipe.unet.eval()
    tok, te, vae, unet = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet
    judge, reward = AttributeNet.load(path / "judge"), AttributeNet.load(path / "reward")
    _, held = grammar.split_triples(seed)
    out: dict = {"reward_ranking_accuracy": ranking_accuracy(reward, held, seed + 40),
                 "judge_ranking_accuracy": ranking_accuracy(judge, held, seed + 40)}
    prompts = grammar.eval_prompts(seed)
    prompts = [prompts[i % len(prompts)] for i in range(samples)]
    denoiser = Denoiser(unet, pipe.scheduler, AdapterSwitch(unet))
    size = BuildSize(teacher_steps=steps)
    noise = torch.cat([torch.randn((min(64, samples - i), 4, 8, 8), generator=torch.Generator().manual_seed(seed + 5 + i))
                       for i in range(0, samples, 64)])
    images = base_samples(denoiser, tok, te, vae, prompts, noise, steps, size.eval_guidance)
    out["base_judge_accuracy"] = float(shape_and_colour_right(judge(images), prompts).mean())
    out["base_reward"] = float(prompt_score(reward(images), prompts).mean())

    rng = np.random.default_rng(seed + 6)
    attrs = grammar.sample_attributes(rng, grammar.all_triples(), 128)
    cond = encode_text(tok, te, grammar.sample_prompts(rng, attrs))
    uncond = encode_text(tok, te, [""]).expand_as(cond)
    noise = torch.randn((128, 4, 8, 8), generator=torch.Generator().manual_seed(seed + 7))
    traj = teacher_trajectories(denoiser, cond, uncond, noise, steps, size.guidance)
    for k in SEGMENTS:
        if (path / f"shortcut-k{k}").is_dir():
            load_unet_lora(unet, path / f"shortcut-k{k}", f"shortcut-k{k}")  # (no peft warning per adapter)
            denoiser.switch = AdapterSwitch(unet)
            out[f"shortcut_k{k}"] = jump_errors(size, k, denoiser, traj, cond, uncond)
    return out
