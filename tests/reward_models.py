"""Tiny random-initialised reward models, saved in the file layout of the official releases:

    pickscore/   config.json + model.safetensors (CLIPModel.save_pretrained), as yuvalkirstain/PickScore_v1
    processor/   tokenizer + preprocessor_config.json, as laion/CLIP-ViT-H-14-laion2B-s32B-b79K
    clip/        a CLIP model with its own processor files, as openai/clip-vit-large-patch14
    hps/         HPS_v2_compressed.pt: {"state_dict": open_clip CLIP state dict}, as xswu/HPSv2
    aesthetic/   sac+logos+ava1-l14-linearMSE.pth: the MLP's state dict

The HPS checkpoint is written by open_clip's own `CLIP` class (its model module, imported with
torchvision stubbed: see `open_clip_model`), so the conversion is checked against the real layout.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch

from shortft.rewards.open_clip_format import hf_config
from shortft.rewards.preference import AestheticMLP, char_tokenizer

ARCH = {"embed_dim": 16,
        "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 2}}


def open_clip_model():
    """open_clip's model module (pure torch) without the package's __init__, which imports torchvision:
    PyPI has no torchvision build for the CPU torch the tests run on."""
    import transformers  # noqa: F401  (imported first: it probes for torchvision once)
    if "open_clip.model" in sys.modules:
        return sys.modules["open_clip.model"]
    spec = importlib.util.find_spec("open_clip")
    pkg = types.ModuleType("open_clip")
    pkg.__path__ = list(spec.submodule_search_locations)
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (), {})  # used only by ResNet towers
    stubs = {"torchvision": types.ModuleType("torchvision"), "torchvision.ops": types.ModuleType("torchvision.ops"),
             "torchvision.ops.misc": misc}
    sys.modules.update(stubs)
    sys.modules["open_clip"] = pkg
    try:
        import open_clip.model
        return open_clip.model
    finally:
        for name in stubs:
            sys.modules.pop(name)


def build(root: Path) -> dict[str, Path]:
    from transformers import CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    tokenizer = char_tokenizer(ARCH["text_cfg"]["vocab_size"])
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    dirs = {n: root / n for n in ("pickscore", "processor", "clip", "hps", "aesthetic")}
    CLIPModel(hf_config(ARCH)).save_pretrained(dirs["pickscore"])
    tokenizer.save_pretrained(dirs["processor"])
    processor.save_pretrained(dirs["processor"])
    clip = CLIPModel(hf_config({**ARCH, "quick_gelu": True}))
    clip.save_pretrained(dirs["clip"])
    tokenizer.save_pretrained(dirs["clip"])
    processor.save_pretrained(dirs["clip"])
    oc = open_clip_model().CLIP(ARCH["embed_dim"], ARCH["vision_cfg"], ARCH["text_cfg"])
    dirs["hps"].mkdir()
    torch.save({"state_dict": {k: v.half() for k, v in oc.state_dict().items()}},  # the release is fp16
               dirs["hps"] / "HPS_v2_compressed.pt")
    dirs["aesthetic"].mkdir()
    torch.save(AestheticMLP(ARCH["embed_dim"]).state_dict(), dirs["aesthetic"] / "sac+logos+ava1-l14-linearMSE.pth")
    return dirs


def options(dirs: dict[str, Path]) -> dict[str, dict]:
    """`reward.options` pointing every preference reward at the tiny models."""
    return {"pickscore": {"path": str(dirs["pickscore"]), "processor": str(dirs["processor"])},
            "clip_score": {"path": str(dirs["clip"])},
            "hps_v2": {"path": str(dirs["hps"]), "arch": ARCH, "processor": str(dirs["processor"])},
            "aesthetic": {"path": str(dirs["aesthetic"]), "clip": str(dirs["clip"])}}
