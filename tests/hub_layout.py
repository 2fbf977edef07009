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


def write_unet_lora(pipeline_dir: str, out: Path, seed: int = 0, targets=("to_q", "to_k", "to_v", "to_out.0"),
                    text_encoder: bool = False) -> Path:
    """A LoRA file (diffusers format, random non-zero B) for the UNet of the pipeline in `pipeline_dir`; with
    `text_encoder`, one for its (first) text encoder in the same file, as some LoRA files hold."""
    import torch
    from diffusers import DiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=list(targets), init_lora_weights=False))
    layers = {"unet_lora_layers": get_peft_model_state_dict(unet)}
    if text_encoder:
        encoder = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False),
                                          CLIPTextModel.from_pretrained(pipeline_dir, subfolder="text_encoder"))
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(encoder)
    kind = DiffusionPipeline.load_config(pipeline_dir)["_class_name"]
    pipeline_class = getattr(__import__("diffusers"), kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    pipeline_class.save_lora_weights(out.parent, weight_name=out.name, **layers)
    return out
