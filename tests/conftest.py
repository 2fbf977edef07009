"""Shared fixtures: a tiny SD pipeline built from configs under a fixed seed (never downloaded)."""

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest
import torch

import shortft
from shortft import builtin


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    # Built-in models go to a per-session cache, so tests never read a user's cache.
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("SHORTFT_CACHE")
    os.environ["SHORTFT_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("SHORTFT_CACHE", None)
    else:
        os.environ["SHORTFT_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_dir(_cache):
    return builtin.resolve("builtin:tiny")


@pytest.fixture
def make_cfg(tmp_path, tiny_dir):
    """tiny config with overrides, writing under this test's tmp dir."""

    def make(*overrides, config="tiny"):
        return shortft.load_config(config, [f"model.pretrained={tiny_dir}", f"train.output_dir={tmp_path}/run",
                                            "train.log_every=100", *overrides])

    torch.manual_seed(0)
    return make


def lora_state(unet) -> dict:
    return {k: v.detach().clone() for k, v in unet.named_parameters() if "lora_" in k}


def frozen_state(*modules) -> dict:
    out = {}
    for i, m in enumerate(modules):
        out.update({f"{i}.{k}": v.detach().clone() for k, v in m.state_dict().items() if "lora_" not in k})
    return out
