"""The toy world's reward and judge: small image models trained on the generator's labels.

Both predict the attributes of an image (shape, shape colour, background colour, size). Their prompt
score is the mean probability they give to the attributes the prompt names: the toy counterpart of
PickScore / HPS v2, differentiable in the image. The reward (`toy_alignment`) is what training
maximises; the judge, trained independently (other seed, other architecture, other data), is used only
for evaluation, so that hacking the reward shows up as a gap between the two.

Registered reward terms:
  toy_alignment        reward model's prompt score, in [0, 1]
  toy_judge            judge's prompt score, in [0, 1]
  toy_judge_accuracy   1 if the judge's argmax shape AND colour match the prompt, else 0 (not differentiable)
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from shortft.rewards.registry import register
from shortft.toy.grammar import COLOURS, SHAPES, SIZES, parse

HEADS = {"shape": SHAPES, "colour": tuple(COLOURS), "background": tuple(COLOURS), "size": SIZES}


class AttributeNet(nn.Module):
    """A small CNN with one classification head per attribute. [B, 3, 32, 32] in [0, 1] -> logits."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), kernel: int = 3, pool: str = "stride"):
        super().__init__()
        self.config = {"widths": list(widths), "kernel": kernel, "pool": pool}
        layers, c = [], 3
        for w in widths:
            if pool == "stride":
                layers += [nn.Conv2d(c, w, kernel, stride=2, padding=kernel // 2), nn.SiLU()]
            else:
                layers += [nn.Conv2d(c, w, kernel, padding=kernel // 2), nn.GELU(), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.heads = nn.ModuleDict({k: nn.Linear(4 * c, len(v)) for k, v in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features((images - 0.5) / 0.25)
        return {k: head(h) for k, head in self.heads.items()}

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps(self.config))

    @classmethod
    def load(cls, path: str | Path) -> "AttributeNet":
        from safetensors.torch import load_file

        from shortft.builtin import resolve_path

        path = Path(resolve_path(str(path)))
        if not (path / "config.json").is_file():
            from shortft.config import ConfigError

            raise ConfigError(f"toy reward/judge: no model at {path} (build the toy assets: shortft toy build)")
        net = cls(**json.loads((path / "config.json").read_text()))
        if not next(net.parameters()).is_meta:  # built on the meta device, it is only counted (the dry run)
            net.load_state_dict(load_file(str(path / "model.safetensors")))
        return net.eval()


@lru_cache(maxsize=4096)
def _targets(prompt: str) -> tuple[tuple[str, int], ...]:
    named = parse(prompt)
    return tuple((k, HEADS[k].index(v)) for k, v in named.items() if v is not None)


def prompt_score(logits: dict[str, torch.Tensor], prompts: list[str]) -> torch.Tensor:
    """Mean probability of the attributes each prompt names. -> [B]"""
    probs = {k: v.float().softmax(-1) for k, v in logits.items()}
    scores = []
    for i, p in enumerate(prompts):
        named = _targets(p)
        scores.append(torch.stack([probs[k][i, j] for k, j in named]).mean() if named else probs["shape"][i].sum() * 0)
    return torch.stack(scores)


def shape_and_colour_right(logits: dict[str, torch.Tensor], prompts: list[str]) -> torch.Tensor:
    """1.0 where the argmax shape and shape colour both match the prompt. -> [B]"""
    out = []
    for i, p in enumerate(prompts):
        named = dict(_targets(p))
        ok = all(k in named and int(logits[k][i].argmax()) == named[k] for k in ("shape", "colour"))
        out.append(float(ok))
    return torch.tensor(out, device=logits["shape"].device)


class PromptScorer(nn.Module):
    def __init__(self, path: str, accuracy: bool = False):
        super().__init__()
        self.net = AttributeNet.load(path)
        self.accuracy = accuracy

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        logits = self.net(images.float())
        return shape_and_colour_right(logits, prompts) if self.accuracy else prompt_score(logits, prompts)


@register("toy_alignment")
def toy_alignment(path: str = "builtin:toy/reward") -> PromptScorer:
    """The toy world's learned, differentiable prompt-alignment reward (the training reward)."""
    return PromptScorer(path)


@register("toy_judge")
def toy_judge(path: str = "builtin:toy/judge") -> PromptScorer:
    """The toy world's held-out judge: mean probability it gives the attributes the prompt names (evaluation)."""
    return PromptScorer(path)


@register("toy_judge_accuracy", eval_only=True)  # 0/1 per image: no gradient
def toy_judge_accuracy(path: str = "builtin:toy/judge") -> PromptScorer:
    """The held-out judge's accuracy: 1 where its shape and shape colour both match the prompt, else 0."""
    return PromptScorer(path, accuracy=True)
