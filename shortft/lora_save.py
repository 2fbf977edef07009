"""A run's LoRAs on disk: each adapter a plain diffusers LoRA folder (its rank and alpha in the file's
metadata), and `shortft_lora.json`, the per-timestep plan that `lora_plan.read_lora_plan` and
`enable_timestep_aware` read back. A run's final `lora/` is put in place whole (`save_loras_whole`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

from shortft.lora_plan import PLAN_FILE


def save_loras_whole(unet, names: Sequence[str], out_dir: Path, plan: dict) -> Path:
    """`save_loras` into a folder beside `out_dir`, then put in its place: a finished run resumed for more
    steps wrote its new adapters one by one over the old, and a kill between two left a folder of both
    steps that loaded without a word. (A kill between the two renames leaves no folder: said on loading.)"""
    out_dir = Path(out_dir)
    tmp, old = out_dir.with_name(f".tmp-{out_dir.name}"), out_dir.with_name(f".old-{out_dir.name}")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        save_loras(unet, names, tmp, plan)
    except BaseException:  # a full disk: its half is not left to hold the space
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def save_loras(unet, names: Sequence[str], out_dir: Path, plan: dict) -> Path:
    """Each adapter as a diffusers LoRA folder, plus the per-timestep adapter plan as JSON."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        state = get_peft_model_state_dict(unet, adapter_name=name)
        state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
        # The adapter's LoraConfig in the file's metadata, as diffusers' own training scripts save it: without
        # it a loader takes alpha = rank, and a LoRA trained with another `lora.alpha` loads at another strength.
        StableDiffusionPipeline.save_lora_weights(out_dir / name, unet_lora_layers=state,
                                                  unet_lora_adapter_metadata=unet.peft_config[name].to_dict())
    (out_dir / PLAN_FILE).write_text(json.dumps({"adapters": list(names), **plan}, indent=1))
    return out_dir
