"""Built-in models that need no download: written to disk in diffusers format and then loaded with the
same `from_pretrained` code as a hub model.

`builtin:tiny` is a randomly initialised Stable-Diffusion-architecture pipeline built from configs under
a fixed seed (the diffusers test idiom): the smallest thing the whole method runs on, for tests and
smoke runs; `builtin:tiny-v` is the same for the SD 2.x class (v-prediction, linear attention projections)
and `builtin:tiny-xl` for the SDXL class. Each is built once into the cache dir (`$SHORTFT_CACHE`, default ~/.cache/shortft).

Built-in worlds (today the toy world, `shortft/toy/`) are plug-ins: this module is the one place that
names them, loads their packaged assets by name and imports them so that their reward terms register.
The core never imports them directly.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from shortft.config import ConfigError

TINY_WORDS = (
    "a an the small large big tiny red green blue yellow white black purple orange circle square triangle "
    "star on in of at with background top bottom left right center picture photo shape"
).split()


# Stable Diffusion's DDIM schedule (scaled-linear betas, leading timesteps with offset 1), shared by the
# built-in models and the random-weight architectures.
SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
                "set_alpha_to_one": False, "steps_offset": 1}


CACHE_ENV = "SHORTFT_CACHE"


def cache_dir() -> Path:
    """$SHORTFT_CACHE (`~` expanded; empty is unset), else ~/.cache/shortft."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "shortft").expanduser()


def build_clip_tokenizer(words: list[str], max_length: int):
    """A CLIPTokenizer whose vocabulary is exactly `words` (plus single characters as fallback).

    BPE merges are generated so that each word merges left to right into one token; the result saves
    and loads with `CLIPTokenizer.from_pretrained` like any hub tokenizer.
    """
    from transformers import CLIPTokenizer

    chars = sorted({ch for w in words for ch in w})
    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for special in ("<|startoftext|>", "<|endoftext|>"):
        add(special)
    for ch in chars:
        add(ch)
        add(ch + "</w>")
    for word in sorted(set(words)):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            merge = (pieces[0], pieces[1])
            if merge not in merges:
                merges.append(merge)
            add(merged)
            pieces = [merged] + pieces[2:]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_tiny(out_dir: Path, seed: int = 0, v_prediction: bool = False) -> Path:
    """Random tiny SD pipeline (32x32 images, 16x16x4 latents) saved in diffusers format; with
    `v_prediction`, the SD 2.x class (v-prediction scheduler, linear projections, upcast attention)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=(2, 4) if v_prediction else 4, norm_num_groups=8,
        **({"use_linear_projection": True, "upcast_attention": True} if v_prediction else {}),
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    torch.manual_seed(seed + 2)
    tokenizer = build_clip_tokenizer(TINY_WORDS, max_length=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    scheduler = DDIMScheduler(**SD_SCHEDULER, prediction_type="v_prediction" if v_prediction else "epsilon")
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir)
    return out_dir


def build_tiny_xl(out_dir: Path, seed: int = 0) -> Path:
    """Random tiny SDXL-class pipeline (two text encoders, pooled states, added time ids; 32x32 images)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), cross_attention_dim=32,
        projection_class_embeddings_input_dim=6 * 8 + 16, norm_num_groups=8,  # 6 time ids x 8 + pooled 16
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
    )
    torch.manual_seed(seed + 2)
    tokenizer = build_clip_tokenizer(TINY_WORDS, max_length=16)
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=16, projection_dim=16, bos_token_id=0,
                eos_token_id=1, pad_token_id=1)
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text)), tokenizer=tokenizer,
        tokenizer_2=tokenizer, scheduler=DDIMScheduler(**SD_SCHEDULER), force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(out_dir)
    return out_dir


def build_tiny_v(out_dir: Path, seed: int = 0) -> Path:
    return build_tiny(out_dir, seed, v_prediction=True)


BUILTIN_MODELS = {"tiny": build_tiny, "tiny-v": build_tiny_v, "tiny-xl": build_tiny_xl}  # built on first use into the cache
# Built-in worlds: name -> (package, module whose import registers the world's reward terms). Each
# ships its model in <package>/assets, rebuilt by its own command (`shortft toy build`).
WORLDS = {"toy": ("shortft.toy", "shortft.toy.judges")}
PACKAGED = tuple(WORLDS)


def toy_dir() -> Path:
    """The toy world's assets: $SHORTFT_TOY_DIR if set (e.g. a `--quick` build), else the packaged ones. A
    relative $SHORTFT_TOY_DIR is made absolute in this process's environment at its first reading (the
    config checks, before Ray starts): processes started later in other folders inherit it, and Tune runs
    each trial in a folder of its own, where the relative one named nothing (every trial failed)."""
    from importlib import resources

    given = os.environ.get("SHORTFT_TOY_DIR")
    if not given:
        return Path(resources.files(WORLDS["toy"][0]) / "assets")
    path = Path(given).expanduser().resolve()
    os.environ["SHORTFT_TOY_DIR"] = str(path)
    return path


def world_module(world: str, module: str):
    """A module of a built-in world by name, e.g. `world_module("toy", "build")` for its build command."""
    return importlib.import_module(f"{WORLDS[world][0]}.{module}")


def load_worlds() -> None:
    """Import every built-in world so that its reward terms are registered (idempotent)."""
    for _, terms_module in WORLDS.values():
        importlib.import_module(terms_module)


def looks_like_path(name: str) -> bool:
    # A hub id is exactly "org/name"; anything else with a separator or a leading dot/tilde is a path.
    return name.startswith(("/", ".", "~")) or name.count("/") != 1 or os.sep != "/" and os.sep in name


def check_pretrained(pretrained: str) -> None:
    """`model.pretrained`: a known built-in, a built world's assets, or an existing local dir (hub ids
    are checked when loaded). Raised as a ConfigError naming the key."""
    if pretrained.startswith("builtin:"):
        allowed = [f"builtin:{n}" for n in (*BUILTIN_MODELS, *PACKAGED)]
        if pretrained not in allowed:
            raise ConfigError(f"model.pretrained={pretrained!r}: not one of {', '.join(allowed)}")
        if pretrained == "builtin:toy" and not (Path(resolve_path(pretrained)) / "model_index.json").is_file():
            if os.environ.get("SHORTFT_TOY_DIR"):  # the variable is what is wrong: "set it" was no help
                raise ConfigError(f"model.pretrained=builtin:toy: $SHORTFT_TOY_DIR={resolve_path(pretrained)} holds "
                                  "no toy assets (no model_index.json); point it at a `shortft toy build --out` "
                                  "folder, or unset it for the package's own")
            raise ConfigError(f"model.pretrained=builtin:toy: no toy assets at {resolve_path(pretrained)}; "
                              "run `shortft toy build` (or set SHORTFT_TOY_DIR)")
    elif looks_like_path(pretrained) and not Path(pretrained).expanduser().is_dir():
        raise ConfigError(f"model.pretrained={pretrained!r}: no such directory; give a diffusers pipeline dir, "
                          "a hub id (org/name) or builtin:tiny")


def resolve(pretrained: str) -> str:
    """`builtin:<name>` -> a local diffusers dir (built on first use, atomically); anything else as is."""
    if not pretrained.startswith("builtin:"):
        return pretrained
    name = pretrained.split(":", 1)[1]
    if name == "prompts":  # prompt sets that ship with the package
        from importlib import resources

        return str(resources.files("shortft.prompts"))
    if name == "toy":
        return str(toy_dir())
    target = cache_dir() / f"{name}-v1"
    if not complete(target):
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        except OSError as e:  # $SHORTFT_CACHE a file, or a folder this user cannot write
            raise ConfigError(f"builtin:{name} is built into {target.parent} (${CACHE_ENV}, else ~/.cache/shortft), "
                              f"which cannot be written here ({e.strerror or e}); set ${CACHE_ENV} to a folder "
                              "you can write") from None
        _build(name, tmp)
        if target.exists() and not complete(target):  # an earlier build left it without weights: set aside
            aside = Path(tempfile.mkdtemp(prefix=f".{name}-incomplete-", dir=target.parent))
            with contextlib.suppress(OSError):
                target.rename(aside / target.name)
            shutil.rmtree(aside, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def complete(folder: Path) -> bool:
    """A built pipeline: its index, a folder with files for each part it names, weights beside every config.json."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    parts = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None]
    weights = (".safetensors", ".bin")
    return all((folder / k).is_dir() and any((folder / k).iterdir()) for k in parts) and all(
        any(p.suffix in weights for p in config.parent.iterdir()) for config in folder.glob("*/config.json"))


def _build(name: str, out: Path) -> None:
    """`BUILTIN_MODELS[name]` into `out`, checked. In a process group (a Ray Train worker) in a process of its
    own: transformers writes a model's weights on rank 0 alone there, and rank 1's build, which won the race
    to the cache, had a text_encoder/ without them: every later run of the model failed to load it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        code = "import sys; from pathlib import Path; from shortft.builtin import BUILTIN_MODELS; " \
               "BUILTIN_MODELS[sys.argv[1]](Path(sys.argv[2]))"
        done = subprocess.run([sys.executable, "-c", code, name, str(out)], capture_output=True, text=True)
        why = (done.stderr.strip().splitlines() or [f"status {done.returncode}"])[-1]
    else:
        BUILTIN_MODELS[name](out)
        why = ""
    if not complete(out):
        shutil.rmtree(out, ignore_errors=True)
        raise ConfigError(f"builtin:{name}: its build into {out.parent} came out incomplete"
                          f"{f' ({why})' if why else ''}; check that the folder can be written, or set ${CACHE_ENV} "
                          "to another")


def resolve_path(path: str, segments: int | None = None) -> str:
    """`builtin:toy/reward` -> <toy dir>/reward; `{segments}` is filled in (per-k shortcut LoRAs)."""
    if segments is not None:
        path = path.replace("{segments}", str(segments))
    if path.startswith("builtin:"):
        name, _, sub = path[len("builtin:"):].partition("/")
        base = resolve(f"builtin:{name}")
        return str(Path(base) / sub) if sub else base
    return path
