"""Using what was trained: the timestep switch detaches cleanly, `shortft sample`, quiet LoRA loading."""

import json
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import shortft
from shortft.config import ConfigError
from shortft.lora import enable_timestep_aware


@pytest.fixture
def trained(make_cfg):
    cfg = make_cfg("train.steps=2", "chain.steps=8", "chain.segments=2", "train.lr=0.05", "train.checkpoint_every=0")
    return shortft.train(cfg).lora_dir


def _pipe(tiny_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe):
    return pipe("a red circle", num_inference_steps=8, generator=torch.Generator().manual_seed(0),
                output_type="np").images


def test_remove_restores_the_pipeline_bit_for_bit(trained, tiny_dir, capfd):
    import diffusers

    pipe = _pipe(tiny_dir)
    fresh, modules = _image(pipe), {name: type(m) for name, m in pipe.unet.named_modules()}
    keys = list(pipe.unet.state_dict())
    diffusers.utils.logging.set_verbosity_warning()  # the test environment mutes it; loading must be quiet anyway
    try:
        capfd.readouterr()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            switch = enable_timestep_aware(pipe, trained)
        printed = capfd.readouterr()
    finally:
        diffusers.utils.logging.set_verbosity_error()
    assert not caught and not printed.err.strip() and not printed.out.strip(), ([str(w.message) for w in caught], printed)
    tuned = _image(pipe)
    assert not np.array_equal(tuned, fresh)
    switch.remove()
    assert np.array_equal(_image(pipe), fresh)
    assert np.array_equal(_image(pipe), _image(_pipe(tiny_dir)))  # and equal to a freshly loaded pipeline
    for _ in range(2):
        with enable_timestep_aware(pipe, trained):
            assert np.array_equal(_image(pipe), tuned)
        assert np.array_equal(_image(pipe), fresh)
    # the modules too: peft's LoRA wrappers stayed (to_q.base_layer.weight for to_q.weight in the state
    # dict, which a pipeline saved afterwards wrote), as diffusers deletes peft_config with its last adapter
    assert {name: type(m) for name, m in pipe.unet.named_modules()} == modules
    assert list(pipe.unet.state_dict()) == keys and getattr(pipe.unet, "peft_config", None) is None


def test_the_switch_follows_any_schedulers_own_timesteps_and_keeps_the_users_adapters(trained, tiny_dir):
    """Adapters were picked by the nearest timestep of the run's saved plan: DPM++ at the trained N (its
    last timestep 20, the plan's 21 an interior step) never ran the final stack, and DDIM at another N
    missed segment 2, whose adapter runs at one timestep. A LoRA the user had active was switched off
    inside the block, and an adapter name already taken left half the set loaded."""
    from diffusers import DPMSolverMultistepScheduler

    from shortft.lora_plan import read_lora_plan
    from shortft.plan import sampler_plan, stacked

    plan = read_lora_plan(trained)
    for scheduler, steps in (("dpm", 8), ("ddim", 5), ("ddim", 8)):
        pipe = _pipe(tiny_dir)
        if scheduler == "dpm":
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        with enable_timestep_aware(pipe, trained) as switch:
            seen = []
            pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(switch.switch.active))
            pipe("a red circle", num_inference_steps=steps, guidance_scale=1.0, output_type="latent")
        expected = [c.adapters for c in sampler_plan(pipe.scheduler.timesteps.tolist(), plan["segments"],
                                                     stacked(plan["adapters"]), plan["interior"])]
        assert seen == expected, (scheduler, steps)
        assert seen[-1] == ("segment_1", "segment_2")
        if scheduler == "ddim" and steps == 8:  # the run's own sampler and N: its saved plan
            assert seen == [tuple(a) for a in plan["step_adapters"]]
    # The user's own LoRA stays on beside the set, and is as it was after it.
    pipe = _pipe(tiny_dir)
    pipe.load_lora_weights(str(trained / "segment_1"), adapter_name="style")
    pipe.set_adapters(["style"], [0.5])
    with enable_timestep_aware(pipe, trained) as switch:
        seen = []
        pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(switch.switch.active))
        pipe("a red circle", num_inference_steps=8, guidance_scale=1.0, output_type="latent")
    assert all(active[0] == "style" for active in seen) and seen[-1] == ("style", "segment_1", "segment_2")
    assert pipe.unet.active_adapters() == ["style"]
    # A name already taken: refused before anything loads, the pipeline untouched.
    pipe.load_lora_weights(str(trained / "segment_2"), adapter_name="segment_2")
    pipe.set_adapters(["style"], [0.5])
    with pytest.raises(ConfigError, match="already has an adapter named 'segment_2'"):
        enable_timestep_aware(pipe, trained)
    assert sorted(pipe.unet.peft_config) == ["segment_2", "style"] and pipe.unet.active_adapters() == ["style"]


def test_leaving_the_switch_restores_a_pipeline_whose_own_lora_covers_fewer_layers(trained, tiny_dir):
    """With the user's own LoRA on `to_q` only, the set's layers it did not cover stayed peft wrappers with
    nothing in them after the block: the UNet's state dict keys renamed (`to_k.base_layer.weight`), so a
    UNet saved afterwards loaded nowhere."""
    from peft import LoraConfig

    pipe = _pipe(tiny_dir)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"]), adapter_name="mine")
    keys, modules = list(pipe.unet.state_dict()), {name: type(m) for name, m in pipe.unet.named_modules()}
    mine = _image(pipe)
    with enable_timestep_aware(pipe, trained):
        assert not np.array_equal(_image(pipe), mine)
    assert {name: type(m) for name, m in pipe.unet.named_modules()} == modules
    assert list(pipe.unet.state_dict()) == keys and list(pipe.unet.peft_config) == ["mine"]
    assert np.array_equal(_image(pipe), mine)
    # A LoRA loaded inside the block into a pipeline that had none stays (it was unloaded with the set).
    pipe, theirs = _pipe(tiny_dir), _pipe(tiny_dir)
    theirs.load_lora_weights(str(trained / "segment_2"), adapter_name="theirs")
    with enable_timestep_aware(pipe, trained):
        pipe.load_lora_weights(str(trained / "segment_2"), adapter_name="theirs")
    assert list(pipe.unet.peft_config) == ["theirs"] and pipe.unet.active_adapters() == ["theirs"]
    assert list(pipe.unet.state_dict()) == list(theirs.unet.state_dict())
    assert np.array_equal(_image(pipe), _image(theirs))


def test_an_adapter_cut_short_as_it_loads_is_not_left_behind(trained, tiny_dir, monkeypatch):
    """Ctrl-C inside diffusers' load of the second adapter (it catches Exception only) left that adapter in the
    pipeline: only the adapters loaded to the end were taken out."""
    from shortft import lora

    pipe, load = _pipe(tiny_dir), lora.load_unet_lora
    modules = {name: type(m) for name, m in pipe.unet.named_modules()}

    def cut_short(unet, folder, name):
        load(unet, folder, name)
        if name == "segment_2":
            raise KeyboardInterrupt

    monkeypatch.setattr(lora, "load_unet_lora", cut_short)
    with pytest.raises(KeyboardInterrupt):
        enable_timestep_aware(pipe, trained)
    assert getattr(pipe.unet, "peft_config", None) is None
    assert {name: type(m) for name, m in pipe.unet.named_modules()} == modules


def test_a_lora_of_another_rank_names_the_first_weight_that_does_not_fit(trained, tiny_dir):
    """The line was PyTorch's header alone: 'does not fit this UNet's adapters (Error(s) in loading state_dict for
    UNet2DConditionModel:)'."""
    from shortft.lora import add_loras, load_lora_state

    unet = _pipe(tiny_dir).unet
    add_loras(unet, ["segment_1"], rank=8, alpha=8, targets=["to_q", "to_k", "to_v", "to_out.0"])
    with pytest.raises(ConfigError, match=r"LoRA segment_1 in \S+: does not fit this UNet's adapters \(size mismatch "
                                          r"for [\w.]+lora_A\.segment_1\.weight: copying a param with shape"):
        load_lora_state(unet, trained, ["segment_1"])


def test_the_switch_follows_schedulers_that_call_a_timestep_twice(trained, tiny_dir):
    """PNDM (a hub SD 1.5 pipeline's scheduler, `skip_prk_steps`) calls its second timestep twice and Heun
    every one but the first: split by position, PNDM at the run's own N ran segment 2's adapter one
    timestep late and the final stack at none of its calls, and Heun never ran segments 2..k."""
    from diffusers import HeunDiscreteScheduler, PNDMScheduler

    from shortft.lora_plan import read_lora_plan

    plan = read_lora_plan(trained)
    saved = dict(zip(plan["timesteps"], map(tuple, plan["step_adapters"])))
    for scheduler in (PNDMScheduler, HeunDiscreteScheduler):
        for steps in (8, 5):
            pipe = _pipe(tiny_dir)
            pipe.scheduler = scheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
            with enable_timestep_aware(pipe, trained) as switch:
                seen = []
                pipe.unet.register_forward_pre_hook(lambda m, a: seen.append((float(a[1]), switch.switch.active)))
                pipe("a red circle", num_inference_steps=steps, guidance_scale=1.0, output_type="latent")
            timesteps = [t for t, _ in seen]
            assert len(set(timesteps)) == steps < len(timesteps), (scheduler, timesteps)
            for t, active in seen:  # a timestep called twice runs the same adapters both times
                assert active == next(a for u, a in seen if u == t), (scheduler, steps, seen)
            runs = [a for _, a in seen]
            assert ("segment_1",) in runs and seen[-1][1] == ("segment_1", "segment_2"), (scheduler, steps, seen)
            if scheduler is PNDMScheduler and steps == 8:  # the run's N: the saved plan at each timestep
                assert [(t, saved[int(t)]) for t in timesteps] == seen


def test_a_lora_for_another_unet_is_refused_with_one_line(trained, tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    for name in ("segment_1", "segment_2"):
        state = load_file(str(trained / name / "pytorch_lora_weights.safetensors"))
        (bad / name).mkdir(parents=True)
        save_file({k.replace("down_blocks.0", "down_blocks.7"): v for k, v in state.items()},
                  str(bad / name / "pytorch_lora_weights.safetensors"))
    (bad / "shortft_lora.json").write_bytes((trained / "shortft_lora.json").read_bytes())
    with pytest.raises(ConfigError, match="trained for another"):
        enable_timestep_aware(_pipe(tiny_dir), bad)
    p = subprocess.run([sys.executable, "-m", "shortft.cli", "sample", f"model.pretrained={tiny_dir}",
                        "chain.steps=8", "--lora", str(bad), "--prompt", "a red circle", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    lines = [line for line in p.stderr.splitlines() if line.strip() and "sampling" not in line]
    assert p.returncode == 2 and len(lines) == 1 and "trained for another" in lines[0], p.stderr



def test_a_second_set_inside_the_first_ones_block_is_refused(trained, tiny_dir, tmp_path):
    """Nested, the inner set's hook ran after the outer's and turned on, at every step, the outer's adapters
    that were active as the inner one was made (segment_1..4 at t=981 and at t=481 alike)."""
    other = tmp_path / "other"
    for name in ("segment_1", "segment_2"):
        (other / name.replace("segment", "part")).mkdir(parents=True)
        for f in (trained / name).iterdir():
            (other / name.replace("segment", "part") / f.name).write_bytes(f.read_bytes())
    (other / "shortft_lora.json").write_text((trained / "shortft_lora.json").read_text().replace("segment_", "part_"))
    pipe = _pipe(tiny_dir)
    with enable_timestep_aware(pipe, trained):
        with pytest.raises(ConfigError, match=f"LoRA {other}: the pipeline already switches the set {trained} by "
                                              "timestep; one set at a time"):
            enable_timestep_aware(pipe, other)
        assert sorted(pipe.unet.peft_config) == ["segment_1", "segment_2"]
    with enable_timestep_aware(pipe, other) as switch:  # one after the other: each alone
        seen = []
        pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(switch.switch.active))
        pipe("a red circle", num_inference_steps=8, guidance_scale=1.0, output_type="latent")
    assert seen[0] == ("part_1",) and seen[-1] == ("part_1", "part_2"), seen


def test_a_lora_of_other_widths_is_refused_with_one_line(trained, tiny_dir, tmp_path, capfd):
    """A set trained on another model with the same module names (the tiny one's LoRAs into the toy) passed the
    name check; peft then warned and raised a RuntimeError of one "size mismatch" line per tensor."""
    from safetensors.torch import load_file, save_file

    wide = tmp_path / "wide"
    for name in ("segment_1", "segment_2"):
        state = load_file(str(trained / name / "pytorch_lora_weights.safetensors"))
        (wide / name).mkdir(parents=True)
        save_file({k: torch.cat([v, v[:1]] if ".lora_B." in k else [v, v[:, :1]], 0 if ".lora_B." in k else 1)
                   for k, v in state.items()}, str(wide / name / "pytorch_lora_weights.safetensors"))
    (wide / "shortft_lora.json").write_bytes((trained / "shortft_lora.json").read_bytes())
    pipe = _pipe(tiny_dir)
    capfd.readouterr()
    with pytest.raises(ConfigError, match=r"\.lora_A\.weight has shape \(\d+, \d+\), which does not fit this "
                                          r"UNet's .* it was trained for another model") as e:
        enable_timestep_aware(pipe, wide)
    assert "\n" not in str(e.value) and capfd.readouterr() == ("", "")
    assert not getattr(pipe.unet, "peft_config", None)  # nothing of the set left behind


def test_a_runs_lora_with_another_base_model_or_rank_names_the_runs_config_before_loading(trained, make_cfg,
                                                                                          monkeypatch):
    """`shortft eval/sample --lora runs/x/lora` with a config the LoRA was not trained with ended in PyTorch's
    state-dict error ('does not fit this UNet's adapters (Error(s) in loading state_dict ...)') after the
    model had loaded."""
    from shortft import sample

    monkeypatch.setattr(sample, "load_models", lambda *a, **k: pytest.fail("the models loaded first"))
    with pytest.raises(ConfigError) as e:
        sample.load_trained(make_cfg("lora.rank=8", "model.pretrained=builtin:toy"), str(trained))
    run = trained.parent
    assert str(e.value) == (f"--lora {trained}: trained with model.pretrained={make_cfg().model.pretrained!r}, "
                            f"lora.rank=4; this config has model.pretrained='builtin:toy', lora.rank=8; pass "
                            f"--config {run / 'config.yaml'}")


def test_a_run_or_checkpoint_folder_given_for_its_lora_names_the_lora_folder(trained):
    """`shortft eval --lora runs/x/checkpoints/step_000002` said only "no shortft_lora.json there"."""
    from shortft.lora_plan import read_lora_plan

    checkpoint = sorted((trained.parent / "checkpoints").glob("step_*"))[-1]
    for folder in (trained.parent, checkpoint):
        with pytest.raises(ConfigError, match=rf"no shortft_lora.json there; give {folder}/lora$"):
            read_lora_plan(folder)


def test_a_lora_folder_with_no_run_config_beside_it_is_checked_against_its_checkpoint_or_its_files(
        trained, make_cfg, tmp_path, monkeypatch, capsys):
    """A checkpoint's lora/ (or a lora/ copied out of its run, or downloaded from MLflow) has no config.yaml
    beside it: it loaded with this config's lora.alpha, a quarter of the run's strength, without a word. And
    the fix offered was to pass a received run's config, whose reward.modules are imported."""
    import shutil

    import yaml

    from shortft import sample

    monkeypatch.setattr(sample, "load_models", lambda *a, **k: pytest.fail("the models loaded first"))
    checkpoint = sorted((trained.parent / "checkpoints").glob("step_*"))[-1]
    with pytest.raises(ConfigError, match=r"trained with lora.alpha=4.0; this config has lora.alpha=16.0; pass "
                                          rf"lora.alpha=4.0 \(the run's, from {checkpoint}/state.json\)$"):
        sample.load_trained(make_cfg("lora.alpha=16"), str(checkpoint / "lora"))
    copied = tmp_path / "downloaded" / "lora"
    shutil.copytree(trained, copied)
    with pytest.raises(ConfigError, match=r"trained with lora.alpha=4.0; this config has lora.alpha=16.0; pass "
                                          r"lora.alpha=4.0 \(the run's, from \S+/downloaded/lora\)$"):
        sample.load_trained(make_cfg("lora.alpha=16"), str(copied))
    # the sampler its plan was made for, too: another one was used without a word
    monkeypatch.undo()
    sample.load_trained(make_cfg("chain.steps=8", "chain.segments=2"), str(copied))
    assert "the run evaluated with" not in capsys.readouterr().err
    sample.load_trained(make_cfg("chain.steps=6", "chain.segments=2", "chain.interior_adapters=segment"), str(copied))
    assert (f"--lora {copied}: the run evaluated with chain.steps=8, chain.interior_adapters='none'; this samples with "
            "chain.steps=6, chain.interior_adapters='segment' (pass chain.steps=8 chain.interior_adapters=\"none\" "
            f"(the run's, from {copied}))") in capsys.readouterr().err
    monkeypatch.setattr(sample, "load_models", lambda *a, **k: pytest.fail("the models loaded first"))
    run = tmp_path / "received"
    shutil.copytree(trained.parent, run, ignore=shutil.ignore_patterns("checkpoints"))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["reward"]["modules"] = ["their_rewards.py"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError, match=r"pass --config \S+/received/config.yaml \(read it first: its "
                                          r"reward.modules \['their_rewards.py'\] are imported, so run\)$"):
        sample.load_trained(make_cfg("lora.rank=8"), str(run / "lora"))


def test_a_runs_lora_on_its_base_model_at_another_path_loads_with_a_line_saying_so(trained, tiny_dir, make_cfg,
                                                                                  tmp_path, capsys):
    """The run's base model copied or moved (another machine's path, a hub id against a local snapshot) was
    refused with advice that went round in a circle: 'trained with model.pretrained=<old path>; this config
    has <new path>; pass --config <the run's config>', which named the old path."""
    import shutil

    import yaml

    from shortft import sample

    copy = tmp_path / "copy-of-the-model"
    shutil.copytree(tiny_dir, copy)
    models = sample.load_trained(make_cfg(f"model.pretrained={copy}"), str(trained))
    assert models.adapters and (f"trained with model.pretrained={str(tiny_dir)!r}, now {str(copy)!r} (the same UNet "
                                "architecture); the LoRAs load where their shapes fit that UNet") in capsys.readouterr().err
    run = tmp_path / "run-from-another-machine"
    shutil.copytree(trained.parent, run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["model"]["pretrained"] = "/data/models/not-here"
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    sample.load_trained(make_cfg(), str(run / "lora"))
    assert f"now {str(make_cfg().model.pretrained)!r} (/data/models/not-here is not on this machine to compare)" in capsys.readouterr().err


def test_sample_compare_grid_and_its_tuned_half_equals_eval(trained, tiny_dir, tmp_path):
    common = ["--config", "tiny", f"model.pretrained={tiny_dir}", "chain.steps=8", "chain.segments=2"]
    p = subprocess.run([sys.executable, "-m", "shortft.cli", "sample", *common, "--lora", str(trained),
                        "--prompt", "a red circle", "--prompt", "a blue square", "--seeds", "5,6",
                        "--compare", "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    grid = np.asarray(Image.open(tmp_path / "out" / "compare.png"))
    assert grid.shape == (4 * 128, 2 * 128, 3)  # 2 prompts x 2 seeds rows; base | tuned; 32 px tiles shown at 128
    assert len(list((tmp_path / "out").glob("0*-seed*.png"))) == 4
    # Which prompt and seed each image is, in the names and an index; a second call into the same folder
    # overwrote some of the first's images (000-seed0.png ...) and left the rest, and said "1 image(s)".
    index = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert [(i["file"], i["prompt"], i.get("seed")) for i in index["images"]] == [
        ("000-a-red-circle-seed5.png", "a red circle", 5), ("001-a-red-circle-seed6.png", "a red circle", 6),
        ("002-a-blue-square-seed5.png", "a blue square", 5), ("003-a-blue-square-seed6.png", "a blue square", 6),
        ("compare.png", "base | tuned, one row per prompt and seed, in the order above", None)]
    (tmp_path / "out" / "mine.png").write_bytes(b"the user's")  # not the command's: left alone
    again = subprocess.run([sys.executable, "-m", "shortft.cli", "sample", *common, "--lora", str(trained),
                            "--prompt", "a green cross", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000-a-green-cross-seed0.png", "mine.png",
                                                                     "samples.json"]
    assert (f"shortft: note: {tmp_path / 'out'}: the 5 image(s) of the earlier sample there are replaced by these "
            "(--out <folder> keeps both)") in again.stderr  # (they went without a word)
    e = subprocess.run([sys.executable, "-m", "shortft.cli", "eval", *common, "data.eval_prompts=[a red circle]",
                        "eval.seed=5", "eval.samples_per_prompt=1", "--lora", str(trained),
                        "--grid", str(tmp_path / "eval.png")], capture_output=True, text=True, timeout=300)
    assert e.returncode == 0, e.stderr
    # Equal up to one level of 255: `sample` draws the 4 images as one batch, `eval` this one alone, and
    # CPU kernels round a batch of 4 differently from a batch of 1 (the float images differ by up to
    # 7e-7, measured), which moves a value at a rounding boundary by one level (seen in a CI run: 1
    # pixel of 1,024). Another seed, prompt or LoRA differs by far more.
    tuned, base = grid[:128, 128:].astype(int), grid[:128, :128].astype(int)  # compare.png read before the rerun
    assert np.abs(tuned - np.asarray(Image.open(tmp_path / "eval.png")).astype(int)).max() <= 1
    assert np.abs(base - tuned).max() > 1  # the base half is the base model


def test_eval_and_sample_neither_fetch_nor_load_the_shortcut(tiny_dir, tmp_path, make_cfg):
    """The original N-step sampler never calls the shortcut. `eval` and `sample` loaded it anyway (an SDXL `unet:`
    shortcut is 5 GB more on the card) and, not in the hub cache and offline, stopped for want of it."""
    import os

    from shortft.sample import load_trained
    from tests.hub_layout import write_unet_lora

    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty-cache"), "HF_HUB_OFFLINE": "1"}
    e = subprocess.run([sys.executable, "-m", "shortft.cli", "eval", "--config", "tiny", f"model.pretrained={tiny_dir}",
                        "chain.steps=4", "model.shortcut=lora:ByteDance/Hyper-SD/Hyper-SD15-4steps-lora.safetensors",
                        "data.eval_prompts=[a red circle]", "eval.samples_per_prompt=1"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert e.returncode == 0 and '"eval/objective"' in e.stdout, e.stderr[-3000:]
    lora = write_unet_lora(str(tiny_dir), tmp_path / "shortcut" / "s.safetensors")
    models = load_trained(make_cfg(f"model.shortcut=lora:{lora}"), None)
    assert models.denoiser.shortcut_adapter is None and models.denoiser.shortcut_unet is None
    assert not any(".shortcut" in n for n, _ in models.unet.named_parameters())  # (conv_shortcut is a resnet's own)


def test_sample_and_eval_need_only_what_they_read_of_a_runs_config(trained, tiny_dir, tmp_path):
    """A run's config names the files of the machine it trained on. `sample` on a machine with the base
    model alone refused for the training prompts' file, a local shortcut file and (offline) a reward model
    it never loads; `eval` for the first two. Reproduced first: each was one line and exit 2."""
    import os

    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty-cache"), "HF_HUB_OFFLINE": "1"}
    elsewhere = ["--config", "tiny", f"model.pretrained={tiny_dir}", "chain.steps=8", "chain.segments=2",
                 f"data.prompts={tmp_path / 'gone.txt'}", f"model.shortcut=lora:{tmp_path / 'gone.safetensors'}",
                 "--lora", str(trained), "--quiet"]
    s = subprocess.run([sys.executable, "-m", "shortft.cli", "sample", *elsewhere, "reward.weights.pickscore=1",
                        f"data.eval_prompts={tmp_path / 'gone-too.txt'}", "--prompt", "a red circle",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300, env=env)
    assert s.returncode == 0 and len(list((tmp_path / "out").glob("*.png"))) == 1, s.stderr[-3000:]
    e = subprocess.run([sys.executable, "-m", "shortft.cli", "eval", *elsewhere, "data.eval_prompts=[a red circle]",
                        "eval.samples_per_prompt=1"], capture_output=True, text=True, timeout=300, env=env)
    assert e.returncode == 0 and '"eval/objective"' in e.stdout, e.stderr[-3000:]
    # What eval does read is still checked first: its held-out prompts, and the reward models it scores with.
    for bad, key in ((f"data.eval_prompts={tmp_path / 'gone-too.txt'}", "data.eval_prompts"),
                     ("reward.weights.pickscore=1", "reward.options.pickscore.path")):
        e = subprocess.run([sys.executable, "-m", "shortft.cli", "eval", *elsewhere, bad], capture_output=True,
                           text=True, timeout=300, env=env)
        assert e.returncode == 2 and e.stderr.startswith(f"shortft: error: {key}=") and "Traceback" not in e.stderr


def test_a_sampler_other_than_the_runs_is_said_and_a_prompt_table_is_read_by_its_column(trained, make_cfg, tmp_path,
                                                                                       capsys):
    """`eval --config toy --lora run/lora` of a run trained with `chain.interior_adapters=segment` silently
    scored another sampler than the run's own evaluation (method.md: 0.838 against 0.550 on the toy). And
    `sample --prompts p.csv` read the column `prompt` whatever `data.prompt_column` said."""
    from shortft import sample

    sample.load_trained(make_cfg("chain.steps=8", "chain.segments=2"), str(trained))
    assert "the run evaluated with" not in capsys.readouterr().err
    sample.load_trained(make_cfg("chain.steps=8", "chain.segments=2", "chain.interior_adapters=segment",
                                 "model.timestep_spacing=trailing"), str(trained))
    err = capsys.readouterr().err
    assert (f"--lora {trained}: the run evaluated with chain.interior_adapters='none', model.timestep_spacing=None; this "
            "samples with chain.interior_adapters='segment', model.timestep_spacing='trailing' (pass "
            f"chain.interior_adapters=\"none\" model.timestep_spacing=null (the run's, from "
            f"{trained.parent / 'config.yaml'}))") in err, err
    (tmp_path / "p.csv").write_text("caption\na red circle\n")
    cfg = make_cfg("chain.steps=8", "chain.segments=2", "data.prompt_column=caption")
    out = sample.run_sample(cfg, str(trained), [], str(tmp_path / "p.csv"), [0], 2, None, tmp_path / "out", False)
    assert len(list(out.glob("*.png"))) == 1
    # `sample --steps 2`: the note named the run's config.yaml, whose chain.steps --steps overrides
    assert (f"--lora {trained}: the run evaluated with chain.steps=8; this samples with chain.steps=2 (pass --steps 8)"
            in capsys.readouterr().err)
    # more steps than the model's timesteps: the note (pass --steps 8) came first, and then an error about
    # chain.steps, which the user never set
    with pytest.raises(ConfigError, match=re.escape("--steps 1001: at most 1000, this model's training timesteps")):
        sample.run_sample(cfg, str(trained), ["a red circle"], None, [0], 1001, None, tmp_path / "out1", False)
    assert "the run evaluated with" not in capsys.readouterr().err
    # fewer steps than the set's segments: they collapsed (segment_1 never ran alone), where chain.steps=1 is refused
    with pytest.raises(ConfigError, match=re.escape(f"--steps 1: the LoRA set {trained} has 2 segments, and each "
                                                    "needs a step; give 2 or more")):
        sample.run_sample(cfg, str(trained), ["a red circle"], None, [0], 1, None, tmp_path / "out1", False)


def test_the_evaluation_scores_in_chunks_of_its_batch_size_and_the_same_numbers(make_cfg):
    """Every evaluation image went to the reward models at once, beside the training's memory on the card
    (12.6 MB per 1024-px image before the reward models' own activations); now eval.batch_size at a time."""
    from shortft.evaluate import sample_terms
    from shortft.rewards import Rewards
    from shortft.sample import load_trained

    def cfg(batch: int):
        return make_cfg("chain.steps=4", "data.eval_prompts=[a red circle, a blue square, a green star]",
                        "eval.samples_per_prompt=1", "eval.terms=[brightness]", f"eval.batch_size={batch}")

    models, sizes = load_trained(cfg(2), None), []
    rewards = Rewards(cfg(2).reward.weights, cfg(2).reward.options, [cfg(2).eval.objective, "brightness"])
    terms = rewards.terms
    rewards.terms = lambda images, prompts, *a: sizes.append(len(images)) or terms(images, prompts, *a)
    chunked, _ = sample_terms(models, cfg(2), rewards)
    assert sizes == [2, 1]
    whole, _ = sample_terms(models, cfg(3), rewards)
    assert sizes[-1] == 3 and chunked.keys() == whole.keys()
    assert all(torch.allclose(chunked[k], whole[k], atol=1e-5) for k in whole)


def test_an_evaluation_keeps_only_the_images_of_its_grid(make_cfg, monkeypatch, tmp_path):
    """Every evaluation image was held until all were scored, and all went into one grid: HPD v2's 3200 prompts
    at 1024 px were 37.5 GiB of fp32 images and a PNG of gigabytes. Each chunk is scored as it is drawn; the grid holds
    the first GRID_MAX samples."""
    from PIL import Image

    from shortft import evaluate
    from shortft.rewards import Rewards
    from shortft.sample import load_trained

    cfg = make_cfg("chain.steps=4", "data.eval_prompts=[a red circle, a blue square, a green star]",
                   "eval.samples_per_prompt=2", "eval.terms=[brightness]", "eval.batch_size=2")
    models = load_trained(cfg, None)
    rewards = Rewards(cfg.reward.weights, cfg.reward.options, [cfg.eval.objective, "brightness"])
    drawn, real = [], evaluate.generate
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: drawn.append(len(a[2])) or real(*a, **k))
    monkeypatch.setattr(evaluate, "GRID_MAX", 3)
    metrics = evaluate.evaluate(models, cfg, rewards, tmp_path / "grid.png")
    assert drawn == [2, 2, 2] and len(metrics["eval/objective_samples"]) == 3  # chunk by chunk, all 6 scored
    side = models.resolution
    assert Image.open(tmp_path / "grid.png").size == (2 * side * max(1, 128 // side), 2 * side * max(1, 128 // side))
    terms, images = evaluate.sample_terms(models, cfg, rewards, keep=0)
    assert len(terms["brightness"]) == 6 and len(images) == 0


def test_sample_writes_its_index_in_place_of_a_link_not_through_it(trained, make_cfg, tmp_path):
    """`sample --out` into a folder holding `samples.json -> victim` wrote its index into the victim."""
    from shortft import sample

    victim, out = tmp_path / "victim.txt", tmp_path / "out"
    victim.write_text("precious")
    out.mkdir()
    (out / sample.INDEX).symlink_to(victim)
    sample.run_sample(make_cfg("chain.steps=8", "chain.segments=2"), str(trained), ["a"], None, [0], 8, None, out,
                      False)
    assert victim.read_text() == "precious" and not (out / sample.INDEX).is_symlink()
    assert json.loads((out / sample.INDEX).read_text())["images"][0]["prompt"] == "a"


def test_a_sample_cut_short_leaves_an_index_of_its_own_images(trained, make_cfg, tmp_path, monkeypatch):
    """A `sample` killed as it wrote its images (its `--compare` sampling was still to come) left the earlier
    sample's samples.json naming another LoRA and steps, and its own images listed nowhere (so the next
    sample left them behind)."""
    from shortft import sample

    cfg, out = make_cfg("chain.steps=8", "chain.segments=2"), tmp_path / "out"
    sample.run_sample(cfg, str(trained), ["a"], None, [0, 1], 8, None, out, False)
    real, saved = sample.save_grid, []

    def killed(images, path, **kw):
        saved.append(real(images, path, **kw))
        if len(saved) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(sample, "save_grid", killed)
    with pytest.raises(KeyboardInterrupt):
        sample.run_sample(cfg, str(trained), ["b"], None, [0, 1], 4, None, out, True)
    index = json.loads((out / sample.INDEX).read_text())
    assert index["steps"] == 4 and {p.name for p in out.glob("*.png")} <= {e["file"] for e in index["images"]}
    monkeypatch.setattr(sample, "save_grid", real)
    sample.run_sample(cfg, str(trained), ["c"], None, [0], 8, None, out, False)
    assert [p.name for p in out.glob("*.png")] == ["000-c-seed0.png"]


@pytest.mark.parametrize("edit,why", [
    ({"segments": 0}, "segments 0: a whole number from 1 to its 8 timesteps"),  # ZeroDivisionError in plan.py
    ({"segments": -2}, "segments -2: a whole number from 1"),  # max() arg is an empty sequence
    ({"segments": True}, "segments True: a whole number from 1"),  # taken as 1
    ({"segments": 1000000}, "segments 1000000: a whole number from 1 to its 8 timesteps"),
    ({"method": "bogus"}, "method 'bogus': not one of shortft, full,"),
    ({"adapters": []}, "adapters []: name at least one"),  # the base model sampled as the run's, unsaid
    ({"adapters": ["../../ext/segment_1"]}, "adapters: '../../ext/segment_1' is not a folder name beside it"),
    ({"adapters": [1]}, "adapters: 1 is not a folder name beside it"),  # TypeError in trained_settings
    ({"step_adapters": [["nope"]]}, "step_adapters: 'nope' is none of its adapters"),
    ({"step_adapters": ["segment_1"]}, "step_adapters: each step's entry is a list of its adapters"),  # its letters
])
def test_a_lora_plan_that_no_run_writes_is_one_line(trained, make_cfg, tmp_path, edit, why):
    """A hand-edited or hostile `shortft_lora.json` (a LoRA folder downloaded, or received) was a traceback
    (ZeroDivisionError, peft's KeyError, TypeError) or sampled something else without a word."""
    import shutil

    from shortft import sample
    from shortft.lora_plan import PLAN_FILE

    lora = tmp_path / "copy" / "lora"
    shutil.copytree(trained, lora)
    (lora / PLAN_FILE).write_text(json.dumps({**json.loads((trained / PLAN_FILE).read_text()), **edit}))
    with pytest.raises(ConfigError, match=f"^LoRA plan {lora / PLAN_FILE}: {re.escape(why)}"):
        sample.load_trained(make_cfg("chain.steps=8", "chain.segments=2"), str(lora))
