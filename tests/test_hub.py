"""Hub sources are checked before anything loads them: in this machine's hub cache, or on the hub (asked
once, no retries), else one line naming the key. Before, a model neither cached nor reachable cost every
loading process half a minute of retries; a sweep paid that for its untrained model and for every
trial twice (Tune retries a failed trial), minutes of doomed trials, then a table of errors."""

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.hub_layout import hub_cache

ROOT = Path(__file__).resolve().parents[1]
MODEL = "someone/sd-model"
LORA = "lora:ByteDance/Hyper-SD/Hyper-SD15-4steps-lora.safetensors"

CHECK = """
import json, sys
from shortft import load_config
from shortft.config import ConfigError
from shortft.hub import check_sources
for case, overrides, here in json.loads(sys.argv[1]):
    told = []
    try:
        check_sources([load_config("tiny", overrides)], here=here, warn=told.append)
        print(json.dumps([case, None, told]))
    except ConfigError as e:
        print(json.dumps([case, str(e), told]))
"""


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers as the hub does: 200 for what it has, 404 with the hub's X-Error-Code for the rest."""

    def do_HEAD(self):  # noqa: N802 - http.server's name
        path = self.path.split("?")[0]
        code = ("GatedRepo" if "/gated/" in path else "RepoNotFound" if "/nobody/" in path
                else "EntryNotFound" if path.endswith("/missing.safetensors") else None)
        self.send_response(404 if code else 200)
        if code:
            self.send_header("X-Error-Code", code)
        else:
            self.send_header("X-Repo-Commit", "0" * 40)
            self.send_header("ETag", '"abc"')
            self.send_header("Content-Length", "10")
        self.end_headers()

    def log_message(self, *args):
        pass


def _check(cases, cache: Path, **env) -> dict:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), **env}
    p = subprocess.run([sys.executable, "-c", CHECK, json.dumps(cases)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return {case: (error, told) for case, error, told in map(json.loads, p.stdout.splitlines())}


@pytest.fixture
def cache(tmp_path):
    """A hub cache with the model's model_index.json and the 4-step shortcut LoRA (contents do not matter)."""
    (tmp_path / "f").write_text("{}")
    hub_cache(tmp_path / "cache", MODEL, {"model_index.json": tmp_path / "f"})
    hub_cache(tmp_path / "cache", "ByteDance/Hyper-SD", {"Hyper-SD15-4steps-lora.safetensors": tmp_path / "f"})
    return tmp_path / "cache"


def test_what_is_cached_passes_and_what_is_neither_cached_nor_reachable_stops_in_one_line(cache):
    out = _check([["cached", [f"model.pretrained={MODEL}", f"model.shortcut={LORA}"], True],
                  ["not cached", [f"model.pretrained={MODEL}", "model.shortcut=" + LORA.replace("4steps", "8steps")], True],
                  ["model", ["model.pretrained=someone/other"], True],
                  ["on other machines", ["model.pretrained=someone/other", "model.shortcut=" + LORA.replace("4", "2")],
                   False],
                  ["repo cached", ["model.shortcut=lora:ByteDance/Hyper-SD"], True],
                  ["repo not cached", ["model.shortcut=lora:h1t/TCD-SD15-LoRA"], True]], cache, HF_HUB_OFFLINE="1")
    assert out["cached"] == (None, [])
    # a shortcut repo named without its file: found in the cache by pattern (it was a note that it is not, and the
    # load failed after the base model had loaded where it was neither cached nor reachable)
    assert out["repo cached"] == (None, [])
    assert out["repo not cached"][0] == (
        "model.shortcut='lora:h1t/TCD-SD15-LoRA': not in this machine's hub cache, and the hub cannot be asked "
        "(HF_HUB_OFFLINE is set); download it first (hf download h1t/TCD-SD15-LoRA), or set model.shortcut to a local "
        "folder")
    assert out["not cached"][0] == (
        f"model.shortcut='{LORA.replace('4steps', '8steps')}': ByteDance/Hyper-SD/Hyper-SD15-8steps-lora.safetensors is "
        "not in this machine's hub cache, and the hub cannot be asked (HF_HUB_OFFLINE is set); download it first (hf "
        "download ByteDance/Hyper-SD Hyper-SD15-8steps-lora.safetensors), or set model.shortcut to a local folder")
    assert out["model"][0] == ("model.pretrained='someone/other': not in this machine's hub cache, and the hub cannot "
                               "be asked (HF_HUB_OFFLINE is set); download it first (hf download someone/other --include \"*.json\" "
                               "--include \"*.txt\" --include \"unet/diffusion_pytorch_model.safetensors\" --include "
                               "\"vae/diffusion_pytorch_model.safetensors\" --include \"text_encoder*/model.safetensors\"), or set "
                               "model.pretrained to a local folder")
    # a cluster's trials load them on their own nodes: one line on what this machine could not tell
    assert out["on other machines"] == (None, [
        "note: model.pretrained, model.shortcut: not in this machine's hub cache, and the hub cannot be asked from "
        "here (HF_HUB_OFFLINE is set); the machines that load them must have them"])


def test_what_the_hub_says_it_does_not_have_stops_in_one_line_wherever_the_trials_run(cache):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = _check([["on the hub", ["model.pretrained=someone/not-cached"], True],
                      ["no repo", ["model.pretrained=nobody/model"], False],
                      ["gated", ["model.pretrained=gated/model"], True],
                      ["no file", ["model.shortcut=lora:ByteDance/Hyper-SD/missing.safetensors"], False]],
                     cache, HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    assert out["on the hub"] == (None, [])
    assert out["no repo"][0] == ("model.pretrained='nobody/model': no such repo on the hub (or a private one: log in "
                                 "with `hf auth login`)")
    assert out["gated"][0].startswith("model.pretrained='gated/model': a gated repo: accept its terms")
    assert out["no file"][0] == ("model.shortcut='lora:ByteDance/Hyper-SD/missing.safetensors': the repo has no file "
                                 "missing.safetensors")


@pytest.mark.parametrize("command", [[sys.executable, "tune/sweep.py", "--space", "sd15", "--no-mlflow"],
                                     [sys.executable, "-m", "shortft.cli", "train", "--config", "sd15", "--no-mlflow"],
                                     [sys.executable, "-m", "shortft.cli", "train", "--config", "sd15", "--no-mlflow",
                                      "--workers", "2"],
                                     [sys.executable, "-m", "shortft.cli", "bench", "--config", "sd15", "--count-only"]])
def test_a_sweep_or_a_run_on_a_model_it_cannot_get_stops_before_ray_in_one_line(tmp_path, command):
    """The user-level repro: `python tune/sweep.py --space sd15` offline with an empty hub cache ran the
    untrained model's evaluation and then every trial twice, each after half a minute of retries."""
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.time()
    p = subprocess.run([*command, *(["--storage-path", str(tmp_path / "s")] if "tune/sweep.py" in command else [])],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    lines = (p.stdout + p.stderr).strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert lines[0].endswith("error: model.pretrained='stable-diffusion-v1-5/stable-diffusion-v1-5': not in this "
                             "machine's hub cache, and the hub cannot be asked (HF_HUB_OFFLINE is set); download it "
                             "first (hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --include \"*.json\" --include "
                             "\"*.txt\" --include \"unet/diffusion_pytorch_model.fp16.safetensors\" --include "
                             "\"vae/diffusion_pytorch_model.fp16.safetensors\" --include \"text_encoder*/model.fp16.safetensors\"), or set model.pretrained "
                             "to a local folder"), lines[0]
    assert time.time() - t0 < 60 and not list(tmp_path.glob("s/*"))  # no Ray started, no sweep state written


@pytest.fixture(scope="module")
def fp16_repo(tmp_path_factory):
    """The files of a tiny SD pipeline as the hub serves SD 1.5 with its fp16 variant."""
    from diffusers import DiffusionPipeline

    from shortft import builtin

    root = tmp_path_factory.mktemp("fp16")
    DiffusionPipeline.from_pretrained(builtin.resolve("builtin:tiny")).save_pretrained(root / "repo", variant="fp16")
    return {str(p.relative_to(root / "repo")): p for p in sorted((root / "repo").rglob("*")) if p.is_file()}


def test_a_model_cached_without_its_weights_stops_in_one_line_naming_them(fp16_repo, tmp_path):
    """The repro: an interrupted `hf download` (or one with too narrow an --include) left model_index.json and
    the configs but not the UNet's weights. The check passed, and `shortft eval` offline died in the load with
    diffusers' `no file named diffusion_pytorch_model.bin found in directory .../unet`, a file the repo never
    had; a sweep would have paid that in every trial."""
    weights = "unet/diffusion_pytorch_model.fp16.safetensors"
    assert weights in fp16_repo and "text_encoder/model.fp16.safetensors" in fp16_repo
    hub_cache(tmp_path / "partial", MODEL, {k: v for k, v in fp16_repo.items() if k != weights})
    # diffusers takes a component's plain weights where the variant's are missing: that is whole too
    hub_cache(tmp_path / "plain", MODEL, {(weights.replace(".fp16", "") if k == weights else k): v for k, v in fp16_repo.items()})
    hub_cache(tmp_path / "whole", MODEL, fp16_repo)
    cases = [["model", [f"model.pretrained={MODEL}", "model.variant=fp16"], True]]
    assert _check(cases, tmp_path / "whole", HF_HUB_OFFLINE="1")["model"] == (None, [])
    assert _check(cases, tmp_path / "plain", HF_HUB_OFFLINE="1")["model"] == (None, [])
    assert _check(cases, tmp_path / "partial", HF_HUB_OFFLINE="1")["model"][0] == (
        f"model.pretrained='{MODEL}': the hub cache holds {MODEL}'s model_index.json but no weights in unet/, and the "
        f"hub cannot be asked (HF_HUB_OFFLINE is set); download it first (hf download {MODEL} --include "
        f"\"unet/*.fp16.safetensors\"), or set model.pretrained to a local folder")
    # a reward's CLIP likewise; its processor's repo holds no weights and needs none
    hub_cache(tmp_path / "partial", "yuvalkirstain/PickScore_v1", {"config.json": fp16_repo["unet/config.json"]})
    hub_cache(tmp_path / "partial", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", {"config.json": fp16_repo["unet/config.json"]})
    assert _check([["clip", ["reward.weights={pickscore: 1}"], True]], tmp_path / "partial", HF_HUB_OFFLINE="1")["clip"][0] == (
        "reward.options.pickscore.path='yuvalkirstain/PickScore_v1': the hub cache holds yuvalkirstain/PickScore_v1's "
        "config.json but no weights in the top folder, and the hub cannot be asked (HF_HUB_OFFLINE is set); download it "
        "first (hf download yuvalkirstain/PickScore_v1), or set reward.options.pickscore.path to a local folder")
    hub_cache(tmp_path / "whole", "yuvalkirstain/PickScore_v1", {"config.json": fp16_repo["unet/config.json"],
                                                                 "model.safetensors": fp16_repo[weights]})
    hub_cache(tmp_path / "whole", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", {"config.json": fp16_repo["unet/config.json"]})
    assert _check([["clip", ["reward.weights={pickscore: 1}"], True]], tmp_path / "whole", HF_HUB_OFFLINE="1")["clip"] == (None, [])
    # the same repo as one reward's processor and another's model: the model still needs its weights
    both = ["reward.weights={pickscore: 1, clip_score: 1}",
            "reward.options={clip_score: {path: laion/CLIP-ViT-H-14-laion2B-s32B-b79K}}"]
    assert _check([["both", both, True]], tmp_path / "whole", HF_HUB_OFFLINE="1")["both"][0].startswith(
        "reward.options.clip_score.path='laion/CLIP-ViT-H-14-laion2B-s32B-b79K': the hub cache holds "
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K's config.json but no weights in the top folder")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)  # a hub that has them: the loader fetches them
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert _check(cases, tmp_path / "partial", HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}")["model"] == (None, [])
    finally:
        server.shutdown()
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "partial"), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "shortft.cli", "eval", "--config", "tiny", f"model.pretrained={MODEL}",
                        "model.variant=fp16"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    lines = (p.stdout + p.stderr).strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "no weights in unet/" in lines[0], p.stderr[-2000:]
    p = subprocess.run([sys.executable, "-m", "shortft.cli", "train", "--config", "tiny", f"model.pretrained={MODEL}",
                        "model.variant=fp16", "--dry-run"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert f"[to download: no weights in unet/] {MODEL}  model" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]


def test_the_dry_run_of_a_hub_model_not_yet_downloaded_lists_what_to_download(tmp_path):
    """SD 2.x (any hub model but the three ids the package knows) stopped the dry run at its first line, "no
    scheduler config here; download the model first": the command that says what to download."""
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "shortft.cli", "train", "--config", "sd15", "--dry-run",
                        "model.pretrained=stabilityai/stable-diffusion-2-1-base", "model.shortcut=none"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "the plan uses SD 1.x/2.x/XL's DDIM settings" in p.stdout and "stage 4/4" in p.stdout, p.stdout[-2000:]
    assert "stabilityai/stable-diffusion-2-1-base  model" in p.stdout, p.stdout[-2000:]


def test_a_users_reward_repo_without_a_config_json_is_found_in_the_cache(cache, tmp_path):
    """A reward of the user's whose model repo holds no config.json (a .pt, an open_clip repo) was refused as not
    in the hub cache while it was, and as having no config.json where the hub was asked."""
    (tmp_path / "own.py").write_text("from shortft.rewards import register\n\n\n@register('own_scorer')\n"
                                     "def factory(path: str = 'someone/scorer'):\n"
                                     "    return lambda images, prompts: images.mean(dim=(1, 2, 3))\n")
    hub_cache(cache, "someone/scorer", {"model.pt": tmp_path / "own.py"})
    own = [f"reward.modules=[{tmp_path / 'own.py'}]", "reward.weights.own_scorer=1"]
    out = _check([["cached", own, True],
                  ["not cached", [*own, "reward.options.own_scorer.path=someone/other"], True]], cache, HF_HUB_OFFLINE="1")
    assert out["cached"] == (None, [])
    assert out["not cached"][0] == (
        "reward.options.own_scorer.path='someone/other': not in this machine's hub cache, and the hub cannot be asked "
        "(HF_HUB_OFFLINE is set); download it first (hf download someone/other), or set reward.options.own_scorer.path "
        "to a local folder")


def test_timing_the_rewards_checks_their_sources_only(tmp_path):
    """`shortft rewards --cost` loads the reward models (not the base model) and did not check them: with an
    empty cache it failed in the first load (with HF_HUB_OFFLINE, huggingface_hub's LocalEntryNotFoundError;
    without it and without a network, after the retries). Now the same line as every other command."""
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "shortft.cli", "rewards", "--cost", "--config", "sd15", "--names", "hps_v2"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and p.stderr.strip() == (
        "shortft: error: reward.options.hps_v2.path='xswu/HPSv2': xswu/HPSv2/HPS_v2_compressed.pt is not in this "
        "machine's hub cache, and the hub cannot be asked (HF_HUB_OFFLINE is set); download it first (hf download "
        "xswu/HPSv2 HPS_v2_compressed.pt), or set reward.options.hps_v2.path to a local folder"), p.stderr[-2000:]


def test_a_prompt_file_on_the_hub_is_a_source_listed_by_the_dry_run_and_checked_like_the_models(cache, tmp_path):
    """`train --dry-run data.prompts=hf://datasets/...` said "nothing: every model is local"."""
    (tmp_path / "p.txt").write_text("a red circle\n")
    hub_cache(cache, "someone/prompts", {"train.txt": tmp_path / "p.txt"}, repo_type="dataset")
    dataset = "data.prompts=hf://datasets/someone/prompts/{}"
    out = _check([["cached", [dataset.format("train.txt")], True], ["not cached", [dataset.format("other.txt")], True]],
                 cache, HF_HUB_OFFLINE="1")
    assert out["cached"] == (None, [])
    assert out["not cached"][0] == (
        "data.prompts='hf://datasets/someone/prompts/other.txt': someone/prompts/other.txt is not in this machine's hub "
        "cache, and the hub cannot be asked (HF_HUB_OFFLINE is set); download it first (hf download someone/prompts "
        "other.txt --repo-type dataset), or set data.prompts to a local file")
    p = subprocess.run([sys.executable, "-m", "shortft.cli", "train", "--dry-run", "--config", "tiny",
                        dataset.format("other.txt")], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0 and "[to download] someone/prompts/other.txt  prompts (dataset file)" in p.stdout, p.stdout
    for value, told in (("someone/prompts", "expected hf://datasets/<org>/<name>/<file>"),
                        ("someone/prompts@main/train.txt", "'someone/prompts@main' is no hub dataset id (letters")):
        p = subprocess.run([sys.executable, "-m", "shortft.cli", "train", "--dry-run", "--config", "tiny",
                            f"data.prompts=hf://datasets/{value}"], capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and f"data.prompts='hf://datasets/{value}': {told}" in p.stderr, p.stderr


def test_every_hub_source_can_be_pinned_to_a_revision(monkeypatch):
    """Only the base model and a reward's own repo took a revision: the shortcut, the reward processors and the
    aesthetic model's CLIP always loaded `main`, which their owners can change under a run."""
    import shortft
    from shortft import hub
    from shortft.rewards import preference

    cfg = shortft.load_config("sd15", ["model.shortcut_revision=abc123",
                                       "reward.options={pickscore: {processor_revision: p1}, aesthetic: {clip_revision: c1}}"])
    pinned = {s.key: s.revision for s in hub.sources(cfg)}
    assert pinned["model.shortcut"] == "abc123"
    assert pinned["reward.options.pickscore.processor"] == "p1" and pinned["reward.options.aesthetic.clip"] == "c1"
    asked = []

    class Loader:
        @staticmethod
        def from_pretrained(source, revision=None):
            asked.append((source, revision))
            raise OSError("stop here")

    monkeypatch.setattr("transformers.AutoTokenizer", Loader)
    with pytest.raises(shortft.config.ConfigError):
        preference._processor("reward.options.hps_v2.processor", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", None, "p2",
                              longest_side=True)
    with pytest.raises(shortft.config.ConfigError):
        preference._processor("reward.options.pickscore.path", "yuvalkirstain/PickScore_v1",
                              "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "r1", processor_revision="p1")
    assert asked == [("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "p2"), ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "p1")]
