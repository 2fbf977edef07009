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
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from shortft.builtin import SD_SCHEDULER
from shortft.config import ConfigError
from shortft.denoiser import Denoiser
from shortft.evaluate import save_grid
from shortft.lora import AdapterSwitch
from shortft.lora_save import save_loras
from shortft.models import encode_text, pick_device
from shortft.pipelines import load_pipeline
from shortft.toy import grammar
from shortft.toy.base_model import make_text_and_unet, train_unet, train_vae
from shortft.toy.checks import base_samples
from shortft.toy.judge_training import ranking_accuracy, train_attribute_net
from shortft.toy.judges import AttributeNet, shape_and_colour_right
from shortft.toy.shortcuts import distill_shortcut, fresh_and_seen_errors, teacher_paths, teacher_trajectories
from shortft.toy.sizes import SEGMENTS, build_size, log


def check_out(out: Path) -> Path:
    """`out` made absolute, refused in one line unless the build may replace it whole: new, empty, or an
    earlier toy build (its `build.json`). A build ends by removing what `out` held, so `--out runs` or `--out
    .` would have taken a folder of other work with it, after up to two hours of building."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"toy build --out {out}: a file is there; give a new folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "build.json").is_file():
        raise ConfigError(f"toy build --out {out}: this folder holds files and is not a toy build (no build.json), "
                          "and a build replaces its --out folder whole; give a new or empty folder")
    return out


def build(out: Path, quick: bool = False, seed: int = 0, base: Path | None = None, overrides: dict | None = None,
          device: str = "cpu") -> dict:
    """Build everything into `out`. With `base`, reuse that build's VAE, text encoder and UNet and redo
    the shortcuts, reward, judge and checks (`overrides` change BuildSize fields, e.g. shortcut_steps).
    `device` runs the shortcut stage (teacher paths and distillation, the part that wants many paths)
    there; every other stage runs on the CPU, so only the shortcuts depend on where it was built."""

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.set_num_threads(max(1, torch.get_num_threads()))
    size = build_size(quick, overrides)
    dev = pick_device(device, "--device")
    out = check_out(out)
    if seed < 0:
        raise ConfigError(f"toy build --seed {seed}: give a seed >= 0")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:  # now, not at the first save after the VAE stage has trained
        tmp.mkdir(parents=True)
    except OSError as e:
        raise ConfigError(f"toy build --out {out}: {tmp} cannot be made ({e.strerror or e}); give a folder you can "
                          "write") from None
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
        log(f"1-2/5 VAE, text encoder and UNet from {base}")
        pipe = load_pipeline(str(base))
        vae, unet, text_encoder, tokenizer, scheduler = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler
        for module in (vae, unet, text_encoder):
            module.eval().requires_grad_(False)
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
        scheduler = DDIMScheduler(**SD_SCHEDULER)
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
        cond = torch.cat([encode_text(tokenizer, text_encoder, prompts[i:i + 256]) for i in range(0, len(prompts), 256)])
        uncond = encode_text(tokenizer, text_encoder, [""]).expand_as(cond)
    noise = torch.randn((len(prompts), 4, 8, 8), generator=torch.Generator().manual_seed(seed + 3))
    unet.to(dev)  # random draws stay on the CPU generators, so a device changes only the arithmetic
    cond, uncond, noise = cond.to(dev), uncond.to(dev), noise.to(dev)
    denoiser = Denoiser(unet, scheduler, AdapterSwitch(unet))
    traj = teacher_paths(denoiser, cond, uncond, noise, size)
    # held-out trajectories (other prompts and noise) measure the jump error honestly
    attrs_t = grammar.sample_attributes(rng, train_triples + held, 128)
    with torch.no_grad():
        cond_t = encode_text(tokenizer, text_encoder, grammar.sample_prompts(rng, attrs_t)).to(dev)
        uncond_t = encode_text(tokenizer, text_encoder, [""]).to(dev).expand_as(cond_t)
    noise_t = torch.randn((128, 4, 8, 8), generator=torch.Generator().manual_seed(seed + 4)).to(dev)
    traj_t = teacher_trajectories(denoiser, cond_t, uncond_t, noise_t, size.teacher_steps, size.guidance)
    report["shortcut"] = {}
    for k in SEGMENTS:
        fresh = (traj_t, cond_t, uncond_t)
        info = distill_shortcut(size, k, denoiser, unet, traj, cond, uncond, seed + 10 + k, fresh)
        info.update(fresh_and_seen_errors(size, k, denoiser, fresh, traj, cond, uncond))
        report["shortcut"][f"k{k}"] = info
        log(f"  k={k}: shortcut jump MSE {info['shortcut_mse']:.5f}, naive DDIM jump MSE {info['naive_mse']:.5f} "
            f"({info['ratio']:.1f}x on fresh trajectories, {info['train_ratio']:.1f}x on training ones)")
        save_loras(unet, [f"shortcut-k{k}"], tmp, {"segments": k, "steps": size.teacher_steps,
                                                 "guidance_scale": size.shortcut_guidance})
        (tmp / "shortft_lora.json").unlink()
        unet.delete_adapters(f"shortcut-k{k}")
        denoiser.switch = AdapterSwitch(unet)
    del traj
    unet.to("cpu")
    denoiser = Denoiser(unet, scheduler, AdapterSwitch(unet))
    stage("shortcuts")

    log("4/5 reward model and judge")
    # reused where trained from the same seed (the data and its held-out split) and sizes: retraining would give
    # the same nets; another --seed or --set judge_steps/batch was ignored
    same = base is not None and previous.get("seed") == seed and all(
        previous.get("size", {}).get(k) == getattr(size, k) for k in ("judge_steps", "batch"))
    if same and (Path(base) / "reward").is_dir() and (Path(base) / "judge").is_dir():
        log(f"  reused from {base}")
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
    noise = torch.randn((len(prompts_e), 4, 8, 8), generator=torch.Generator().manual_seed(seed + 5))
    g = size.eval_guidance
    images = base_samples(denoiser, tokenizer, text_encoder, vae, prompts_e, noise, size.teacher_steps, g)
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
