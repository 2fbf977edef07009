"""Random-weight pipelines of the real architectures, from configs alone (nothing downloaded).

For the benchmark and for memory estimates: `random_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5",
device="meta")` builds SD 1.5's UNet, VAE and text encoder with the published shapes; SDXL likewise (both
text encoders, the added text/time embedding). A local diffusers dir (the built-in tiny and toy models)
gives its own component configs. The tokenizers are small stand-ins with the real context length: only
the shapes of what they produce matter here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from shortft import builtin
from shortft.config import ConfigError

_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 2, "norm_num_groups": 32}
_CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
           "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768}
_CLIP_BIGG = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
              "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280}
_TOKENS = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}  # the stand-in tokenizer's ids

# The published component configs (unet/config.json etc. of each hub repo), the keys that differ
# from the diffusers/transformers defaults.
ARCHITECTURES = {
    "sd15": {
        "pipeline": "StableDiffusionPipeline",
        "unet": {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8},
        "vae": {**_VAE, "sample_size": 512, "scaling_factor": 0.18215},
        "text_encoder": _CLIP_L,
    },
    "sdxl": {
        "pipeline": "StableDiffusionXLPipeline",
        "unet": {"sample_size": 128, "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
                 "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
                 "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
                 "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816},
        "vae": {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "text_encoder": _CLIP_L,
        "text_encoder_2": _CLIP_BIGG,
    },
}
HUB_IDS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "runwayml/stable-diffusion-v1-5": "sd15",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
}


def _stand_in_tokenizer():
    return builtin.build_clip_tokenizer(builtin.TINY_WORDS, max_length=77)


def _from_published(name: str):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    arch = ARCHITECTURES[name]
    parts = {"unet": UNet2DConditionModel(**arch["unet"]), "vae": AutoencoderKL(**arch["vae"]),
             "text_encoder": CLIPTextModel(CLIPTextConfig(**arch["text_encoder"], **_TOKENS)),
             "tokenizer": _stand_in_tokenizer(), "scheduler": DDIMScheduler(**builtin.SD_SCHEDULER)}
    if arch["pipeline"] == "StableDiffusionXLPipeline":
        parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**arch["text_encoder_2"], **_TOKENS))
        parts["tokenizer_2"] = _stand_in_tokenizer()
        return StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _from_local_configs(path: str):
    """The pipeline in `path`, rebuilt from its component configs with random weights."""
    import diffusers
    import transformers
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(path)
    parts = {}
    for name, (library, class_name) in ((k, v) for k, v in index.items() if isinstance(v, list) and v[1]):
        cls = getattr(diffusers if library == "diffusers" else transformers, class_name)
        if name.startswith("tokenizer"):
            parts[name] = cls.from_pretrained(path, subfolder=name)
        elif name == "scheduler":
            parts[name] = cls.from_config(cls.load_config(path, subfolder=name))
        elif library == "diffusers":
            parts[name] = cls.from_config(cls.load_config(path, subfolder=name))
        else:
            parts[name] = cls(transformers.AutoConfig.from_pretrained(Path(path) / name))
    extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    pipeline = getattr(diffusers, index["_class_name"])
    return pipeline(**parts, **(extra if index["_class_name"] == "StableDiffusionPipeline" else {}))


def random_pipeline(pretrained: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A pipeline of `pretrained`'s architecture with random weights, built directly on `device`
    (`meta` builds it without memory, for FLOP counts and memory estimates)."""
    name = HUB_IDS.get(pretrained)
    local = builtin.resolve(pretrained) if name is None else None
    if name is None and not (Path(local) / "model_index.json").is_file():
        raise ConfigError(f"model.pretrained={pretrained!r}: random weights need a known architecture "
                          f"({', '.join(HUB_IDS)}) or a local diffusers dir")
    with torch.device(device):
        pipe = _from_published(name) if name else _from_local_configs(local)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # its tables on the CPU, not `device`
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, part, None)
        if module is not None:  # torch's own `to`: diffusers' warns of "modules kept in float32: []"
            torch.nn.Module.to(module, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe
