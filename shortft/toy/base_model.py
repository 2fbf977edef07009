"""Toy build stages 1-2: the VAE, then the text encoder and UNet trained jointly (eps-prediction,
10% empty prompts so that classifier-free guidance works)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from shortft.models import encode_text
from shortft.toy import grammar
from shortft.toy.sizes import BuildSize, batches, progress


# -- 1. VAE ---------------------------------------------------------------------------------------
def train_vae(size: BuildSize, triples: list, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    w = size.vae_widths
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=w,
                        down_block_types=("DownEncoderBlock2D",) * len(w), up_block_types=("UpDecoderBlock2D",) * len(w),
                        layers_per_block=1, norm_num_groups=8, sample_size=grammar.IMAGE_SIZE,
                        mid_block_add_attention=False)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    data, t0 = batches(seed, triples, size.vae_batch), time.time()
    for step in range(1, size.vae_steps + 1):
        images, _, _ = next(data)
        x = images * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        progress("vae", step, size.vae_steps, loss.item(), t0)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        images, _, _ = next(data)
        z = vae.encode(images * 2 - 1).latent_dist.mean
        vae.register_to_config(scaling_factor=float(1 / z.std()))
        mse = float(F.mse_loss(vae.decode(z).sample, images * 2 - 1))
    return vae, {"vae_recon_mse": mse, "vae_scaling_factor": vae.config.scaling_factor}


# -- 2. text encoder + UNet -----------------------------------------------------------------------
def make_text_and_unet(size: BuildSize, seed: int):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from shortft.builtin import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(grammar.VOCAB, max_length=20)
    torch.manual_seed(seed)
    d = size.text_width
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=d, intermediate_size=2 * d, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=20, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    w = size.unet_widths
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=w, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=d, attention_head_dim=8, norm_num_groups=min(16, w[0]))
    return tokenizer, text_encoder, unet


def train_unet(size: BuildSize, triples: list, vae, tokenizer, text_encoder, unet, scheduler, seed: int):
    torch.manual_seed(seed)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    warm = min(200, size.unet_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / size.unet_steps))))
    data, t0 = batches(seed, triples, size.batch), time.time()
    gen = torch.Generator().manual_seed(seed)
    ac = scheduler.alphas_cumprod
    for step in range(1, size.unet_steps + 1):
        images, prompts, _ = next(data)
        prompts = [p if r > 0.1 else "" for p, r in zip(prompts, torch.rand(len(prompts), generator=gen).tolist())]
        with torch.no_grad():
            z = vae.encode(images * 2 - 1).latent_dist.sample(generator=gen) * vae.config.scaling_factor
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z),), generator=gen)
        noise = torch.randn(z.shape, generator=gen)
        a = ac[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * z + (1 - a).sqrt() * noise
        pred = unet(x_t, t, encoder_hidden_states=encode_text(tokenizer, text_encoder, prompts)).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        progress("unet", step, size.unet_steps, loss.item(), t0)
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
