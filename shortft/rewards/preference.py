"""Human-preference rewards, as their authors publish them, all on a transformers `CLIPModel`:

    pickscore    yuvalkirstain/PickScore_v1 (CLIP ViT-H/14)   logit_scale * cos(image, text)
    hps_v2       xswu/HPSv2, HPS_v2[.1]_compressed.pt           cos(image, text)   (open_clip checkpoint)
    clip_score   openai/clip-vit-large-patch14 (any CLIP)       cos(image, text)
    aesthetic    LAION aesthetic predictor v2: MLP on the L2-normalised CLIP ViT-L/14 image embedding

Each is an `nn.Module(images [B, 3, H, W] in [0, 1], prompts) -> [B]`, frozen; the gradient reaches
the images through the tensor preprocessing (`clip_prep.py`). Prompt embeddings are computed once per
prompt and cached; images go through in micro-batches of `batch_size`; on a GPU the CLIP runs in
bf16 (`dtype: auto`; or float32/bfloat16/float16). Options are `reward.options.<name>.<option>`.

With `random_weights` (the bench's `--random-weights`) each is built from its architecture alone with
random weights and a character-level tokenizer: nothing is read or downloaded.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from shortft import safe_load
from shortft.config import ConfigError
from shortft.rewards import sources
from shortft.rewards.clip_prep import ClipPreprocess, LongestSidePreprocess
from shortft.rewards.open_clip_format import ARCHS, arch_config, hf_config, to_hf_state_dict
from shortft.rewards.registry import register

LAION_VIT_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
OPENAI_VIT_L = "openai/clip-vit-large-patch14"
HPS_FILES = {"2": "HPS_v2_compressed.pt", "2.0": "HPS_v2_compressed.pt", "2.1": "HPS_v2.1_compressed.pt"}
AESTHETIC_FILE = "camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CACHE_LIMIT = 10_000  # prompt embeddings kept (a prompt set larger than this is re-encoded as it cycles)


def check_clip_options(batch_size: int = 8, dtype: str = "auto", **_) -> None:
    """The options every CLIP-based reward takes (`ClipReward`)."""
    if dtype != "auto" and dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: use auto, {', '.join(DTYPES)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r}: an integer >= 1")


def check_hps_options(version: str = "2", arch: str | dict = "ViT-H-14", **options) -> None:
    if str(version) not in HPS_FILES:
        raise ConfigError(f"version={version!r}: use 2 or 2.1")
    arch_config(arch, "arch")
    check_clip_options(**options)


class ClipReward(nn.Module):
    """A CLIP-based reward: `score` is "logit_cos" (PickScore), "cos" (HPS v2, CLIPScore) or "head"
    (an MLP on the normalised image embedding: the aesthetic predictor)."""

    def __init__(self, model: nn.Module, tokenizer, prep: ClipPreprocess | LongestSidePreprocess, score: str,
                 head: nn.Module | None = None, batch_size: int = 8, dtype: str = "auto"):
        super().__init__()
        check_clip_options(batch_size=batch_size, dtype=dtype)
        self.model, self.tokenizer, self.prep, self.score, self.head = model, tokenizer, prep, score, head
        self.batch_size, self.dtype_option = int(batch_size), dtype
        self._text: dict[str, torch.Tensor] = {}

    def place(self, device: torch.device | str) -> ClipReward:
        """Move to `device`; the CLIP in bf16 on a GPU with `dtype: auto`, else as asked (head and logit
        scale in fp32).
        Meta tensors stand in for a GPU (`shortft bench --count-only`): bf16 there too."""
        device = torch.device(device)
        auto = torch.bfloat16 if device.type in ("cuda", "meta") else torch.float32
        scale = self.model.logit_scale.detach().float().clone()
        self.to(device)
        self.model.to(DTYPES.get(self.dtype_option, auto))
        # Kept in fp32: bf16 rounds PickScore's ln(100) to 4.594, a scale of 98.86 (every score 1.1% low).
        self.model.logit_scale.data = scale.to(device)
        self._text.clear()
        return self

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        dtype = self.model.visual_projection.weight.dtype  # not the first parameter: logit_scale stays fp32
        pixels = self.prep(images).to(dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        new = list(dict.fromkeys(p for p in prompts if p not in self._text))
        if new:
            if len(self._text) + len(new) > _CACHE_LIMIT:
                self._text.clear()
            device = next(self.model.parameters()).device
            ids = self.tokenizer(new, padding="max_length", truncation=True,
                                 max_length=self.model.config.text_config.max_position_embeddings,
                                 return_tensors="pt").input_ids.to(device)
            # No attention mask, as open_clip and the PickScore card compute it: the mask is causal and
            # the pooled token is the end-of-text one, so padding after it changes nothing.
            pooled = self.model.text_model(input_ids=ids).pooler_output
            feats = F.normalize(self.model.text_projection(pooled).float(), dim=-1)
            self._text.update(zip(new, feats))
        return torch.stack([self._text[p] for p in prompts])

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            img = self.image_embeds(images[i : i + self.batch_size])
            if self.score == "head":
                out.append(self.head(img).squeeze(-1))
                continue
            cos = (img * self.text_embeds(prompts[i : i + self.batch_size])).sum(-1)
            out.append(self.model.logit_scale.float().exp() * cos if self.score == "logit_cos" else cos)
        return torch.cat(out)


# --- loading -----------------------------------------------------------------------------------------

def _load_clip(key: str, path: str, revision: str | None) -> nn.Module:
    from transformers import CLIPModel
    where = sources.folder(key, path)
    local = Path(where)
    if sources.is_local(path):
        config = local / "config.json"
        if not config.is_file():
            raise ConfigError(f"{key}={path!r}: not a transformers model folder (no config.json); "
                              "this reward takes a CLIP model saved with save_pretrained, or its hub id")
        kind = json.loads(config.read_text()).get("model_type")
        if kind != "clip":
            raise ConfigError(f"{key}={path!r}: a {kind!r} model, not a CLIP model (model_type 'clip')")
    try:
        return CLIPModel.from_pretrained(where, revision=revision)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}={path!r}: {str(e).splitlines()[0][:200]}") from None


def _processor(key: str, path: str, processor: str | None, revision: str | None,
               crop_rounding: str = "floor", longest_side: bool = False,
               processor_revision: str | None = None) -> tuple[object, object]:
    """The tokenizer and the image preprocessing: the model folder's own processor files if it has
    them, else `processor` (a hub id or folder). `crop_rounding` "round" is torchvision's CenterCrop (a
    model published with a torchvision transform); `longest_side` is HPS v2's resize-and-pad."""
    from transformers import AutoTokenizer, CLIPImageProcessor
    own = sources.is_local(path) and (Path(path).expanduser() / "preprocessor_config.json").is_file()
    source = sources.folder(key, path) if own or processor is None else sources.folder(
        key.rsplit(".", 1)[0] + ".processor", processor)
    rev = revision if source == path else processor_revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=rev)
        image_processor = CLIPImageProcessor.from_pretrained(source, revision=rev)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key.rsplit('.', 1)[0]}.processor={source!r}: no CLIP processor there "
                          f"({str(e).splitlines()[0][:160]})") from None
    if longest_side:
        return tokenizer, LongestSidePreprocess.from_image_processor(image_processor)
    return tokenizer, ClipPreprocess.from_image_processor(image_processor, crop_rounding)


def _byte_chars() -> list[str]:
    # GPT-2/CLIP byte-level BPE's printable stand-in for each of the 256 bytes.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in keep)
    return [chr(b) if b in keep else chr(256 + i) for i, b in enumerate(sorted(keep) + list(extra))][:256]


def char_tokenizer(vocab_size: int = 49408):
    """A CLIP tokenizer over single characters (no merges), end-of-text the largest id: for random-weight
    models, where nothing can be downloaded and the words do not matter."""
    from transformers import CLIPTokenizer
    chars = _byte_chars()
    vocab = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} < {len(vocab)} characters")
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(d)


def _random_clip(arch: str, prep=ClipPreprocess()) -> tuple[nn.Module, object, object]:
    from transformers import CLIPModel
    config = hf_config(ARCHS[arch])
    return CLIPModel(config), char_tokenizer(config.text_config.vocab_size), prep


def _load_weights(key: str, path, module: nn.Module, state: dict, unplaced: list[str] = ()) -> None:
    """All of `state` into `module`, or a ConfigError: nothing is loaded partially."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        detail = next((ln.strip() for ln in str(e).splitlines() if "mismatch" in ln), str(e).splitlines()[0])
        raise ConfigError(f"{key}={str(path)!r}: its weights do not fit the architecture ({detail[:200]}); "
                          "give this reward's own file (docs/rewards.md)") from None
    missing, unexpected = list(missing), [*unplaced, *unexpected]
    if missing or unexpected:
        raise ConfigError(f"{key}={str(path)!r}: its weights do not fit the architecture ({len(missing)} missing, "
                          f"{len(unexpected)} unexpected, e.g. {(missing + unexpected)[0]!r}); "
                          "nothing is loaded partially: give this reward's own file (docs/rewards.md)")


# --- the rewards -------------------------------------------------------------------------------------

def _clip_model_reward(name: str, path: str, processor: str | None, revision: str | None, score: str,
                       random_arch: str, random_weights: bool, batch_size: int, dtype: str,
                       processor_revision: str | None = None) -> ClipReward:
    """A reward on a transformers CLIP model folder or hub id (its processor: see `_processor`)."""
    if random_weights:
        return ClipReward(*_random_clip(random_arch), score, batch_size=batch_size, dtype=dtype)
    key = f"reward.options.{name}.path"
    model = _load_clip(key, path, revision)
    return ClipReward(model, *_processor(key, path, processor, revision, processor_revision=processor_revision), score,
                      batch_size=batch_size, dtype=dtype)


@register("pickscore", check=check_clip_options)
def pickscore(path: str = "yuvalkirstain/PickScore_v1", processor: str = LAION_VIT_H, revision: str | None = None,
              batch_size: int = 8, dtype: str = "auto", random_weights: bool = False,
              processor_revision: str | None = None) -> ClipReward:
    """PickScore (Kirstain et al. 2023), human preference: logit_scale * cos(image, prompt), as its card computes it."""
    return _clip_model_reward("pickscore", path, processor, revision, "logit_cos", "ViT-H-14", random_weights,
                              batch_size, dtype, processor_revision)


@register("clip_score", check=check_clip_options)
def clip_score(path: str = OPENAI_VIT_L, processor: str | None = None, revision: str | None = None,
               batch_size: int = 8, dtype: str = "auto", random_weights: bool = False,
               processor_revision: str | None = None) -> ClipReward:
    """CLIP image-text cosine similarity (any transformers CLIP checkpoint)."""
    return _clip_model_reward("clip_score", path, processor, revision, "cos", "ViT-L-14-quickgelu", random_weights,
                              batch_size, dtype, processor_revision)


@register("hps_v2", check=check_hps_options)
def hps_v2(path: str = "xswu/HPSv2", version: str = "2", file: str | None = None, arch: str | dict = "ViT-H-14",
           processor: str = LAION_VIT_H, revision: str | None = None, batch_size: int = 8, dtype: str = "auto",
           random_weights: bool = False, processor_revision: str | None = None) -> ClipReward:
    """HPS v2 / v2.1 (Wu et al. 2023), human preference: cos(image, prompt), as HPSv2's `score` computes it.

    An open_clip ViT-H/14 fine-tuned on human preferences (papers report the score x100). Preprocessing is
    HPSv2's own: the long side resized to 224 and padded, no crop (`LongestSidePreprocess`); the
    tokenizer is the same BPE as LAION's."""
    key = "reward.options.hps_v2.path"
    if random_weights:
        return ClipReward(*_random_clip("ViT-H-14", LongestSidePreprocess()), "cos", batch_size=batch_size, dtype=dtype)
    if str(version) not in HPS_FILES:
        raise ConfigError(f"reward.options.hps_v2.version={version!r}: use 2 or 2.1")
    weights = sources.file(key, path, file or HPS_FILES[str(version)], revision)
    state = safe_load.load(weights, f"{key}:")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{key}={str(weights)!r}: not a state dict of tensors (an open_clip checkpoint)")
    from transformers import CLIPModel
    model = CLIPModel(hf_config(arch_config(arch, "reward.options.hps_v2.arch")))
    _load_weights(key, weights, model, *to_hf_state_dict(state))
    # The image settings come from `processor` (open_clip's ViT-H-14 uses OpenAI's mean/std, as LAION's does).
    tokenizer, prep = _processor("reward.options.hps_v2.processor", processor, None, processor_revision,
                                 longest_side=True)
    return ClipReward(model, tokenizer, prep, "cos", batch_size=batch_size, dtype=dtype)


class AestheticMLP(nn.Module):
    """The LAION improved aesthetic predictor's head (`layers.*` keys, as its .pth stores them)."""

    def __init__(self, in_features: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_features, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                                    nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16),
                                    nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@register("aesthetic", check=check_clip_options)
def aesthetic(path: str = AESTHETIC_FILE, clip: str = OPENAI_VIT_L, revision: str | None = None,
              batch_size: int = 8, dtype: str = "auto", random_weights: bool = False,
              clip_revision: str | None = None) -> ClipReward:
    """LAION aesthetic predictor v2, about 1-10, no prompt (the one DDPO, AlignProp and TRL use).

    An MLP on the L2-normalised CLIP ViT-L/14 image embedding."""
    key = "reward.options.aesthetic.path"
    if random_weights:
        model, tokenizer, prep = _random_clip("ViT-L-14-quickgelu")
        return ClipReward(model, tokenizer, prep, "head", AestheticMLP(model.config.projection_dim), batch_size, dtype)
    weights = sources.file(key, path, "sac+logos+ava1-l14-linearMSE.pth", revision)
    state = safe_load.load(weights, f"{key}:")
    if not isinstance(state, dict) or "layers.0.weight" not in state:
        raise ConfigError(f"{key}={str(weights)!r}: not the aesthetic predictor's MLP (no 'layers.0.weight')")
    head = AestheticMLP(state["layers.0.weight"].shape[1])
    _load_weights(key, weights, head, state)
    clip_key = "reward.options.aesthetic.clip"
    model = _load_clip(clip_key, clip, clip_revision)
    if model.config.projection_dim != head.layers[0].in_features:
        raise ConfigError(f"{clip_key}={clip!r}: its embedding has {model.config.projection_dim} dims, the "
                          f"predictor takes {head.layers[0].in_features} (it was trained on CLIP ViT-L/14)")
    # Its scores were made with OpenAI `clip.load`'s transform: torchvision's CenterCrop, which rounds.
    return ClipReward(model, *_processor(clip_key, clip, None, clip_revision, crop_rounding="round"), "head", head,
                      batch_size, dtype)
