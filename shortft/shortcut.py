"""Loading the frozen shortcut: a LoRA file (Hyper-SD, TCD, LCM-LoRA) on the base UNet, or a separate UNet.

    lora:ByteDance/Hyper-SD/Hyper-SD15-4steps-lora.safetensors   one file inside a hub repo
    lora:./loras + model.shortcut_weight_name=tcd.safetensors      one file inside a local folder
    unet:org/repo (a UNet repo, or a pipeline repo's unet/ subfolder)
    unet:ByteDance/Hyper-SD/Hyper-SDXL-1step-Unet.safetensors    one state-dict file of the base UNet

A LoRA whose keys match no UNet module, or only some of them, is an error, not a warning: it would
otherwise train against the base model while the user believes a shortcut is in the chain. What
diffusers and peft say while loading is shown (the CLI mutes their import-time chatter, not this).
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from pathlib import Path

import torch

from shortft.captured import captured_warnings
from shortft.config import Config, ConfigError
from shortft.plan import Shortcut
from shortft.progress import warn

SHORTCUT_ADAPTER = "shortcut"
HUB_TIMEOUT_S = 10  # asking the hub which files a repo holds
# Loader messages that mean the file is not a LoRA for this UNet (a UNet-only LoRA that has no text
# encoder keys is fine: diffusers says so, "safe to ignore").
MISMATCH = ("unexpected keys", "no lora keys associated to unet", "not found in the base model", "size mismatch")


def _first_line(error: BaseException | str) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:240]


def load_lora_shortcut(pipe, cfg: Config, shortcut: Shortcut) -> str:
    """Load the shortcut LoRA into `pipe.unet` as adapter `shortcut`, scaled by `model.shortcut_scale`."""
    flag = f"model.shortcut={cfg.model.shortcut!r}"
    source, weight_name = shortcut.path, shortcut.weight_name
    folder = Path(source).expanduser()
    if weight_name is None:  # diffusers would take the first of several files and only warn
        weight_name = _one_lora_file(source, folder, cfg.model.shortcut_revision, flag)
    extra = {**({"weight_name": weight_name} if weight_name else {}),
             **({"revision": cfg.model.shortcut_revision} if cfg.model.shortcut_revision and not folder.exists() else {})}
    with captured_warnings("diffusers", "peft") as said:
        try:
            pipe.load_lora_weights(str(folder) if folder.exists() else source, adapter_name=SHORTCUT_ADAPTER, **extra)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            text = str(e)
            if "EntryNotFound" in type(e).__name__ or any(k in text for k in ("no file named", "have a file named")):
                raise ConfigError(f"{flag}: {source} has no file {weight_name}; check the repo/folder and the file "
                                  "name (model.shortcut_weight_name)") from None
            if not any(k in text.lower() for k in (*MISMATCH, "error(s) in loading state_dict")):
                raise ConfigError(f"{flag}: could not load the LoRA ({_first_line(e)})") from None
            said.append(next((ln.strip() for ln in text.splitlines() if any(k in ln.lower() for k in MISMATCH)),
                             "size mismatch"))
    mismatch = [m for m in said if any(k in m.lower() for k in MISMATCH)]
    if mismatch or not _has_adapter(pipe.unet, SHORTCUT_ADAPTER):
        why = _first_line(mismatch[-1]) if mismatch else "no UNet module took its weights"
        raise ConfigError(f"{flag}: the LoRA's keys do not match this UNet ({why}); is it a LoRA for another base "
                          f"model than this {type(pipe).__name__}?")
    for message in said:
        if "safe to ignore" not in message:
            warn(f"shortft: {flag}: {_first_line(message)}")
    dropped = _drop_text_encoder_part(pipe)
    if dropped:
        warn(f"shortft: {flag}: its text-encoder LoRA ({dropped} layers) is left out: the chain encodes each prompt once, "
             "for the base model and the shortcut alike, and the base model must see its own text encoder")
    _scale(pipe.unet, SHORTCUT_ADAPTER, cfg.model.shortcut_scale)
    return SHORTCUT_ADAPTER


def _one_lora_file(source: str, folder: Path, revision: str | None, flag: str) -> str | None:
    """The LoRA file of a folder or hub repo named without one: its only .safetensors file (a hub repo's from
    the hub's listing, or, where the hub cannot be asked, from this machine's hub cache), else a one-line
    refusal naming them. None for a local folder with none (check_shortcut refuses it first)."""
    fix = "pick one with lora:<folder or org/repo>/<file> or model.shortcut_weight_name=<file>"
    if folder.exists():
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    else:
        files = _hub_safetensors(source, revision, flag, fix)
    # what diffusers leaves out of its own guess: a training run's scheduler, optimizer and checkpoint files
    files = [f for f in files if not any(k in f for k in ("scheduler", "optimizer", "checkpoint"))]
    if len(files) > 1:
        raise ConfigError(f"{flag}: {source} holds {len(files)} LoRA files ({', '.join(files[:4])}"
                          f"{', ...' if len(files) > 4 else ''}); {fix}")
    if not files and not folder.exists():
        raise ConfigError(f"{flag}: {source} holds no .safetensors file; {fix}")
    return files[0] if files else None


def _hub_safetensors(repo: str, revision: str | None, flag: str, fix: str) -> list[str]:
    from huggingface_hub import HfApi, snapshot_download

    try:
        return sorted(s.rfilename for s in HfApi().model_info(repo, revision=revision, timeout=HUB_TIMEOUT_S).siblings
                      if s.rfilename.endswith(".safetensors"))
    except Exception as e:  # offline, no network, no such repo: what this machine's cache holds of it
        try:
            cached = Path(snapshot_download(repo, revision=revision, local_files_only=True,
                                            allow_patterns=["*.safetensors"]))
        except Exception:
            raise ConfigError(f"{flag}: which LoRA file of {repo}? The hub cannot be asked ({_first_line(e)}) and "
                              f"this machine's hub cache has none of its files; {fix}") from None
        return sorted(p.relative_to(cached).as_posix() for p in cached.rglob("*.safetensors"))


def _drop_text_encoder_part(pipe) -> int:
    """Remove what a shortcut LoRA file loaded into the text encoders (`load_lora_weights` loads every part it
    holds); left there it would stay on for every prompt, the base model's and the evaluation's."""
    from diffusers.utils.peft_utils import delete_adapter_layers

    dropped = 0
    for encoder in (getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2")):
        layers = sum(SHORTCUT_ADAPTER in getattr(m, "lora_A", {}) for m in encoder.modules()) if encoder else 0
        if layers:
            delete_adapter_layers(encoder, SHORTCUT_ADAPTER)
            dropped += layers
    return dropped


def _has_adapter(unet, name: str) -> bool:
    return any(name in getattr(m, "lora_A", {}) for m in unet.modules())


@torch.no_grad()
def _scale(unet, name: str, scale: float) -> None:
    # LoRA scale s: W + s*(alpha/r)*B@A. Folding s into B once is exact and costs nothing per call.
    if scale != 1.0:
        for module in unet.modules():
            lora_b = getattr(module, "lora_B", {})
            if name in lora_b:
                lora_b[name].weight.mul_(scale)


def load_unet_shortcut(shortcut: Shortcut, base_unet, dtype: torch.dtype, device: torch.device,
                       revision: str | None = None, variant: str | None = None):
    """A few-step UNet: a diffusers UNet folder or repo (a pipeline's `unet/` subfolder is found, in a local
    folder or a hub repo), or one state-dict file of the base model's UNet architecture
    (`unet:ByteDance/Hyper-SD/Hyper-SDXL-1step-Unet.safetensors`), loaded into a UNet built from the base
    model's config as Hyper-SD's own instructions do."""
    flag = f"model.shortcut=unet:{shortcut.path}" + (f"/{shortcut.weight_name}" if shortcut.weight_name else "")
    if shortcut.weight_name or shortcut.path.endswith(".safetensors"):
        unet = _unet_from_file(_weight_file(shortcut, flag, revision), base_unet.config, dtype, flag)
    else:
        unet = _unet_from_folder(shortcut.path, dtype, flag, revision, variant)
    return unet.requires_grad_(False).eval().to(device)


def _unet_from_folder(path: str, dtype: torch.dtype, flag: str, revision: str | None = None,
                      variant: str | None = None):
    """`variant` (the base model's, `model.variant`) first, then the default weight files: a repo may hold
    only fp16 files (loaded without the variant, it failed) or none of that variant, as a pipeline falls back."""
    from diffusers import UNet2DConditionModel

    local = Path(path).expanduser()
    # a local folder says where its UNet is; a hub repo is tried as a UNet repo, then as a pipeline repo
    subfolders = (["unet"] if (local / "unet").is_dir() else [None]) if local.exists() else [None, "unet"]
    for sub in subfolders:
        for each in dict.fromkeys([variant, None]):
            try:
                # a variant that is not there is retried without it: diffusers' warnings of that try are noise
                with captured_warnings("diffusers") if each else nullcontext():
                    return UNet2DConditionModel.from_pretrained(
                        str(local) if local.exists() else path, subfolder=sub, dtype=dtype, variant=each,
                        revision=None if local.exists() else revision)
            except (OSError, ValueError) as e:
                error = e
                if "config.json" in str(e):  # no UNet here at all: no other variant either
                    break
        if sub is not None or "config.json" not in str(error):
            break
    raise ConfigError(f"{flag}: could not load a UNet ({_first_line(error)})") from None


def _weight_file(shortcut: Shortcut, flag: str, revision: str | None = None) -> Path:
    if not shortcut.weight_name:
        return Path(shortcut.path).expanduser()
    local = Path(shortcut.path).expanduser() / shortcut.weight_name
    if local.is_file():
        return local
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(shortcut.path, shortcut.weight_name, revision=revision))
    except Exception as e:  # the source check before loading names most of these; this is what it cannot know
        raise ConfigError(f"{flag}: could not fetch the file ({_first_line(e)})") from None


def _unet_from_file(file: Path, config, dtype: torch.dtype, flag: str):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    with torch.device("meta"):  # the architecture only: every tensor comes from the file
        unet = UNet2DConditionModel.from_config(config)
    try:
        state = load_file(str(file))
    except Exception as e:
        raise ConfigError(f"{flag}: not a safetensors file ({_first_line(e)})") from None
    ours = unet.state_dict()
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    wrong = [k for k in ours if k in state and state[k].shape != ours[k].shape]
    if missing or unexpected or wrong:
        found = [f"{len(missing)} of the UNet's keys missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                 f"{len(wrong)} of another shape (e.g. {wrong[0]})" if wrong else ""]
        raise ConfigError(f"{flag}: {file.name} is not a state dict of this base model's UNet "
                          f"({'; '.join(f for f in found if f)}): a UNet of another base model, or a file in ComfyUI's "
                          "or the original format (use the diffusers-format file)")
    unet.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    return unet


def distilled_steps(shortcut: Shortcut) -> int | None:
    """The step count a shortcut file names (Hyper-SD15-4steps-lora, Hyper-SDXL-1step-lora), if any."""
    name = shortcut.weight_name or Path(shortcut.path).name
    found = re.search(r"(\d+)-?steps?\b", name, re.IGNORECASE)
    return int(found.group(1)) if found else None


def steps_warning(cfg: Config, shortcut: Shortcut) -> str | None:
    """A one-line warning when the shortcut was distilled for another segment count than chain.segments."""
    steps = distilled_steps(shortcut)
    if steps is None or cfg.chain.method != "shortft" or steps == cfg.chain.segments:
        return None
    if steps == 1 and shortcut.kind == "lora":  # Hyper-SD's 1-step LoRAs are its unified ones: 1 to 8 steps
        return None  # (with TCD), and chain.segments=1 would leave the chain no jump at all
    return (f"shortft: warning: model.shortcut is a {steps}-step shortcut (its file name says so) but "
            f"chain.segments={cfg.chain.segments}: its jumps would span 1/{cfg.chain.segments} of the trajectory, "
            f"not the 1/{steps} it was distilled for; set chain.segments={steps} or pick the matching file")
