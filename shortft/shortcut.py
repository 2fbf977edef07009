"""Loading the frozen shortcut: a LoRA file (Hyper-SD, TCD, LCM-LoRA) on the base UNet, or a separate UNet.

    lora:ByteDance/Hyper-SD/Hyper-SD15-4steps-lora.safetensors   one file inside a hub repo
    lora:./loras + model.shortcut_weight_name=tcd.safetensors      one file inside a local folder
    unet:org/repo (a UNet repo, or a pipeline repo's unet/ subfolder)

A LoRA whose keys match no UNet module, or only some of them, is an error, not a warning: it would
otherwise train against the base model while the user believes a shortcut is in the chain. What
diffusers and peft say while loading is shown (the CLI mutes their import-time chatter, not this).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from shortft.captured import captured_warnings
from shortft.config import Config, ConfigError
from shortft.plan import Shortcut
from shortft.progress import warn

SHORTCUT_ADAPTER = "shortcut"
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
    if weight_name is None and folder.is_dir():
        files = sorted(p.name for p in folder.glob("*.safetensors"))
        if len(files) > 1:  # diffusers would take the first one and only warn
            raise ConfigError(f"{flag}: {source} holds {len(files)} LoRA files ({', '.join(files[:3])}, ...); "
                              "pick one with model.shortcut_weight_name=<file> or lora:<folder>/<file>")
    extra = {"weight_name": weight_name} if weight_name else {}
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
    _scale(pipe.unet, SHORTCUT_ADAPTER, cfg.model.shortcut_scale)
    return SHORTCUT_ADAPTER


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


def load_unet_shortcut(shortcut: Shortcut, dtype: torch.dtype, device: torch.device):
    from diffusers import UNet2DConditionModel

    sub = "unet" if (Path(shortcut.path) / "unet").is_dir() else None
    try:
        unet = UNet2DConditionModel.from_pretrained(shortcut.path, subfolder=sub, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.shortcut=unet:{shortcut.path}: could not load a UNet ({_first_line(e)})") from None
    return unet.requires_grad_(False).eval().to(device)


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
    return (f"shortft: warning: model.shortcut is a {steps}-step shortcut (its file name says so) but "
            f"chain.segments={cfg.chain.segments}: its jumps would span 1/{cfg.chain.segments} of the trajectory, "
            f"not the 1/{steps} it was distilled for; set chain.segments={steps} or pick the matching file")
