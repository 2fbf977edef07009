"""open_clip checkpoints (HPS v2 is one) as transformers `CLIPModel`s.

open_clip's ViT CLIP and transformers' `CLIPModel` are the same network under other names: pre-LN
blocks with a fused q/k/v projection in open_clip and three in transformers, the class token pooled
after `ln_post`, the text pooled at the end-of-text token (the largest token id) after `ln_final`,
projections stored as `x @ proj` in open_clip and as a `Linear` in transformers. Loading an open_clip
checkpoint into a `CLIPModel` lets every CLIP-based reward share one code path and one dependency
(transformers). open_clip's model code needs torchvision, which has no build for the CPU torch the
tests run on; tests/reward_models.py imports open_clip's model module with torchvision stubbed and
checks this conversion against open_clip's own forward pass.

Architectures are given in open_clip's JSON model-config format (`embed_dim`, `vision_cfg`,
`text_cfg`), as published in open_clip's `model_configs/`; the ones the built-in rewards use are below.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from shortft.config import ConfigError

# From open_clip's model_configs/ViT-H-14.json and ViT-L-14.json (OpenAI's ViT-L/14 uses QuickGELU,
# which open_clip spells ViT-L-14-quickgelu; the LAION and HPS ViT-H-14 use exact GELU).
ARCHS: dict[str, dict] = {
    "ViT-H-14": {"embed_dim": 1024,
                 "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}},
    "ViT-L-14-quickgelu": {"embed_dim": 768, "quick_gelu": True,
                           "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
                           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12,
                                        "layers": 12}},
}


def arch_config(arch: str | dict, key: str) -> dict:
    """An architecture by name (`ARCHS`), as a dict, or as a path to an open_clip model-config JSON."""
    if isinstance(arch, dict):
        return arch
    if arch in ARCHS:
        return ARCHS[arch]
    path = Path(arch).expanduser()
    if path.is_file():
        return json.loads(path.read_text())
    raise ConfigError(f"{key}={arch!r}: unknown architecture; use one of {', '.join(ARCHS)} "
                      "or the path of an open_clip model-config JSON")


def hf_config(arch: dict):
    """open_clip model config -> the equivalent transformers `CLIPConfig`."""
    from transformers import CLIPConfig

    v, t = arch["vision_cfg"], arch["text_cfg"]
    act = "quick_gelu" if arch.get("quick_gelu") else "gelu"
    vision = {"hidden_size": v["width"], "num_hidden_layers": v["layers"],
              "num_attention_heads": v["width"] // v.get("head_width", 64),
              "intermediate_size": int(v["width"] * v.get("mlp_ratio", 4.0)), "patch_size": v["patch_size"],
              "image_size": v["image_size"], "hidden_act": act, "layer_norm_eps": 1e-5}
    text = {"hidden_size": t["width"], "num_hidden_layers": t["layers"], "num_attention_heads": t["heads"],
            "intermediate_size": int(t["width"] * t.get("mlp_ratio", 4.0)),
            "max_position_embeddings": t["context_length"], "vocab_size": t["vocab_size"], "hidden_act": act,
            "layer_norm_eps": 1e-5,
            # eos_token_id 2 = transformers' legacy pooling at argmax(input_ids), which is open_clip's.
            "bos_token_id": 0, "eos_token_id": 2}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=arch["embed_dim"])


_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_PARTS = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                "attn.out_proj": "self_attn.out_proj"}
_FLAT = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight", "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_IGNORED = {"attn_mask", "logit_bias"}  # a buffer older open_clip saved; SigLIP's bias (not used by CLIP scores)


def to_hf_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """open_clip ViT CLIP state dict -> `CLIPModel` state dict, and the keys that had no place."""
    out: dict[str, torch.Tensor] = {}
    unplaced: list[str] = []
    for key, value in sd.items():
        key = key.removeprefix("module.")  # saved from DistributedDataParallel
        if key in _FLAT:
            out[_FLAT[key]] = value
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif (m := _BLOCK.match(key)) is not None:
            tower = "vision_model" if m.group(1) else "text_model"
            prefix, rest = f"{tower}.encoder.layers.{m.group(2)}.", m.group(3)
            if rest.startswith("attn.in_proj_"):
                kind = rest.removeprefix("attn.in_proj_")  # weight | bias
                for name, part in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}_proj.{kind}"] = part.contiguous()
            elif (part := rest.rsplit(".", 1)[0]) in _BLOCK_PARTS:
                out[prefix + _BLOCK_PARTS[part] + "." + rest.rsplit(".", 1)[1]] = value
            else:
                unplaced.append(key)
        elif key not in _IGNORED:
            unplaced.append(key)
    return out, unplaced
