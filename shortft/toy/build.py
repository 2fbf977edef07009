"""`shortft toy build`: train the toy world from seeds, deterministically, and write it in diffusers format.

Stages (each prints progress and its figures; all land in <out>/build.json):
  1. VAE         AutoencoderKL on rendered 32x32 images (latents 4x8x8), scaling factor = 1/std.
  2. text + UNet CLIPTextModel (tokenizer from the grammar's words) and UNet2DConditionModel trained
                 jointly on eps-prediction, 10% empty prompts so classifier-free guidance works.
  3. shortcuts   one LoRA per k in (2, 4, 8), distilled by direct regression onto the teacher's ODE
                 endpoints: from the teacher's own latent at a segment's first timestep, one conditional
                 call + DDIM jump must land where the N-step DDIM path (unguided) lands at the segment's
                 last timestep. Direct regression needs only teacher trajectories (no target network,
                 no bootstrapping), which is cheap here and is exactly the property ShortFT relies on.
                 The fit is bound by the number of distinct paths (the gap between the error on training
                 and on fresh paths, both printed, shrinks with more), hence 8192 of them. `--device cuda`
                 runs this stage on a GPU, where far more paths are cheap; the other stages stay on the CPU.
  4. reward, judge  two AttributeNets, different seeds, widths, pooling and data streams.
  5. checks      judge accuracy of base samples on held-out prompts, shortcut vs naive jump error,
                 reward/judge matched-vs-mismatched ranking, a sample grid.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shortft.toy import grammar
from shortft.toy.judges import HEADS, AttributeNet, prompt_score, shape_and_colour_right


@dataclass
class BuildSize:
    """The full build takes about 105 minutes on a 2-core CPU (README: time by stage)."""

    vae_steps: int = 800
    vae_widths: tuple = (16, 32, 32)
    vae_batch: int = 32
    unet_steps: int = 4000
    unet_widths: tuple = (32, 64)
    text_width: int = 32
    batch: int = 64
    teacher_samples: int = 8192
    shortcut_steps: int = 1500
    shortcut_rank: int = 8
    judge_steps: int = 800
    eval_samples: int = 256
    teacher_steps: int = 50
    guidance: float = 1.0  # of the teacher paths the shortcuts follow (the toy config trains without CFG)
    shortcut_guidance: float = 1.0  # of the jump itself: same as the teacher, so the LoRA learns the curvature
    shortcut_lr: float = 3e-3
    shortcut_batch: int = 64
    shortcut_eval_every: int = 0  # >0: print the jump-error ratio on training and fresh paths every n steps
    eval_guidance: float = 4.0  # of the base-model accuracy check


QUICK = BuildSize(vae_steps=40, vae_widths=(8, 16, 16), vae_batch=16, unet_steps=60, unet_widths=(16, 32),
                  text_width=16, batch=16, teacher_samples=32, shortcut_steps=15, shortcut_rank=2, shortcut_batch=16,
                  judge_steps=40, eval_samples=16, teacher_steps=10)
SEGMENTS = (2, 4, 8)


SHORTCUT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2")


def log(msg: str) -> None:
    print(msg, flush=True)


def _batches(seed: int, triples: list, batch: int):
    """Endless (images [B,3,32,32], prompts, attributes) from the generator, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    while True:
        attrs = grammar.sample_attributes(rng, triples, batch)
        prompts = grammar.sample_prompts(rng, attrs)
        yield grammar.render(attrs, rng), prompts, attrs


def _progress(stage: str, step: int, total: int, loss: float, t0: float) -> None:
    if step == 1 or step % max(1, total // 10) == 0 or step == total:
        rate = (time.time() - t0) / step
        log(f"  [{stage}] {step}/{total}  loss {loss:.4f}  {rate:.2f} s/step  eta {rate * (total - step):.0f} s")


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
    data, t0 = _batches(seed, triples, size.vae_batch), time.time()
    for step in range(1, size.vae_steps + 1):
        images, _, _ = next(data)
        x = images * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        _progress("vae", step, size.vae_steps, loss.item(), t0)
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


def _encode(tokenizer, text_encoder, prompts):
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def train_unet(size: BuildSize, triples: list, vae, tokenizer, text_encoder, unet, scheduler, seed: int):
    torch.manual_seed(seed)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    warm = min(200, size.unet_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / size.unet_steps))))
    data, t0 = _batches(seed, triples, size.batch), time.time()
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
        pred = unet(x_t, t, encoder_hidden_states=_encode(tokenizer, text_encoder, prompts)).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        _progress("unet", step, size.unet_steps, loss.item(), t0)
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)


# -- 3. shortcuts ---------------------------------------------------------------------------------
@torch.no_grad()
def teacher_trajectories(dn, cond, uncond, noise, steps: int, guidance: float) -> torch.Tensor:
    """Guided DDIM path of the frozen teacher: [steps + 1, B, 4, 8, 8] latents at every timestep."""
    from shortft.chain import Condition, run_calls
    from shortft.plan import sampler_plan

    calls = sampler_plan(dn.timesteps(steps), 1, lambda s: ())
    path = [noise]
    run_calls(dn, noise, calls, ["none"] * len(calls), Condition(cond, uncond, guidance, guidance),
              on_call=lambda n, call, x: path.append(x))
    return torch.stack(path)


def teacher_paths(dn, cond, uncond, noise, size: BuildSize, chunk: int = 256) -> torch.Tensor:
    """`teacher_trajectories` for many samples, in chunks, with progress: [steps + 1, B, 4, 8, 8]."""
    out, t0, n = [], time.time(), len(noise)
    for i in range(0, n, chunk):
        out.append(teacher_trajectories(dn, cond[i:i + chunk], uncond[i:i + chunk], noise[i:i + chunk],
                                        size.teacher_steps, size.guidance))
        done = min(n, i + chunk)
        if n > 8 * chunk and (done // chunk) % max(1, n // chunk // 10) == 0 or done == n:
            rate = (time.time() - t0) / done
            log(f"  [teacher paths] {done}/{n}  {rate * 1000:.1f} ms/path  eta {rate * (n - done):.0f} s")
    return torch.cat(out, 1)


def _jumps(timesteps: list[int], k: int) -> list[tuple[int, int]]:
    """(start index, landing index) of the shortcut jumps of a ShortFT chain with k segments."""
    from shortft.plan import segment_bounds

    b = segment_bounds(len(timesteps), k)
    return [(b[j - 1], b[j] - 1) for j in range(2, k + 1) if b[j] - 1 > b[j - 1]]


def distill_shortcut(size: BuildSize, k: int, dn, unet, traj, cond, uncond, seed: int, fresh=None) -> dict:
    """Train LoRA `shortcut-k{k}` so that one conditional call + DDIM jump lands on the teacher.
    `fresh` = (traj, cond, uncond) of held-out paths, for size.shortcut_eval_every."""
    from peft import LoraConfig

    from shortft.chain import Condition
    from shortft.lora import AdapterSwitch, lora_params
    from shortft.plan import Call

    name = f"shortcut-k{k}"
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=size.shortcut_rank, lora_alpha=size.shortcut_rank,
                                target_modules=list(SHORTCUT_TARGETS)), adapter_name=name)
    dn.switch = AdapterSwitch(unet)  # the UNet has new LoRA layers now
    params = list(lora_params(unet, name).values())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=size.shortcut_lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, size.shortcut_steps)
    ts = dn.timesteps(size.teacher_steps)
    jumps = _jumps(ts, k)
    n = traj.shape[1]
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(1, size.shortcut_steps + 1):
        idx = torch.randint(n, (size.shortcut_batch,), generator=gen).to(traj.device)
        j = jumps[int(torch.randint(len(jumps), (1,), generator=gen))]
        call = Call(j[0], ts[j[0]], ts[j[1]], False, (name,), 0)
        g = size.shortcut_guidance
        c = Condition(cond[idx], uncond[idx] if g > 1 else None, g, g)
        x, _ = dn.ddim(traj[j[0], idx], dn.predict(traj[j[0], idx], call, c), call.t, call.t_next)
        loss = F.mse_loss(x, traj[j[1], idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
        _progress(name, step, size.shortcut_steps, loss.item(), t0)
        if fresh is not None and size.shortcut_eval_every > 0 and step % size.shortcut_eval_every == 0:
            info = fresh_and_seen_errors(size, k, dn, fresh, traj, cond, uncond)
            log(f"  [{name}] step {step}: {info['ratio']:.2f}x on fresh paths, {info['train_ratio']:.2f}x on training ones")
    unet.requires_grad_(False)
    return {"jumps": [(ts[a], ts[b]) for a, b in jumps]}


def fresh_and_seen_errors(size: BuildSize, k: int, dn, fresh, traj, cond, uncond) -> dict:
    """`jump_errors` on the fresh paths, plus `train_ratio`: the ratio on as many of the training paths.
    The gap between the two is the shortcut's overfitting."""
    seen = slice(0, fresh[0].shape[1])
    return {**jump_errors(size, k, dn, *fresh),
            "train_ratio": jump_errors(size, k, dn, traj[:, seen], cond[seen], uncond[seen])["ratio"]}


@torch.no_grad()
def jump_errors(size: BuildSize, k: int, dn, traj, cond, uncond) -> dict:
    """Mean squared distance to the teacher's landing latent: distilled shortcut vs naive DDIM jump."""
    from shortft.chain import Condition
    from shortft.plan import Call

    ts = dn.timesteps(size.teacher_steps)
    per_jump = []
    for a, b in _jumps(ts, k):
        target = traj[b]
        sc = Call(a, ts[a], ts[b], False, (f"shortcut-k{k}",), 0)
        g = size.shortcut_guidance
        x, _ = dn.ddim(traj[a], dn.predict(traj[a], sc, Condition(cond, uncond if g > 1 else None, g, g)), ts[a], ts[b])
        naive = Call(a, ts[a], ts[b], False, (), 0)
        y, _ = dn.ddim(traj[a], dn.predict(traj[a], naive, Condition(cond, uncond, size.guidance, size.guidance)),
                       ts[a], ts[b])
        per_jump.append([ts[a], ts[b], float(((x - target) ** 2).mean()), float(((y - target) ** 2).mean())])
    s, nv = float(np.mean([j[2] for j in per_jump])), float(np.mean([j[3] for j in per_jump]))
    return {"shortcut_mse": s, "naive_mse": nv, "ratio": nv / s if s > 0 else float("inf"),
            "per_jump": per_jump}  # [t_start, t_landing, shortcut MSE, naive MSE]


# -- 4. reward and judge --------------------------------------------------------------------------
def train_attribute_net(size: BuildSize, triples: list, vae, seed: int, widths, kernel: int, pool: str, tag: str):
    torch.manual_seed(seed)
    net = AttributeNet(widths, kernel, pool)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    data, t0 = _batches(seed, triples, size.batch), time.time()
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, size.judge_steps + 1):
        images, _, attrs = next(data)
        with torch.no_grad():  # half the batch through the VAE, so decoded samples look familiar
            half = len(images) // 2
            rec = vae.decode(vae.encode(images[:half] * 2 - 1).latent_dist.mean).sample
            images = torch.cat([(rec / 2 + 0.5).clamp(0, 1), images[half:]])
            images = (images + 0.03 * torch.randn(images.shape, generator=gen)).clamp(0, 1)
        logits = net(images)
        loss = sum(F.cross_entropy(logits[h], torch.tensor([HEADS[h].index(getattr(a, h)) for a in attrs]))
                   for h in HEADS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        _progress(tag, step, size.judge_steps, loss.item(), t0)
    return net.eval().requires_grad_(False)


@torch.no_grad()
def ranking_accuracy(net, held: list, seed: int, n: int = 512) -> float:
    """Share of held-out images whose own prompt outscores a prompt with another shape or colour."""
    rng = np.random.default_rng(seed)
    attrs = grammar.sample_attributes(rng, held, n)
    images = grammar.render(attrs, rng)
    match = [f"a {a.colour} {a.shape} on a {a.background} background" for a in attrs]
    wrong = []
    for a in attrs:
        if rng.random() < 0.5:
            shape = grammar.SHAPES[(grammar.SHAPES.index(a.shape) + rng.integers(1, len(grammar.SHAPES))) % 4]
            wrong.append(f"a {a.colour} {shape} on a {a.background} background")
        else:
            others = [c for c in grammar.COLOURS if c not in (a.colour, a.background)]
            wrong.append(f"a {others[rng.integers(len(others))]} {a.shape} on a {a.background} background")
    logits = net(images)
    return float((prompt_score(logits, match) > prompt_score(logits, wrong)).float().mean())


# -- the whole build ------------------------------------------------------------------------------
def build_size(quick: bool = False, overrides: dict | None = None) -> BuildSize:
    """The build's sizes with `overrides` (from `--set key=value`) applied; unknown keys are a ConfigError."""
    from dataclasses import fields, replace

    from shortft.config import ConfigError

    size = QUICK if quick else BuildSize()
    names = [f.name for f in fields(BuildSize)]
    clean = {}
    for key, value in (overrides or {}).items():
        if key not in names:
            raise ConfigError(f"--set {key}=...: not a build size; the sizes are {', '.join(names)}")
        default = getattr(size, key)
        if isinstance(default, tuple) and isinstance(value, list) and all(isinstance(v, int) for v in value):
            value = tuple(value)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(default):
            raise ConfigError(f"--set {key}={value!r}: expected {type(default).__name__} like {default!r}")
        clean[key] = value
    return replace(size, **clean)


def build(out: Path, quick: bool = False, seed: int = 0, base: Path | None = None, overrides: dict | None = None,
          device: str = "cpu") -> dict:
    """Build everything into `out`. With `base`, reuse that build's VAE, text encoder and UNet and redo
    the shortcuts, reward, judge and checks (`overrides` change BuildSize fields, e.g. shortcut_steps).
    `device` runs the shortcut stage (teacher paths and distillation, the part that wants many paths)
    there; every other stage runs on the CPU, so only the shortcuts depend on where it was built."""

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from shortft.chain import Denoiser
    from shortft.evaluate import save_grid
    from shortft.lora import AdapterSwitch, save_loras
    from shortft.models import pick_device

    torch.set_num_threads(max(1, torch.get_num_threads()))
    size = build_size(quick, overrides)
    dev = pick_device(device, "--device")
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    train_triples, held = grammar.split_triples(seed)
    report: dict = {"quick": quick, "seed": seed, "size": asdict(size), "seconds": {},
                    "shortcut_device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
    t_all = time.time()

    def stage(name: str):
        report["seconds"][name] = round(time.time() - t_stage[0], 1)
        t_stage[0] = time.time()

    t_stage = [time.time()]
    log(f"toy build ({'quick' if quick else 'full'}) -> {out}")
    previous: dict = {}
    if base is not None:
        from shortft.models import load_pipeline

        log(f"1-2/5 VAE, text encoder and UNet from {base}")
        pipe = load_pipeline(str(base))
        vae, unet, text_encoder, tokenizer, scheduler = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler
        for m in (vae, unet, text_encoder):
            m.eval().requires_grad_(False)
        previous = json.loads((Path(base) / "build.json").read_text()) if (Path(base) / "build.json").is_file() else {}
        report.update({k: previous[k] for k in ("vae_recon_mse", "vae_scaling_factor") if k in previous})
        report["seconds"].update({k: previous.get("seconds", {}).get(k) for k in ("vae", "unet")})
        report["size"].update({k: previous.get("size", {}).get(k) for k in
                               ("vae_steps", "vae_widths", "vae_batch", "unet_steps", "unet_widths", "text_width")})
        report["base"] = "reused from an earlier build"
    else:
        log("1/5 VAE")
        vae, figures = train_vae(size, train_triples, seed + 1)
        report.update(figures)
        stage("vae")

        log("2/5 text encoder + UNet")
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        tokenizer, text_encoder, unet = make_text_and_unet(size, seed + 2)
        train_unet(size, train_triples, vae, tokenizer, text_encoder, unet, scheduler, seed + 2)
        pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        stage("unet")
    pipe.save_pretrained(tmp)
    t_stage[0] = time.time()

    log(f"3/5 shortcuts (k = 2, 4, 8) on {report['shortcut_device']}")
    rng = np.random.default_rng(seed + 3)
    attrs = grammar.sample_attributes(rng, train_triples, size.teacher_samples)
    prompts = grammar.sample_prompts(rng, attrs)
    with torch.no_grad():
        cond = torch.cat([_encode(tokenizer, text_encoder, prompts[i:i + 256]) for i in range(0, len(prompts), 256)])
        uncond = _encode(tokenizer, text_encoder, [""]).expand_as(cond)
    noise = torch.randn((len(prompts), 4, 8, 8), generator=torch.Generator().manual_seed(seed + 3))
    unet.to(dev)  # random draws stay on the CPU generators, so a device changes only the arithmetic
    cond, uncond, noise = cond.to(dev), uncond.to(dev), noise.to(dev)
    dn = Denoiser(unet, scheduler, AdapterSwitch(unet))
    traj = teacher_paths(dn, cond, uncond, noise, size)
    # held-out trajectories (other prompts and noise) measure the jump error honestly
    attrs_t = grammar.sample_attributes(rng, train_triples + held, 128)
    with torch.no_grad():
        cond_t = _encode(tokenizer, text_encoder, grammar.sample_prompts(rng, attrs_t)).to(dev)
        uncond_t = _encode(tokenizer, text_encoder, [""]).to(dev).expand_as(cond_t)
    noise_t = torch.randn((128, 4, 8, 8), generator=torch.Generator().manual_seed(seed + 4)).to(dev)
    traj_t = teacher_trajectories(dn, cond_t, uncond_t, noise_t, size.teacher_steps, size.guidance)
    report["shortcut"] = {}
    for k in SEGMENTS:
        fresh = (traj_t, cond_t, uncond_t)
        info = distill_shortcut(size, k, dn, unet, traj, cond, uncond, seed + 10 + k, fresh)
        info.update(fresh_and_seen_errors(size, k, dn, fresh, traj, cond, uncond))
        report["shortcut"][f"k{k}"] = info
        log(f"  k={k}: shortcut jump MSE {info['shortcut_mse']:.5f}, naive DDIM jump MSE {info['naive_mse']:.5f} "
            f"({info['ratio']:.1f}x on fresh trajectories, {info['train_ratio']:.1f}x on training ones)")
        save_loras(unet, [f"shortcut-k{k}"], tmp, {"segments": k, "steps": size.teacher_steps,
                                                 "guidance_scale": size.shortcut_guidance})
        (tmp / "shortft_lora.json").unlink()
        unet.delete_adapters(f"shortcut-k{k}")
        dn.switch = AdapterSwitch(unet)
    del traj
    unet.to("cpu")
    dn = Denoiser(unet, scheduler, AdapterSwitch(unet))
    stage("shortcuts")

    log("4/5 reward model and judge")
    if base is not None and (Path(base) / "reward").is_dir() and (Path(base) / "judge").is_dir():
        log(f"  reused from {base}")  # same seeds and data: retraining would give the same nets
        reward, judge = AttributeNet.load(Path(base) / "reward"), AttributeNet.load(Path(base) / "judge")
        report["seconds"]["judges"] = previous.get("seconds", {}).get("judges")
    else:
        reward = train_attribute_net(size, train_triples + held, vae, seed + 20, (32, 64, 128), 3, "stride", "reward")
        judge = train_attribute_net(size, train_triples + held, vae, seed + 30, (24, 48, 96), 5, "max", "judge")
    reward.save(tmp / "reward")
    judge.save(tmp / "judge")
    report["reward_ranking_accuracy"] = ranking_accuracy(reward, held, seed + 40)
    report["judge_ranking_accuracy"] = ranking_accuracy(judge, held, seed + 40)
    log(f"  matched > mismatched on held-out pairs: reward {report['reward_ranking_accuracy']:.1%}, "
        f"judge {report['judge_ranking_accuracy']:.1%}")
    if base is None:
        stage("judges")
    t_stage[0] = time.time()

    log("5/5 base model on held-out prompts")
    eval_prompts = grammar.eval_prompts(seed)
    prompts_e = [eval_prompts[i % len(eval_prompts)] for i in range(size.eval_samples)]
    from shortft.chain import Condition, original_sampler

    with torch.no_grad():
        c = _encode(tokenizer, text_encoder, prompts_e)
        u = _encode(tokenizer, text_encoder, [""]).expand_as(c)
        z = torch.randn((len(prompts_e), 4, 8, 8), generator=torch.Generator().manual_seed(seed + 5))
        g = size.eval_guidance
        lat = original_sampler(dn, z, Condition(c, u, g, g), size.teacher_steps, 1, [])
        images = (vae.decode(lat / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        acc = float(shape_and_colour_right(judge(images), prompts_e).mean())
    report["base_judge_accuracy"] = acc
    log(f"  judge accuracy (shape and colour right) on {len(prompts_e)} held-out samples, "
        f"{size.teacher_steps}-step DDIM, guidance {g}: {acc:.1%}")
    save_grid(images[:64], tmp / "samples.png", min_tile=64)
    (tmp / "eval_prompts.txt").write_text("\n".join(eval_prompts) + "\n")
    (tmp / "train_prompts.txt").write_text(
        "\n".join(f"a {c} {s} on a {b} background" for s, c, b in train_triples) + "\n")
    stage("checks")
    report["seconds"]["total"] = round(sum(v for v in report["seconds"].values() if v), 1)
    (tmp / "build.json").write_text(json.dumps(report, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(f"done in {report['seconds']['total']:.0f} s -> {out}")
    return report


# -- measuring committed (or any) assets: `shortft toy check` ---------------------------------------
@torch.no_grad()
def measure(path: str | Path, samples: int = 256, steps: int = 50, seed: int = 0) -> dict:
    """The acceptance figures of a toy build, recomputed from the files on disk."""
    from shortft.chain import Condition, Denoiser, original_sampler
    from shortft.lora import AdapterSwitch
    from shortft.models import load_pipeline

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
    dn = Denoiser(unet, pipe.scheduler, AdapterSwitch(unet))
    size = BuildSize(teacher_steps=steps)
    guidance = size.eval_guidance
    images = []
    for i in range(0, samples, 64):
        c = _encode(tok, te, prompts[i:i + 64])
        u = _encode(tok, te, [""]).expand_as(c)
        z = torch.randn((len(c), 4, 8, 8), generator=torch.Generator().manual_seed(seed + 5 + i))
        lat = original_sampler(dn, z, Condition(c, u, guidance, guidance), steps, 1, [])
        images.append((vae.decode(lat / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1))
    images = torch.cat(images)
    out["base_judge_accuracy"] = float(shape_and_colour_right(judge(images), prompts).mean())
    out["base_reward"] = float(prompt_score(reward(images), prompts).mean())

    rng = np.random.default_rng(seed + 6)
    attrs = grammar.sample_attributes(rng, grammar.all_triples(), 128)
    cond = _encode(tok, te, grammar.sample_prompts(rng, attrs))
    uncond = _encode(tok, te, [""]).expand_as(cond)
    noise = torch.randn((128, 4, 8, 8), generator=torch.Generator().manual_seed(seed + 7))
    traj = teacher_trajectories(dn, cond, uncond, noise, steps, size.guidance)
    for k in SEGMENTS:
        if (path / f"shortcut-k{k}").is_dir():
            pipe.load_lora_weights(str(path / f"shortcut-k{k}"), adapter_name=f"shortcut-k{k}")
            dn.switch = AdapterSwitch(unet)
            out[f"shortcut_k{k}"] = jump_errors(size, k, dn, traj, cond, uncond)
    return out
