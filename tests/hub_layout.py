"""Files in the layouts the hub serves them, written from tiny random models (nothing downloaded).

`hub_cache(root, repo_id, files)` writes a Hugging Face cache (`models--org--name/snapshots/<commit>/`
with `refs/main`), so that with HF_HUB_CACHE=root and HF_HUB_OFFLINE=1 a hub id resolves through
huggingface_hub's own code, as it does after `huggingface-cli download`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, repo_id: str, files: dict[str, Path], repo_type: str = "model") -> Path:
    repo = root / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, snapshot / name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def write_unet_lora(pipeline_dir: str, out: Path, seed: int = 0, targets=("to_q", "to_k", "to_v", "to_out.0")) -> Path:
    """A LoRA file (diffusers format, random non-zero B) for the UNet of the pipeline in `pipeline_dir`."""
    import torch
    from diffusers import DiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=list(targets), init_lora_weights=False))
    kind = DiffusionPipeline.load_config(pipeline_dir)["_class_name"]
    pipeline_class = getattr(__import__("diffusers"), kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    pipeline_class.save_lora_weights(out.parent, unet_lora_layers=get_peft_model_state_dict(unet), weight_name=out.name)
    return out
