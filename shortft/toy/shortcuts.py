"""Toy build stage 3: shortcut LoRAs distilled onto the teacher's own DDIM paths, and their jump errors.

One LoRA per k, trained by direct regression: from the teacher's latent at a segment's first timestep,
one conditional call + DDIM jump must land where the N-step DDIM path lands at the segment's last
timestep (see `build.py` for why this is enough)."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from shortft.chain import run_calls
from shortft.denoiser import Condition
from shortft.lora import AdapterSwitch, lora_params
from shortft.plan import Call, sampler_plan, segment_bounds
from shortft.toy.sizes import BuildSize, log, progress

SHORTCUT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2")


@torch.no_grad()
def teacher_trajectories(denoiser, cond, uncond, noise, steps: int, guidance: float) -> torch.Tensor:
    """Guided DDIM path of the frozen teacher: [steps + 1, B, 4, 8, 8] latents at every timestep."""
    calls = sampler_plan(denoiser.timesteps(steps), 1, lambda s: ())
    path = [noise]
    run_calls(denoiser, noise, calls, ["none"] * len(calls), Condition(cond, uncond, guidance, guidance),
              on_call=lambda n, call, x: path.append(x))
    return torch.stack(path)


def teacher_paths(denoiser, cond, uncond, noise, size: BuildSize, chunk: int = 256) -> torch.Tensor:
    """`teacher_trajectories` for many samples, in chunks, with progress: [steps + 1, B, 4, 8, 8]."""
    out, t0, n = [], time.time(), len(noise)
    for i in range(0, n, chunk):
        out.append(teacher_trajectories(denoiser, cond[i:i + chunk], uncond[i:i + chunk], noise[i:i + chunk],
                                        size.teacher_steps, size.guidance))
        done = min(n, i + chunk)
        if n > 8 * chunk and (done // chunk) % max(1, n // chunk // 10) == 0 or done == n:
            rate = (time.time() - t0) / done
            log(f"  [teacher paths] {done}/{n}  {rate * 1000:.1f} ms/path  eta {rate * (n - done):.0f} s")
    return torch.cat(out, 1)


def jump_indices(timesteps: list[int], k: int) -> list[tuple[int, int]]:
    """(start index, landing index) of the shortcut jumps of a ShortFT chain with k segments."""
    b = segment_bounds(len(timesteps), k)
    return [(b[j - 1], b[j] - 1) for j in range(2, k + 1) if b[j] - 1 > b[j - 1]]


def distill_shortcut(size: BuildSize, k: int, denoiser, unet, traj, cond, uncond, seed: int, fresh=None) -> dict:
    """Train LoRA `shortcut-k{k}` so that one conditional call + DDIM jump lands on the teacher.
    `fresh` = (traj, cond, uncond) of held-out paths, for size.shortcut_eval_every."""
    from peft import LoraConfig

    name = f"shortcut-k{k}"
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=size.shortcut_rank, lora_alpha=size.shortcut_rank,
                                target_modules=list(SHORTCUT_TARGETS)), adapter_name=name)
    denoiser.switch = AdapterSwitch(unet)  # the UNet has new LoRA layers now
    params = list(lora_params(unet, name).values())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=size.shortcut_lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, size.shortcut_steps)
    ts = denoiser.timesteps(size.teacher_steps)
    jumps = jump_indices(ts, k)
    n = traj.shape[1]
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(1, size.shortcut_steps + 1):
        idx = torch.randint(n, (size.shortcut_batch,), generator=gen).to(traj.device)
        j = jumps[int(torch.randint(len(jumps), (1,), generator=gen))]
        call = Call(j[0], ts[j[0]], ts[j[1]], False, (name,), 0)
        g = size.shortcut_guidance
        c = Condition(cond[idx], uncond[idx] if g > 1 else None, g, g)
        x, _ = denoiser.ddim(traj[j[0], idx], denoiser.predict(traj[j[0], idx], call, c), call.t, call.t_next)
        loss = F.mse_loss(x, traj[j[1], idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
        progress(name, step, size.shortcut_steps, loss.item(), t0)
        if fresh is not None and size.shortcut_eval_every > 0 and step % size.shortcut_eval_every == 0:
            info = fresh_and_seen_errors(size, k, denoiser, fresh, traj, cond, uncond)
            log(f"  [{name}] step {step}: {info['ratio']:.2f}x on fresh paths, {info['train_ratio']:.2f}x on training ones")
    unet.requires_grad_(False)
    return {"jumps": [(ts[a], ts[b]) for a, b in jumps]}


def fresh_and_seen_errors(size: BuildSize, k: int, denoiser, fresh, traj, cond, uncond) -> dict:
    """`jump_errors` on the fresh paths, plus `train_ratio`: the ratio on as many of the training paths.
    The gap between the two is the shortcut's overfitting."""
    seen = slice(0, fresh[0].shape[1])
    return {**jump_errors(size, k, denoiser, *fresh),
            "train_ratio": jump_errors(size, k, denoiser, traj[:, seen], cond[seen], uncond[seen])["ratio"]}


@torch.no_grad()
def jump_errors(size: BuildSize, k: int, denoiser, traj, cond, uncond) -> dict:
    """Mean squared distance to the teacher's landing latent: distilled shortcut vs naive DDIM jump."""
    ts = denoiser.timesteps(size.teacher_steps)
    per_jump = []
    for a, b in jump_indices(ts, k):
        target = traj[b]
        shortcut_call = Call(a, ts[a], ts[b], False, (f"shortcut-k{k}",), 0)
        g = size.shortcut_guidance
        x, _ = denoiser.ddim(traj[a], denoiser.predict(traj[a], shortcut_call, Condition(cond, uncond if g > 1 else None, g, g)), ts[a], ts[b])
        naive = Call(a, ts[a], ts[b], False, (), 0)
        y, _ = denoiser.ddim(traj[a], denoiser.predict(traj[a], naive, Condition(cond, uncond, size.guidance, size.guidance)),
                       ts[a], ts[b])
        per_jump.append([ts[a], ts[b], float(((x - target) ** 2).mean()), float(((y - target) ** 2).mean())])
    shortcut_mse = float(np.mean([j[2] for j in per_jump]))
    naive_mse = float(np.mean([j[3] for j in per_jump]))
    return {"shortcut_mse": shortcut_mse, "naive_mse": naive_mse,
            "ratio": naive_mse / shortcut_mse if shortcut_mse > 0 else float("inf"),
            "per_jump": per_jump}  # [t_start, t_landing, shortcut MSE, naive MSE]
