"""The chain: call counts and where gradient flows (its equivalence with the diffusers sampler, for every
model class and spacing, is in test_model_classes.py)."""

import math

import pytest
import torch

from shortft.chain import ChainInput, sample
from shortft.models import load_models
from shortft.plan import shortft_plan, stacked

ADAPTERS = ("segment_1", "segment_2", "segment_3", "segment_4")


@pytest.fixture(scope="module")
def sd_timesteps_50():
    # SD 1.5's DDIM schedule (leading spacing, steps_offset=1) as the tiny pipeline uses it.
    from diffusers import DDIMScheduler

    s = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                      set_alpha_to_one=False, clip_sample=False)
    s.set_timesteps(50)
    return [int(t) for t in s.timesteps]


def test_shortft_plan_matches_paper_timesteps(sd_timesteps_50):
    calls = shortft_plan(sd_timesteps_50, 4, stacked(ADAPTERS))
    lora_steps = [c for c in calls if not c.shortcut]
    jumps = [(c.t, c.t_next) for c in calls if c.shortcut]
    assert len(calls) == 18  # N/k + 2(k-1) for N=50, k=4
    assert [c.t for c in lora_steps[:12]] == list(range(981, 760, -20))  # the head, LoRA_1
    assert [c.t for c in lora_steps[12:]] == [501, 261, 1]
    assert jumps == [(741, 501), (481, 261), (241, 1)]
    assert [c.adapters for c in lora_steps[12:]] == [ADAPTERS[:2], ADAPTERS[:3], ADAPTERS]
    assert all(c.adapters == () for c in calls if c.shortcut)


def _count_calls(unet):
    calls = []
    handle = unet.register_forward_hook(lambda m, args, out: calls.append(int(args[1])))
    return calls, handle


def test_shortft_chain_makes_18_network_calls_for_50_over_4(make_cfg, sd_timesteps_50):
    cfg = make_cfg("chain.steps=50", "chain.segments=4")
    models = load_models(cfg)
    calls, handle = _count_calls(models.unet)
    c = models.condition(["a red circle"], cfg.chain.guidance_scale, None)
    sample(models.denoiser, ChainInput(models.initial_noise(1, torch.Generator().manual_seed(0)), c), models.plan)
    handle.remove()
    assert len(calls) == 18
    assert calls == [c.t for c in shortft_plan(sd_timesteps_50, 4, stacked(ADAPTERS))]


def _grad_receiving_calls(models, cfg, stage=1, generator=None):
    """Schedule indices of the network calls that ran, and of those through which gradient flowed back
    (a tensor hook on each UNet output fires only if gradient reaches it)."""
    index_of_t = {t: i for i, t in enumerate(models.denoiser.timesteps(cfg.chain.steps))}
    ran, reached = [], set()

    def hook(module, args, out):
        i = index_of_t[int(args[1])]
        ran.append(i)
        if out.sample.requires_grad:
            out.sample.register_hook(lambda g, i=i: reached.add(i))

    handle = models.unet.register_forward_hook(hook)
    for p in (p for k, p in models.unet.named_parameters() if "lora_" in k):
        p.requires_grad_(True)
    c = models.condition(["a red circle"], cfg.chain.guidance_scale, None)
    noise = models.initial_noise(1, torch.Generator().manual_seed(0))
    x = sample(models.denoiser, ChainInput(noise, c, stage, generator), models.plan)
    x.square().mean().backward()
    handle.remove()
    return reached, sorted(set(ran))


# N=20, k=4: segments start at 0, 5, 10, 15. After a cut at 10 the ShortFT chain is: jump 10->14 (the
# frozen shortcut on a detached input: nothing to send gradient to), step 14, jump 15->19, step 19.
@pytest.mark.parametrize("method,expect", [("shortft", {14, 15, 19}), ("full", set(range(10, 20)))])
def test_truncate_at_stops_gradient_before_the_cut(make_cfg, method, expect):
    cfg = make_cfg(f"chain.method={method}", "chain.steps=20", "chain.truncate_at=0.5")
    reached, indices = _grad_receiving_calls(load_models(cfg), cfg)
    assert reached == expect
    assert min(indices) == 0 and max(indices) == 19  # the calls before the cut did run


def test_truncate_at_as_written_freezes_that_many_steps():
    """`chain.truncate_at=0.58` on N=50 froze 28 steps, not 29: floor(0.58 * 50) is floor(28.999999999999996)."""
    from types import SimpleNamespace

    from shortft.chain import _step_at, _truncate
    from shortft.plan import Call

    for n in (10, 20, 50, 100, 1000):
        calls = [Call(index=i, t=999 - i, t_next=998 - i, shortcut=False, adapters=(), segment=1) for i in range(n)]
        for m in range(n):
            plan = SimpleNamespace(chain=SimpleNamespace(truncate_at=m / n, steps=n))  # 29/50 == float("0.58")
            assert _truncate(calls, ["grad"] * n, plan).count("none") == m, (n, m)
            assert _step_at(m / n, n) == _step_at(m / n, n, math.ceil) == m  # refl's window, drtune's stops


def test_no_truncation_means_end_to_end(make_cfg):
    cfg = make_cfg("chain.steps=20")
    reached, indices = _grad_receiving_calls(load_models(cfg), cfg)
    assert reached == set(indices) and 0 in reached


def test_progressive_stage_runs_earlier_segments_without_gradient(make_cfg):
    cfg = make_cfg("chain.steps=20", "chain.segments=4")
    reached, indices = _grad_receiving_calls(load_models(cfg), cfg, stage=3)
    # segment 3 starts at index 10: the original steps before it carry no gradient
    assert reached == {14, 15, 19}
    assert set(range(10)) <= set(indices)  # the original steps, not the shortcut


@pytest.mark.parametrize("own_segment", [True, False])
def test_every_progressive_stage_has_calls_with_gradient(make_cfg, own_segment):
    """With train.stage_segment_grad=false stage s starts its gradient at segment s+1; the last stage has
    none after its own, and crashed in backward ("element 0 of tensors does not require grad")."""
    cfg = make_cfg("chain.steps=20", "chain.segments=4", f"train.stage_segment_grad={str(own_segment).lower()}")
    models = load_models(cfg)
    for stage in range(1, 5):
        reached, indices = _grad_receiving_calls(models, cfg, stage=stage)
        assert reached, stage
        first = {1: 0, 2: 5, 3: 10, 4: 15}[stage if own_segment or stage == 4 else stage + 1]
        assert min(reached) >= first  # segment s starts at index 5 (s - 1)


@pytest.mark.parametrize("method,expect", [("draft", {19}), ("refl", None), ("alignprop", None), ("drtune", None),
                                           ("draft_lv", {19})])
def test_baselines_put_gradient_where_they_should(make_cfg, method, expect):
    cfg = make_cfg(f"chain.method={method}", "chain.steps=20", "chain.drtune_train_steps=4")
    reached, indices = _grad_receiving_calls(load_models(cfg), cfg)
    if expect is not None:
        assert reached == expect
    elif method == "refl":  # one step with gradient, inside the late window [15, 20)
        assert len(reached) == 1 and 15 <= min(reached) < 20 and max(indices) == min(reached)
    elif method == "alignprop":  # outputs detached before a random cut drawn at each step
        assert 0 < len(reached) < len(indices)
    elif method == "drtune":  # at most 4 evenly spaced trained steps, before an early stop in [12, 20]
        steps = sorted(reached)
        assert 0 < len(steps) <= 4 and len({b - a for a, b in zip(steps, steps[1:])}) <= 1
        assert 12 <= len(indices) <= 20 and max(indices) == len(indices) - 1


def test_lora_shortcut_runs_only_the_shortcut_adapter(make_cfg, tmp_path, tiny_dir):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "sc", unet_lora_layers=get_peft_model_state_dict(unet))
    cfg = make_cfg("chain.steps=8", "chain.segments=2", f"model.shortcut=lora:{tmp_path / 'sc'}")
    models = load_models(cfg)
    seen = []
    orig = models.denoiser.switch.activate
    models.denoiser.switch.activate = lambda names: (seen.append(tuple(names)), orig(names))
    c = models.condition(["a red circle"], 3.0, None)
    sample(models.denoiser, ChainInput(models.initial_noise(1, torch.Generator().manual_seed(0)), c), models.plan)
    assert ("shortcut",) in seen
    assert all("shortcut" not in names or names == ("shortcut",) for names in seen)


@pytest.mark.parametrize("cut", ["per_step", "contiguous"])
def test_alignprop_trains_the_steps_its_cut_says(make_cfg, cut):
    """Counted with hooks on the real chain, for several seeded draws: the calls gradient reaches are
    exactly those the drawn modes train."""
    from shortft.chain import alignprop_modes

    cfg = make_cfg("chain.method=alignprop", "chain.steps=10", f"chain.alignprop_cut={cut}")
    models = load_models(cfg)
    calls = models.plan.calls(models.denoiser.timesteps(10))
    for seed in range(3):
        reached, _ = _grad_receiving_calls(models, cfg, generator=torch.Generator().manual_seed(seed))
        modes = alignprop_modes(calls, models.plan, torch.Generator().manual_seed(seed))
        assert reached == {c.index for c, m in zip(calls, modes) if m == "grad"}, (seed, modes)
        if cut == "contiguous":
            assert reached == set(range(min(reached), 10))


def test_alignprop_per_step_cut_trains_step_i_with_probability_i_plus_1_over_n_plus_1(make_cfg):
    """Its authors' code (and TRL's): u ~ U{0..N} drawn at every step i, output detached when i < u."""
    from shortft.chain import alignprop_modes

    cfg = make_cfg("chain.method=alignprop", "chain.steps=10")
    assert cfg.chain.alignprop_cut == "per_step"  # the default
    models = load_models(cfg)
    calls = models.plan.calls(models.denoiser.timesteps(10))
    gen, draws = torch.Generator().manual_seed(0), 4000
    trained = torch.zeros(10)
    for _ in range(draws):
        trained += torch.tensor([m == "grad" for m in alignprop_modes(calls, models.plan, gen)], dtype=torch.float)
    expected = torch.arange(1, 11) / 11
    assert torch.allclose(trained / draws, expected, atol=0.025), (trained / draws).tolist()
    # not one contiguous cut: some draws train a step and not the one after it
    modes = [alignprop_modes(calls, models.plan, gen) for _ in range(50)]
    assert any(m[i] == "grad" and m[i + 1] != "grad" for m in modes for i in range(9))


def test_refl_trains_one_step_drawn_uniformly_from_its_window(make_cfg):
    """ReFL over many seeded draws, counted with hooks on the real chain: each chain stops at its drawn
    step, whose call alone carries gradient (its predicted x0 is scored); the steps drawn cover the
    window [0.75, 1) of 12 steps, 9..11, about equally."""
    cfg = make_cfg("chain.method=refl", "chain.steps=12")
    models = load_models(cfg)
    stops = []
    for seed in range(36):
        reached, indices = _grad_receiving_calls(models, cfg, generator=torch.Generator().manual_seed(seed))
        assert len(reached) == 1 and indices == list(range(max(reached) + 1)), (seed, reached, indices)
        stops.append(max(reached))
    counts = {s: stops.count(s) for s in set(stops)}
    assert set(counts) == {9, 10, 11} and min(counts.values()) >= 6, counts


def test_drtune_trains_what_its_draw_says_and_stops_early_uniformly(make_cfg):
    """DRTune's per-iteration draw: the chain stops after a number of calls uniform over
    chain.drtune_stop_range (here [0.6, 1] of 10 steps: 6..10), at most K evenly spaced steps carry
    gradient, and hooks on the real chain find exactly the drawn steps (inputs detached elsewhere)."""
    from shortft.chain import drtune_plan

    cfg = make_cfg("chain.method=drtune", "chain.steps=10", "chain.drtune_train_steps=3")
    assert cfg.chain.drtune_stop_range == [0.6, 1.0]  # the early stop is on by default
    models = load_models(cfg)
    for seed in range(4):
        reached, indices = _grad_receiving_calls(models, cfg, generator=torch.Generator().manual_seed(seed))
        stop, trained = drtune_plan(10, models.plan, torch.Generator().manual_seed(seed))
        assert indices == list(range(stop)) and reached == set(trained), (seed, stop, trained)
    gen, draws = torch.Generator().manual_seed(0), 5000
    stops = torch.zeros(11)
    for _ in range(draws):
        stop, trained = drtune_plan(10, models.plan, gen)
        stops[stop] += 1
        assert 0 < len(trained) <= 3 and len({b - a for a, b in zip(trained, trained[1:])}) <= 1
        assert trained[-1] < stop
    assert stops[:6].sum() == 0 and torch.allclose(stops[6:] / draws, torch.full((5,), 0.2), atol=0.025)
    fixed = make_cfg("chain.method=drtune", "chain.steps=10", "chain.drtune_stop_range=[1.0,1.0]")
    assert {drtune_plan(10, load_models(fixed).plan, gen)[0] for _ in range(20)} == {10}  # [1, 1]: no early stop


@pytest.mark.parametrize("guidance,batch", [("1.0", 1), ("null", 2)])
def test_refl_trains_unguided_as_imagereward_does(make_cfg, guidance, batch):
    """ImageReward's ReFL.py calls the UNet on the prompt alone while it trains; evaluation stays guided."""
    from shortft.loop import micro_batch_loss
    from shortft.rewards import Rewards

    cfg = make_cfg("chain.method=refl", "chain.steps=8", "chain.guidance_scale=5", f"chain.refl_guidance={guidance}",
                   "chain.refl_margin=100")
    models = load_models(cfg)
    rewards = Rewards(cfg.reward.weights, cfg.reward.options)
    sizes = []
    handle = models.unet.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    noise = models.initial_noise(1, torch.Generator().manual_seed(0))
    loss, reward, _ = micro_batch_loss(models, rewards, cfg, ["a red circle"], noise, 1, torch.Generator().manual_seed(0))
    handle.remove()
    assert sizes and set(sizes) == {batch}  # [cond] only, or [uncond, cond]
    assert float(loss) == pytest.approx(100 - float(reward.mean()), rel=1e-6)  # relu(margin - reward)


def test_draft_lv_re_noises_each_sample_from_its_own_stream_whatever_rank_or_batch_draws_it(make_cfg):
    """DRaFT-LV drew its re-noise for the whole micro-batch from the stream every rank shares: rank 1's
    copies were rank 0's noise again, so 2 ranks x b samples were not those of 1 process x 2b."""
    from shortft.draws import CHAIN_STREAM, draw_batch, seeded
    from shortft.loop import micro_batch_loss
    from shortft.rewards import Rewards

    cfg = make_cfg("chain.method=draft_lv", "chain.steps=4", "chain.lv_copies=2")
    models = load_models(cfg)
    rewards = Rewards(cfg.reward.weights, cfg.reward.options)

    def rewards_of(first: int, size: int) -> torch.Tensor:  # samples first..first+size-1 of step 3, as a rank draws them
        batch, noise, gens = draw_batch(models, ["a red circle", "a blue square"], 0, 3, 0, first, size)
        _, reward, _ = micro_batch_loss(models, rewards, cfg, batch, noise, 1, seeded(0, 3, 0, CHAIN_STREAM),
                                        sample_generators=gens)
        return reward.detach().view(3, size)  # [the sample and its 2 copies, samples]

    both, rank0, rank1 = rewards_of(0, 2), rewards_of(0, 1), rewards_of(1, 1)
    assert torch.allclose(both, torch.cat([rank0, rank1], 1), atol=1e-5), (both, rank0, rank1)
    assert not torch.allclose(rank0[1:], rank1[1:], atol=1e-3)  # the two samples' copies differ


def test_a_baseline_neither_loads_nor_needs_the_shortcut_nor_has_segments(tmp_path):
    """The baselines run the N-step sampler and never jump: the shortcut was loaded all the same (an SDXL
    `unet:` shortcut is 5 GB more on the card), listed as a download of their dry run (sd15: Hyper-SD),
    and the toy's `full` with chain.segments=3 was refused for the shortcut-k3 it never calls; chain.steps=2
    with chain.segments=4 was refused ("each segment needs a step"); a resume that changed
    lora.timestep_aware, which gives a baseline no other LoRAs, was refused as if they would not fit."""
    import json

    from shortft import load_config
    from shortft.config import ConfigError
    from shortft.hub import sources
    from shortft.plan import training_plan
    from shortft.resume_settings import changed_settings

    full = load_config("toy", ["chain.method=full", "chain.segments=3"])
    assert training_plan(full).shortcut.kind == "none" and training_plan(full).chain.segments == 1
    assert training_plan(load_config("toy")).shortcut.kind == "lora"
    assert "model.shortcut" not in {s.key for s in sources(load_config("sd15", ["chain.method=draft"]))}
    assert "model.shortcut" in {s.key for s in sources(load_config("sd15"))}
    load_config("tiny", ["chain.method=draft", "chain.steps=2", "chain.segments=4"])
    with pytest.raises(ConfigError, match="chain.segments=4: must be <= chain.steps=2"):
        load_config("tiny", ["chain.steps=2", "chain.segments=4"])
    # a checkpoint of a baseline: one LoRA set, `default`, whatever timestep_aware says
    (tmp_path / "lora" / "default").mkdir(parents=True)
    was = {"chain.method": "full", "lora.timestep_aware": False}
    (tmp_path / "state.json").write_text(json.dumps({"step": 1, "config": was}))
    assert changed_settings(tmp_path, {**was, "lora.timestep_aware": True}, ["default"]) == [
        "lora.timestep_aware false -> true"]
    with pytest.raises(ConfigError, match="lora.timestep_aware=true, which its LoRAs do not fit"):
        changed_settings(tmp_path, {**was, "chain.method": "shortft", "lora.timestep_aware": True},
                         ["segment_1", "segment_2"])
