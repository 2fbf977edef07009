"""Real model classes on tiny random pipelines: SD 1.5 (`tiny`), SD 2.x v-prediction (`tiny-v`) and SDXL
(`tiny-xl`). The full chain is the pipeline's own DDIM sampler; each class trains with a shortcut LoRA
picked by file name out of a hub repo (an offline hub cache); bad shortcuts and sizes fail in one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import shortft
from shortft import builtin
from shortft.chain import ChainInput, sample
from shortft.models import load_models
from tests.hub_layout import hub_cache, write_unet_lora

CLASSES = {"tiny": "StableDiffusionPipeline", "tiny-v": "StableDiffusionPipeline", "tiny-xl": "StableDiffusionXLPipeline"}
LORA_FILE = {"tiny": "Hyper-SD15-4steps-lora.safetensors", "tiny-v": "Hyper-SD21-4steps-lora.safetensors",
             "tiny-xl": "Hyper-SDXL-4steps-lora.safetensors"}


@pytest.fixture(scope="module")
def class_dirs(_cache):
    return {name: builtin.resolve(f"builtin:{name}") for name in CLASSES}


@pytest.fixture(scope="module")
def hub(class_dirs, tmp_path_factory):
    """An offline hub cache holding `ByteDance/Hyper-SD`: one LoRA file per class, in one repo."""
    root = tmp_path_factory.mktemp("hub")
    files = {LORA_FILE[n]: write_unet_lora(d, root / "src" / LORA_FILE[n], seed=i) for i, (n, d) in enumerate(class_dirs.items())}
    hub_cache(root / "cache", "ByteDance/Hyper-SD", files)
    return root


def _load(class_dirs, name, tmp_path, *overrides):
    return load_models(shortft.load_config("tiny", [f"model.pretrained={class_dirs[name]}",
                                                    f"train.output_dir={tmp_path}", *overrides]))


@pytest.mark.parametrize("steps", [10, 7])  # 7 does not divide 1000
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("name", list(CLASSES))
def test_full_chain_is_the_pipelines_ddim_sampler(class_dirs, tmp_path, name, spacing, steps):
    prompts = ["a red circle", "a blue square on a white background"]
    for guidance in (1.0, 5.0):
        models = _load(class_dirs, name, tmp_path, "chain.method=full", f"chain.steps={steps}",
                       f"model.timestep_spacing={spacing}")
        assert type(models.pipe).__name__ == CLASSES[name]
        assert models.pipe.scheduler.config.timestep_spacing == spacing
        noise = models.initial_noise(2, torch.Generator().manual_seed(3))
        models.denoiser.switch.activate(())
        ref = models.pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, latents=noise.clone(),
                          height=32, width=32, output_type="latent").images
        with torch.no_grad():
            ours = sample(models.denoiser, ChainInput(noise, models.condition(prompts, guidance, None)), models.plan)
        assert (ours - ref).abs().max().item() <= 1e-4, (guidance, (ours - ref).abs().max().item())


def _cli(args, hub_root, timeout=600):
    env = {**os.environ, "HF_HUB_CACHE": str(hub_root / "cache"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "shortft.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.mark.parametrize("name", list(CLASSES))
def test_each_class_trains_shortft_with_a_hub_lora_picked_by_file_name(class_dirs, hub, tmp_path, name):
    r = _cli(["train", "--config", "tiny", f"model.pretrained={class_dirs[name]}",
              f"model.shortcut=lora:ByteDance/Hyper-SD/{LORA_FILE[name]}", "chain.steps=8", "chain.segments=4",
              "train.steps=2", "train.log_every=1", f"train.output_dir={tmp_path}/run", "--no-mlflow"], hub)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning" not in r.stderr.lower(), r.stderr[-2000:]
    assert "step 2/2" in r.stdout and (tmp_path / "run" / "lora").is_dir()


def test_a_hub_repo_named_without_a_file_is_its_one_lora_or_refused_when_it_holds_several(class_dirs, hub, tmp_path):
    """diffusers loads the first of a repo's LoRA files with only a warning (ByteDance/Hyper-SD holds a dozen, for
    other base models and step counts); offline it stopped with "you must specify a `weight_name`" even where the
    cache held one. A repo with one file loads it; with several, one line names them and the fix."""
    r = _cli(["train", "--config", "tiny", f"model.pretrained={class_dirs['tiny']}", "model.shortcut=lora:ByteDance/Hyper-SD",
              "chain.steps=8", "chain.segments=4", "train.steps=1", f"train.output_dir={tmp_path}/a", "--no-mlflow"], hub)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "note:" not in r.stderr, r.stderr  # the hub check finds the repo's files in the cache
    assert ("model.shortcut='lora:ByteDance/Hyper-SD': ByteDance/Hyper-SD holds 3 LoRA files (Hyper-SD15-4steps-lora."
            "safetensors, Hyper-SD21-4steps-lora.safetensors, Hyper-SDXL-4steps-lora.safetensors); pick one with "
            "lora:<folder or org/repo>/<file> or model.shortcut_weight_name=<file>") in r.stderr, r.stderr[-2000:]
    hub_cache(hub / "cache", "someone/one-lora", {"tcd.safetensors": hub / "src" / LORA_FILE["tiny"]})
    r = _cli(["train", "--config", "tiny", f"model.pretrained={class_dirs['tiny']}", "model.shortcut=lora:someone/one-lora",
              "chain.steps=8", "chain.segments=4", "train.steps=1", f"train.output_dir={tmp_path}/b", "--no-mlflow"], hub)
    assert r.returncode == 0 and "step 1/1" in r.stdout, r.stderr[-2000:]
    r = _cli(["train", "--config", "tiny", f"model.pretrained={class_dirs['tiny']}", "model.shortcut=lora:someone/none",
              "chain.steps=8", "chain.segments=4", "train.steps=1", f"train.output_dir={tmp_path}/c", "--no-mlflow"], hub)
    assert r.returncode == 2 and "model.shortcut='lora:someone/none': not in this machine's hub cache" in r.stderr, r.stderr[-2000:]


def test_the_shortcut_lora_is_the_file_named_scaled_and_unguided(class_dirs, hub, tmp_path):
    from safetensors.torch import load_file

    source = hub / "src"  # a local folder holding three LoRA files: the name picks one
    scaled = _load(class_dirs, "tiny", tmp_path, f"model.shortcut=lora:{source}",
                   f"model.shortcut_weight_name={LORA_FILE['tiny']}", "model.shortcut_scale=0.5")
    plain = _load(class_dirs, "tiny", tmp_path, f"model.shortcut=lora:{source / LORA_FILE['tiny']}")
    file_b = {k: v for k, v in load_file(source / LORA_FILE["tiny"]).items() if "lora_B" in k or "lora.up" in k}
    loaded = {n: p for n, p in plain.unet.named_parameters() if "lora_B.shortcut" in n}
    assert len(loaded) == len(file_b) > 0
    for n, p in scaled.unet.named_parameters():
        if "lora_B.shortcut" in n:
            assert torch.allclose(p, 0.5 * dict(plain.unet.named_parameters())[n])
    # Distilled shortcuts run without guidance unless asked; the base model jumping on its own is guided.
    assert plain.condition(["a red circle"], 7.5, None).shortcut_guidance_scale == 1.0
    assert plain.condition(["a red circle"], 7.5, 3.0).shortcut_guidance_scale == 3.0
    none = _load(class_dirs, "tiny", tmp_path)
    assert none.condition(["a red circle"], 7.5, None).shortcut_guidance_scale == 7.5
    # Hyper-SD's -CFG- files kept guidance (their card: 5 to 8), and ran unguided by default
    import shutil

    from shortft.models import keeps_cfg
    from shortft.plan import Shortcut

    cfg_file = shutil.copy(source / LORA_FILE["tiny"], tmp_path / "Hyper-SD15-8steps-CFG-lora.safetensors")
    kept = _load(class_dirs, "tiny", tmp_path, f"model.shortcut=lora:{cfg_file}", "chain.segments=8", "chain.steps=16")
    assert kept.condition(["a red circle"], 7.5, None).shortcut_guidance_scale == 7.5
    assert keeps_cfg(Shortcut("lora", "ByteDance/Hyper-SD", "Hyper-SDXL-12steps-CFG-lora.safetensors"))
    assert not any(keeps_cfg(Shortcut(kind, path)) for kind, path in (
        ("lora", "ByteDance/Hyper-SD/Hyper-SD15-4steps-lora.safetensors"), ("lora", "latent-consistency/lcm-lora-sdv1-5"),
        ("unet", "someone/unet-CFG-distilled")))


def test_a_shortcut_for_another_segment_count_is_a_warning_with_the_reason(class_dirs, hub, tmp_path, capsys):
    _load(class_dirs, "tiny", tmp_path, f"model.shortcut=lora:{hub / 'src' / LORA_FILE['tiny']}", "chain.steps=8",
          "chain.segments=8")
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["shortft: warning: model.shortcut is a 4-step shortcut (its file name says so) but chain.segments=8: "
                   "its jumps would span 1/8 of the trajectory, not the 1/4 it was distilled for; set "
                   "chain.segments=4 or pick the matching file"]
    # Hyper-SD's 1-step LoRAs are its unified ones (1 to 8 steps): the advice chain.segments=1 left no jump
    from shortft.plan import Shortcut
    from shortft.shortcut import steps_warning

    cfg = shortft.load_config("tiny", ["chain.segments=4"])
    assert steps_warning(cfg, Shortcut("lora", "ByteDance/Hyper-SD", "Hyper-SD15-1step-lora.safetensors")) is None
    assert "a 1-step shortcut" in steps_warning(cfg, Shortcut("unet", "ByteDance/Hyper-SD", "Hyper-SDXL-1step-Unet.safetensors"))


def _made(folder):
    folder.mkdir()
    return folder


def _bogus_lora(path):
    from safetensors.torch import save_file

    save_file({"unet.no_such_block.to_q.lora_A.weight": torch.zeros(2, 16),
               "unet.no_such_block.to_q.lora_B.weight": torch.zeros(16, 2)}, path)
    return path


@pytest.mark.parametrize("case", ["missing file", "keys match nothing", "another model's lora", "several files",
                                  "no folder", "no such file", "no file", "unsupported class", "resolution"])
def test_bad_models_and_shortcuts_fail_in_one_line(class_dirs, hub, tmp_path, capsys, case):
    base = ["train", "--config", "tiny", f"model.pretrained={class_dirs['tiny']}", "chain.steps=8", "chain.segments=4",
            "train.steps=1", f"train.output_dir={tmp_path}/run"]
    extra, expect = {
        # a file the hub cache does not have, the hub not asked (HF_HUB_OFFLINE): told before anything loads
        "missing file": (["model.shortcut=lora:ByteDance/Hyper-SD/Hyper-SD15-8steps-lora.safetensors"],
                         "model.shortcut='lora:ByteDance/Hyper-SD/Hyper-SD15-8steps-lora.safetensors': ByteDance/Hyper-SD/"
                         "Hyper-SD15-8steps-lora.safetensors is not in this machine's hub cache, and the hub cannot be "
                         "asked (HF_HUB_OFFLINE is set); download it first (hf download ByteDance/Hyper-SD "
                         "Hyper-SD15-8steps-lora.safetensors), or set model.shortcut to a local folder"),
        "keys match nothing": ([f"model.shortcut=lora:{_bogus_lora(tmp_path / 'bogus.safetensors')}"],
                               "the LoRA's keys do not match this UNet"),
        "another model's lora": ([f"model.shortcut=lora:ByteDance/Hyper-SD/{LORA_FILE['tiny-xl']}"],
                                 "the LoRA's keys do not match this UNet"),
        "several files": ([f"model.shortcut=lora:{hub / 'src'}"],
                          "holds 3 LoRA files (Hyper-SD15-4steps-lora.safetensors, Hyper-SD21-4steps-lora.safetensors, "
                          "Hyper-SDXL-4steps-lora.safetensors); pick one with lora:<folder or org/repo>/<file> or "
                          "model.shortcut_weight_name=<file>"),
        # was found only when loading it, after the base model: the check skipped a path given with its file name
        "no folder": ([f"model.shortcut=lora:{tmp_path / 'gone'}", "model.shortcut_weight_name=x.safetensors"],
                      f"model.shortcut='lora:{tmp_path / 'gone'}': {tmp_path / 'gone'} does not exist"),
        "no such file": ([f"model.shortcut=lora:{hub / 'src'}", "model.shortcut_weight_name=x.safetensors"],
                         f"model.shortcut='lora:{hub / 'src'}': {hub / 'src'} has no file x.safetensors"),
        "no file": ([f"model.shortcut=lora:{_made(tmp_path / 'empty')}"],  # was "... has no file None", after loading
                    f"model.shortcut='lora:{tmp_path / 'empty'}': {tmp_path / 'empty'} holds no .safetensors file; "
                    "give the folder of a LoRA, or lora:<folder>/<file>"),
        "unsupported class": ([f"model.pretrained={_unsupported(tmp_path)}"], "a KandinskyPipeline; supported: "),
        "resolution": (["model.resolution=33"], "model.resolution=33: not a multiple of this model's VAE factor 2; use 32 or 34"),
    }[case]
    base = [b for b in base if b.split("=")[0] not in {e.split("=")[0] for e in extra}]  # no note of a key replaced
    if "ByteDance/Hyper-SD" in extra[0]:  # through the hub cache: a fresh process with HF_HUB_OFFLINE
        r = _cli(base + extra + ["--no-mlflow"], hub)
        code, err = r.returncode, r.stderr
    else:
        from shortft.cli import main

        code, err = main(base + extra + ["--no-mlflow"]), capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert expect in lines[0], lines[0]


def _unsupported(tmp_path):
    import json

    d = tmp_path / "kandinsky"
    d.mkdir()
    (d / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline", "_diffusers_version": "0.42.1"}))
    return d


@pytest.mark.parametrize("setting", ["model.gradient_checkpointing=true",
                                     "model.vae_checkpointing=true model.vae_batch_size=1", "chain.checkpointing=true",
                                     "chain.checkpointing=true model.gradient_checkpointing=true"])
def test_memory_settings_give_the_same_gradients(class_dirs, tmp_path, setting):
    # Non-zero LoRAs, several per chain: a block recomputed in backward with another segment's LoRA active
    # (what diffusers' own checkpointing does under the chain's switching) would change the gradients.
    def grads(*extra):
        models = _load(class_dirs, "tiny", tmp_path, "chain.steps=8", "chain.segments=4", "train.progressive=false",
                       "chain.guidance_scale=3", *extra)
        torch.manual_seed(0)
        params = [p for n, p in models.unet.named_parameters() if "lora_" in n and "shortcut" not in n]
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn_like(p) * 0.1)
        for p in params:
            p.requires_grad_(True)
        noise = models.initial_noise(2, torch.Generator().manual_seed(1))
        latents = sample(models.denoiser, ChainInput(noise, models.condition(["a red circle", "a blue square"], 3.0, None)),
                         models.plan)
        images = models.decode(latents)
        (images * torch.linspace(-1, 1, images.numel()).view_as(images)).sum().backward()
        return [p.grad.clone() for p in params]

    reference, checked = grads(), grads(*setting.split())
    assert len(reference) == len(checked) > 0
    for a, b in zip(reference, checked):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_dry_run_prints_plan_memory_and_hub_sources_without_downloading(hub):
    r = _cli(["train", "--config", "sd15", "--dry-run"], hub)  # HF_HUB_OFFLINE: a download would fail
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "18 network calls" in out and "memory before activations: " in out
    assert "frozen model 1.99 GiB (1066 M params, bfloat16)" in out  # SD 1.5: UNet 860 M + VAE 84 M + CLIP-L 123 M
    assert "[to download] stable-diffusion-v1-5/stable-diffusion-v1-5  model" in out
    assert "[in the hub cache] ByteDance/Hyper-SD/Hyper-SD15-4steps-lora.safetensors  shortcut (lora)" in out
    assert "[to download] xswu/HPSv2/HPS_v2_compressed.pt  reward hps_v2 (path)" in out


@pytest.mark.parametrize("segments", [2, 4])
def test_per_call_checkpointing_trains_every_progressive_stage_as_without_it(make_cfg, segments):
    """`chain.checkpointing=true` with progressive training (the default) failed in the first step of stage 2
    with torch's 'none of output has requires_grad=True, this checkpoint() is not necessary': the stage's
    first jump starts from a latent made without gradient and runs frozen weights, and the reentrant
    recompute in backward refused an output that needs no gradient. That setting is what a run that ran out
    of GPU memory is told to try."""
    from safetensors.torch import load_file

    runs = {}
    for ckpt in ("false", "true"):
        cfg = make_cfg("chain.steps=8", f"chain.segments={segments}", f"train.steps={2 * segments}",
                       "chain.guidance_scale=3", "train.lr=1e-2", f"chain.checkpointing={ckpt}",
                       f"train.output_dir={make_cfg().train.output_dir}-{ckpt}")
        result = shortft.train(cfg)
        assert result.steps == 2 * segments and {r["stage"] for r in result.history} == set(range(1, segments + 1))
        # calls backward passes through, per stage: not the frozen jump that opens a later stage from a latent
        # made without gradient (it was counted, as its mode alone says)
        assert {r["stage"]: r["grad_calls"] for r in result.history} == ({1: 6, 2: 1} if segments == 2 else
                                                                         {1: 8, 2: 5, 3: 3, 4: 1})
        runs[ckpt] = {f: load_file(f) for f in sorted(result.lora_dir.glob("*/*.safetensors"))}
    plain, checkpointed = ({f.relative_to(f.parents[1]): t for f, t in run.items()} for run in runs.values())
    assert plain.keys() == checkpointed.keys() and len(plain) == segments
    for name, tensors in plain.items():
        assert any(t.abs().max() > 0 for t in tensors.values())  # every stage's LoRA moved
        for key, t in tensors.items():
            assert torch.allclose(t, checkpointed[name][key], rtol=1e-4, atol=1e-6), (name, key)


def _unet_state_file(pipeline_dir, out, seed=0, comfy=False):
    """The pipeline's UNet, perturbed (so it is not the base model), as one state-dict file; `comfy`: the keys
    renamed as a ComfyUI / original-format file has them."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in
             UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet").state_dict().items()}
    if comfy:
        state = {f"model.diffusion_model.{k}": v for k, v in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out, state


def test_a_unet_shortcut_from_one_state_dict_file_is_that_file_on_the_base_models_architecture(class_dirs, tmp_path,
                                                                                                capsys):
    """`unet:ByteDance/Hyper-SD/Hyper-SDXL-1step-Unet.safetensors` (one file of the base UNet's weights, as Hyper-SD
    ships its 1-step SDXL UNet) was read as the repo `ByteDance/Hyper-SD` and failed for want of its config.json."""
    from shortft.cli import main

    file, state = _unet_state_file(class_dirs["tiny-xl"], tmp_path / "unets" / "Hyper-SDXL-1step-Unet.safetensors")
    models = _load(class_dirs, "tiny-xl", tmp_path, f"model.shortcut=unet:{file}", "model.dtype=bfloat16")
    loaded = models.denoiser.shortcut_unet.state_dict()
    assert loaded.keys() == state.keys() and all(loaded[k].dtype == torch.bfloat16 for k in loaded)
    assert all(torch.equal(loaded[k], state[k].to(torch.bfloat16)) for k in state)
    assert not any(p.is_meta for p in models.denoiser.shortcut_unet.parameters())
    capsys.readouterr()  # the step-count warning of a 1-step file at chain.segments=4
    # model.gradient_checkpointing reached the base UNet only; ShortFT's gradient crosses the shortcut's jumps
    checkpointed = _load(class_dirs, "tiny-xl", tmp_path, f"model.shortcut=unet:{file}", "model.gradient_checkpointing=true")
    assert checkpointed.pipe.unet.is_gradient_checkpointing and checkpointed.denoiser.shortcut_unet.is_gradient_checkpointing
    capsys.readouterr()

    comfy, _ = _unet_state_file(class_dirs["tiny-xl"], tmp_path / "unets" / "comfy.safetensors", comfy=True)
    other, _ = _unet_state_file(class_dirs["tiny"], tmp_path / "unets" / "sd15.safetensors")
    for bad, why in ((comfy, "unexpected (e.g. model.diffusion_model."), (other, "of another shape")):
        code = main(["train", "--config", "tiny", f"model.pretrained={class_dirs['tiny-xl']}",
                     f"model.shortcut=unet:{bad}", "train.steps=1", f"train.output_dir={tmp_path}/run", "--no-mlflow"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert f"{bad.name} is not a state dict of this base model's UNet (" in err and why in err, err


def test_a_unet_shortcut_is_loaded_in_the_base_models_variant_or_else_its_default_files(class_dirs, tmp_path, capsys):
    """The shortcut UNet was loaded without `model.variant`: a repo of fp16 files alone (as some distilled UNets
    ship) failed with "no file named diffusion_pytorch_model.bin"; the fp16 files are used where they are."""
    from diffusers import UNet2DConditionModel

    from shortft.plan import Shortcut
    from shortft.shortcut import load_unet_shortcut

    unet = UNet2DConditionModel.from_pretrained(class_dirs["tiny"], subfolder="unet")
    unet.save_pretrained(tmp_path / "fp16-only" / "unet", variant="fp16")
    unet.save_pretrained(tmp_path / "plain" / "unet")
    for folder in ("fp16-only", "plain"):
        loaded = load_unet_shortcut(Shortcut("unet", str(tmp_path / folder)), unet, torch.float32, torch.device("cpu"),
                                    variant="fp16")
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), unet.state_dict().values()))
    assert "variant" not in capsys.readouterr().err  # the fp16 try on the plain folder is not told
    with pytest.raises(shortft.ConfigError, match="could not load a UNet"):
        load_unet_shortcut(Shortcut("unet", str(tmp_path / "fp16-only")), unet, torch.float32, torch.device("cpu"))


def test_unet_shortcuts_from_the_hub_one_file_in_a_repo_or_a_pipeline_repos_unet_folder(class_dirs, tmp_path):
    """A pipeline repo on the hub (`unet:stabilityai/sdxl-turbo`) keeps its UNet in unet/: the source check stopped
    it ("the repo has no file config.json") and the loader looked only at the top level."""
    src = Path(class_dirs["tiny"])
    file, _ = _unet_state_file(src, tmp_path / "src" / "tiny-Unet.safetensors")
    hub_cache(tmp_path / "cache", "someone/unets", {"tiny-Unet.safetensors": file})
    hub_cache(tmp_path / "cache", "someone/turbo", {"model_index.json": src / "model_index.json",
                                                   "unet/config.json": src / "unet" / "config.json",
                                                   "unet/diffusion_pytorch_model.safetensors":
                                                       src / "unet" / "diffusion_pytorch_model.safetensors"})
    for shortcut in ("unet:someone/unets/tiny-Unet.safetensors", "unet:someone/turbo"):
        r = _cli(["train", "--config", "tiny", f"model.pretrained={src}", f"model.shortcut={shortcut}", "chain.steps=8",
                  "chain.segments=4", "train.steps=1", f"train.output_dir={tmp_path}/{shortcut[-5:]}", "--no-mlflow"],
                 tmp_path)
        assert r.returncode == 0 and "step 1/1" in r.stdout, (shortcut, r.stderr[-3000:])


def test_a_shortcut_loras_text_encoder_part_is_left_out_with_a_warning(class_dirs, tmp_path, capsys):
    """`load_lora_weights` loads every part of a file: a shortcut LoRA holding text-encoder layers left them on in
    the shared text encoder, for the base model's calls and the evaluation's too."""
    lora = write_unet_lora(class_dirs["tiny"], tmp_path / "te" / "with-te.safetensors", text_encoder=True)
    models = _load(class_dirs, "tiny", tmp_path, f"model.shortcut=lora:{lora}")
    err = capsys.readouterr().err
    assert "its text-encoder LoRA (4 layers) is left out" in err, err
    assert not any("shortcut" in n for n, _ in models.pipe.text_encoder.named_modules())
    assert any("lora_A.shortcut" in n for n, _ in models.unet.named_parameters())
    plain = _load(class_dirs, "tiny", tmp_path)
    assert torch.equal(models.condition(["a red circle"], 1.0, None).cond, plain.condition(["a red circle"], 1.0, None).cond)


def test_an_lcm_unet_shortcut_gets_its_guidance_embedding(class_dirs, tmp_path):
    """An LCM-distilled UNet (`time_cond_proj_dim`) takes its guidance w as an embedding, `timestep_cond`; without
    it diffusers skips the projection silently and the jump was not the one distilled. The embedding is the one
    diffusers' LatentConsistencyModelPipeline gives it, of w = guidance - 1."""
    from diffusers import LatentConsistencyModelPipeline, UNet2DConditionModel

    from shortft.plan import Call

    config = dict(UNet2DConditionModel.load_config(Path(class_dirs["tiny"]) / "unet"), time_cond_proj_dim=8)
    torch.manual_seed(0)
    lcm = UNet2DConditionModel.from_config(config)
    lcm.save_pretrained(tmp_path / "lcm-unet")
    models = _load(class_dirs, "tiny", tmp_path, f"model.shortcut=unet:{tmp_path / 'lcm-unet'}")
    condition = models.condition(["a red circle"], 7.5, None)
    assert condition.shortcut_guidance_scale == 1.0  # the guidance is in the embedding, not in a second call
    x = models.initial_noise(1, torch.Generator().manual_seed(1))
    call = Call(index=0, t=981, t_next=741, shortcut=True, adapters=(), segment=1)
    w = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor([6.5]), embedding_dim=8)
    net = models.denoiser.shortcut_unet
    with torch.no_grad():
        ours = models.denoiser.predict(x, call, condition)
        ref = net(x, torch.tensor(981), encoder_hidden_states=condition.cond, timestep_cond=w).sample
        bare = net(x, torch.tensor(981), encoder_hidden_states=condition.cond).sample
    assert (ours - ref).abs().max().item() <= 1e-6 and (bare - ref).abs().max().item() > 1e-4
    # guidance asked for the shortcut too: CFG on top of the embedded guidance, twice guided; refused
    with pytest.raises(shortft.ConfigError, match=r"^model.shortcut_guidance_scale=5.0: this LCM-distilled shortcut"):
        _load(class_dirs, "tiny", tmp_path, f"model.shortcut=unet:{tmp_path / 'lcm-unet'}", "model.shortcut_guidance_scale=5")


def test_a_scheduler_config_that_clips_x0_is_turned_off_with_a_warning(class_dirs, tmp_path, capsys):
    """DDIM clips the predicted x0 to [-1, 1] by default, and a shipped config that does not name `clip_sample`
    (PNDM's and Euler's need not) got that default; the chain's update does not clip (a latent is not in [-1, 1]),
    so the pipeline's own sampler (evaluation, `shortft sample`, a user's) and the chain differed. The SD
    pipeline turns an explicit `clip_sample: true` off itself; the SDXL pipeline does not."""
    import json
    import shutil

    from shortft.pipelines import load_pipeline

    for name, said in (("tiny", None), ("tiny-xl", True)):
        src = tmp_path / name
        shutil.copytree(class_dirs[name], src)
        sched = json.loads((src / "scheduler" / "scheduler_config.json").read_text())
        sched.pop("clip_sample")
        (src / "scheduler" / "scheduler_config.json").write_text(json.dumps(
            {**sched, "_class_name": "PNDMScheduler", **({"clip_sample": said} if said else {})}))
        capsys.readouterr()
        assert load_pipeline(str(src)).scheduler.config.clip_sample is False
        err = capsys.readouterr().err
        assert ("its scheduler config sets clip_sample; the chain's DDIM update does not clip" in err) == bool(said), err


def test_an_edm_style_sdxl_model_is_refused_before_its_weights_load(class_dirs, tmp_path, monkeypatch):
    """An SDXL-class model with an EDM scheduler (Playground v2.5's kind) got DDIM on DDPM's default betas,
    and a VAE with latents_mean/latents_std decoded unshifted latents, without a word."""
    import json
    import shutil

    from diffusers import DiffusionPipeline

    from shortft.config import ConfigError
    from shortft.pipelines import load_pipeline

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded first"))
    edm, shifted = tmp_path / "edm", tmp_path / "shifted"
    for folder in (edm, shifted):
        shutil.copytree(class_dirs["tiny-xl"], folder)
    (edm / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "EDMDPMSolverMultistepScheduler", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5}))
    vae = json.loads((shifted / "vae" / "config.json").read_text())
    (shifted / "vae" / "config.json").write_text(json.dumps({**vae, "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}))
    with pytest.raises(ConfigError, match=r"its scheduler has no DDPM betas \(EDMDPMSolverMultistepScheduler\), an "
                                          r"EDM-style model; the chain's DDIM update takes DDPM-beta models"):
        load_pipeline(str(edm))
    with pytest.raises(ConfigError, match=r"its VAE shifts latents \(latents_mean, latents_std\)"):
        load_pipeline(str(shifted))
