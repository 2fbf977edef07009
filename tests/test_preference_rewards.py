"""Preference rewards (PickScore, HPS v2, CLIPScore, aesthetic) on tiny models in the official file layouts."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from shortft import rewards
from shortft.rewards.clip_prep import ClipPreprocess
from tests import reward_models
from tests.test_security import _Payload

PREFERENCE = ["pickscore", "clip_score", "hps_v2", "aesthetic"]
PROMPTS = ["a photo of a cat", "a watercolour of a harbour at dusk", "an anime portrait", "a photo of a cat"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return reward_models.build(tmp_path_factory.mktemp("reward_models"))


@pytest.fixture(scope="module")
def options(dirs):
    return reward_models.options(dirs)


def smooth_images(sizes, seed=0):
    """PIL images of several sizes and aspect ratios, smooth like generated ones (not pixel noise)."""
    rng = np.random.default_rng(seed)
    for h, w in sizes:
        coarse = (rng.random((h // 16 + 1, w // 16 + 1, 3)) * 255).astype(np.uint8)
        yield Image.fromarray(coarse).resize((w, h), Image.BILINEAR)


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255


@pytest.mark.parametrize("name", PREFERENCE)
def test_loads_from_the_release_layout_scores_and_passes_gradient(name, options):
    fn = rewards.build(name, options[name])
    assert not any(p.requires_grad for p in fn.parameters())
    images = torch.rand(4, 3, 48, 64, requires_grad=True)
    scores = fn(images, PROMPTS)
    assert scores.shape == (4,) and torch.isfinite(scores).all()
    scores.sum().backward()
    assert (images.grad.flatten(1).abs().sum(1) > 0).all()  # every image gets gradient


def test_micro_batches_and_prompt_cache_do_not_change_scores(options):
    images = torch.rand(4, 3, 40, 40)
    whole = rewards.build("pickscore", {**options["pickscore"], "batch_size": 4})(images, PROMPTS)
    fn = rewards.build("pickscore", {**options["pickscore"], "batch_size": 1})
    assert torch.allclose(fn(images, PROMPTS), whole, atol=1e-5)
    assert len(fn._text) == 3  # one embedding per distinct prompt


def test_preprocessing_matches_the_official_processor_on_pil_images(dirs):
    from transformers import CLIPImageProcessor
    proc = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    prep = ClipPreprocess.from_image_processor(proc)
    # PIL resamples uint8 with fixed-point weights and rounds to uint8: one grey level (1/255/std, 0.0150
    # normalised) is as close as a float implementation can get, and rounding alone leaves a mean error
    # of a quarter level. Measured: max 1.02 levels, mean 0.28.
    level = 1 / 255 / min(prep.std)
    for img in smooth_images([(512, 512), (300, 451), (640, 480), (100, 150), (1024, 768), (224, 224)]):
        ref = torch.from_numpy(np.array(proc(images=img, return_tensors="np")["pixel_values"]))
        diff = (prep(to_tensor(img)) - ref).abs()
        assert diff.max() <= 1.1 * level and diff.mean() < 0.35 * level, (img.size, float(diff.max()))


@pytest.mark.parametrize("name", ["pickscore", "clip_score", "aesthetic"])
def test_scores_match_the_official_processor_path(name, options, dirs):
    from transformers import CLIPImageProcessor
    fn = rewards.build(name, options[name])
    proc = CLIPImageProcessor.from_pretrained(dirs["clip" if name != "pickscore" else "processor"])
    imgs = list(smooth_images([(512, 512), (300, 451), (640, 480)], seed=1))
    ours = torch.cat([fn(to_tensor(i), PROMPTS[:1]) for i in imgs])
    pixels = torch.from_numpy(np.array(proc(images=imgs, return_tensors="np")["pixel_values"]))
    with torch.no_grad():
        img = torch.nn.functional.normalize(fn.model.visual_projection(fn.model.vision_model(pixel_values=pixels).pooler_output), dim=-1)
        if name == "aesthetic":
            ref = fn.head(img).squeeze(-1)
        else:
            ref = (img * fn.text_embeds(PROMPTS[:1])).sum(-1)
            ref = ref * fn.model.logit_scale.exp() if name == "pickscore" else ref
    assert torch.allclose(ours, ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())


def test_hps_v2_equals_open_clips_own_score(options, dirs):
    """HPSv2's score: normalised open_clip image and text features, their dot product."""
    oc = reward_models.open_clip_model().CLIP(**{k: reward_models.ARCH[k] for k in ("embed_dim", "vision_cfg", "text_cfg")})
    state = torch.load(dirs["hps"] / "HPS_v2_compressed.pt", weights_only=True)["state_dict"]
    oc.load_state_dict(state)
    oc.eval()
    fn = rewards.build("hps_v2", options["hps_v2"])
    images = torch.rand(3, 3, 40, 48)
    tokens = fn.tokenizer(PROMPTS[:3], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = (oc.encode_image(fn.prep(images), normalize=True) * oc.encode_text(tokens, normalize=True)).sum(-1)
        assert torch.allclose(fn(images, PROMPTS[:3]), ref, atol=1e-5)


def test_combined_reward_is_the_weighted_sum_of_its_parts(options):
    weights = {"pickscore": 10.0, "hps_v2": 2.0, "aesthetic": 0.05}  # the paper's combination
    r = rewards.Rewards(weights, options)
    images = torch.rand(2, 3, 32, 32)
    terms = r.terms(images, PROMPTS[:2])
    alone = {n: rewards.build(n, options[n])(images, PROMPTS[:2]) for n in weights}
    assert torch.allclose(r.weighted(terms), sum(w * alone[n] for n, w in weights.items()), atol=1e-5)


def test_random_weights_read_nothing():
    fn = rewards.build("aesthetic", {"path": "/nonexistent"}, random_weights=True)
    assert fn(torch.rand(1, 3, 64, 64), ["p"]).shape == (1,)


def test_jpeg_size_is_an_evaluation_term_only(make_cfg):
    flat, noise = torch.full((1, 3, 64, 64), 0.5), torch.rand(1, 3, 64, 64)
    size = rewards.build("jpeg_size")
    assert size(flat, ["p"]) > size(noise, ["p"])  # smaller file, higher score
    with pytest.raises(rewards.ConfigError, match="reward.weights.jpeg_size: jpeg_size has no gradient"):
        make_cfg("reward.weights={jpeg_size: 1}")
    make_cfg("eval.terms=[jpeg_size, compressibility]")


def _bad(options, name, **change):
    with pytest.raises(rewards.ConfigError) as e:
        rewards.build(name, {**options[name], **change})
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"reward.options.{name}.")
    return msg


def test_bad_paths_and_files_fail_in_one_line(options, dirs, tmp_path):
    assert "no such file or folder" in _bad(options, "pickscore", path=str(tmp_path / "nope"))
    assert "no such file or folder" in _bad(options, "hps_v2", path=str(tmp_path / "nope"))
    # A PickScore folder given to hps_v2, and an HPS file given to pickscore:
    assert "no HPS_v2_compressed.pt in that folder (it holds config.json" in _bad(options, "hps_v2", path=str(dirs["pickscore"]))
    assert "not a transformers model folder" in _bad(options, "pickscore", path=str(dirs["hps"]))
    assert "is a file" in _bad(options, "pickscore", path=str(dirs["hps"] / "HPS_v2_compressed.pt"))
    # Weights that do not fit: no silent partial load.
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {"visual.conv1.weight": torch.zeros(1), "something.else": torch.zeros(1)}}, bad)
    assert "do not fit the architecture" in _bad(options, "hps_v2", path=str(bad))
    torch.save({"layers.0.weight": torch.zeros(1024, 16)}, bad)
    assert "do not fit the architecture" in _bad(options, "aesthetic", path=str(bad))
    # A reward checkpoint that would run code when unpickled is refused, and the code does not run.
    marker = tmp_path / "pwned"
    for name, file in (("aesthetic", "sac+logos+ava1-l14-linearMSE.pth"), ("hps_v2", "HPS_v2_compressed.pt")):
        hostile = tmp_path / name
        hostile.mkdir()
        torch.save({"layers.0.weight": torch.zeros(1), "extra": _Payload(marker)}, hostile / file)
        assert "refused" in _bad(options, name, path=str(hostile))
        assert not marker.exists()


def test_cli_names_the_bad_path_and_exits_2(tmp_path):
    p = subprocess.run([sys.executable, "-m", "shortft.cli", "train", "--config", "tiny", "--dry-run",
                        "reward.weights={pickscore: 10}", f"reward.options.pickscore.path={tmp_path}/nope"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == (f"shortft: error: reward.options.pickscore.path={str(tmp_path / 'nope')!r}: "
                                "no such file or folder; give a hub id (org/name) or an existing path")
