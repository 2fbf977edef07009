"""The reward registry: names -> factories of differentiable rewards, and a run's weighted terms.

Pixel rewards (`symmetry`, `brightness`, ...) live in `rewards/pixel.py`; the terms of built-in worlds
(e.g. the toy world's `toy_alignment`) register themselves from their own packages, loaded by name
the first time the registry is read.

A reward takes images in [0, 1] as a [B, 3, H, W] tensor plus their prompts and returns [B] rewards,
differentiable with respect to the images. Rewards are registered by name with a factory that takes
the term's options (`reward.options.<name>`, e.g. a local path or hub id for model-based rewards) and
returns a callable (an `nn.Module` for model-based ones: it is frozen and moved to the device).

    @register("my_reward")
    def my_reward(path: str = "org/model") -> RewardFn: ...

A factory that takes `random_weights` is given the bench's `--random-weights` (build the architecture
with random weights, read nothing); a module with `place(device)` is placed by it (dtype choices).
Terms registered with `eval_only=True` (e.g. `jpeg_size`) have no gradient: evaluation terms only.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Protocol

import torch
from torch import nn

from shortft import builtin
from shortft.config import Config, ConfigError
from shortft.rewards import modules, sources


class RewardFn(Protocol):
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor: ...


_REGISTRY: dict[str, Callable[..., RewardFn]] = {}
_CHECKS: dict[str, Callable[..., None]] = {}
EVAL_ONLY: set[str] = set()
PATH_OPTIONS = {"path", "processor", "clip"}  # options naming a model: a local path must exist


def without_autocast(device: torch.device):
    """A block that runs in the tensors' own precision though the loop scores under autocast (none on a
    device without autocast: the bench's meta tensors)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def register(name: str, eval_only: bool = False, check: Callable[..., None] | None = None) -> Callable:
    """`check(**options)`: the options' values, checked with the config (before any model loads); it
    raises a ConfigError that starts with `option=value`."""
    def wrap(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        _REGISTRY[name] = factory
        if eval_only:
            EVAL_ONLY.add(name)
        if check is not None:
            _CHECKS[name] = check
        return factory

    return wrap


def _registry() -> dict[str, Callable[..., RewardFn]]:
    builtin.load_worlds()  # their terms register on import
    return _REGISTRY


def names() -> list[str]:
    return sorted(_registry())


def packaged(name: str) -> bool:
    """A term of this package (or its built-in worlds), not one a user's module registered."""
    return _registry()[name].__module__.startswith("shortft.")


def loads_nothing_random(name: str) -> bool:
    """Whether `build(name, random_weights=True)` loads and downloads nothing: the package's own terms (the
    preference models take `random_weights`; the pixel terms have no weights), or a factory of the user's
    that takes `random_weights`. Another factory of the user's may load or download when built."""
    return packaged(name) or "random_weights" in inspect.signature(_registry()[name]).parameters


def factory_doc(name: str) -> str:
    """The first paragraph of a reward's docstring: what it measures."""
    return " ".join((_registry()[name].__doc__ or "").strip().split("\n\n")[0].split())


def defaults(name: str) -> dict:
    """A reward's options with their defaults (its factory's keyword arguments)."""
    import inspect

    return {k: p.default for k, p in inspect.signature(_registry()[name]).parameters.items()
            if p.default is not inspect.Parameter.empty}


def check_name(key: str, name: str) -> None:
    if name not in _registry():
        raise ConfigError(f"{key}: unknown reward {name!r}; registered: {', '.join(names())} (a term of your own: "
                          "name the module that registers it in reward.modules)")


def check_options(name: str, options: dict) -> None:
    """Each option is one the reward takes, with a value its check accepts: one line naming
    `reward.options.<name>.<option>`. They were first seen when the reward was built, after the
    diffusion model had loaded."""
    params = inspect.signature(_registry()[name]).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        takes = [k for k in params if k != "random_weights"]
        for key in options:
            if key not in takes:
                raise ConfigError(f"reward.options.{name}.{key}: {name} has no option {key!r}; it takes "
                                  f"{', '.join(takes) or 'none'}")
    if name in _CHECKS:
        try:
            _CHECKS[name](**options)
        except ConfigError as e:
            raise ConfigError(f"reward.options.{name}.{e}") from None


def build(name: str, options: dict | None = None, device: torch.device | str = "cpu",
          random_weights: bool = False) -> RewardFn:
    factory = _registry()[name]
    kwargs = dict(options or {})
    if random_weights and "random_weights" in inspect.signature(factory).parameters:
        kwargs["random_weights"] = True
    try:
        if kwargs.get("random_weights"):
            with torch.device(device):  # random init where the model will run: seconds on a CPU for ~1 B params
                fn = factory(**kwargs)
        else:
            fn = factory(**kwargs)
    except TypeError as e:
        raise ConfigError(f"reward.options.{name}: {e}") from None
    except ConfigError as e:  # an option's own check ("dtype='fp8': ...") gets the key it came from
        if str(e).startswith("reward."):
            raise
        raise ConfigError(f"reward.options.{name}.{e}") from None
    if isinstance(fn, nn.Module):
        fn = fn.eval().requires_grad_(False)
        fn = fn.place(device) if hasattr(fn, "place") else fn.to(device)
    return fn


class Rewards:
    """The named terms of a run: `terms(images, prompts)` -> {name: [B]}; `weighted` sums the weights."""

    def __init__(self, weights: dict[str, float], options: dict, extra: list[str] = (), device="cpu",
                 random_weights: bool = False):
        self.weights = {k: float(v) for k, v in weights.items() if v != 0}  # a 0 takes a term out
        wanted = list(dict.fromkeys([*self.weights, *extra]))
        self.fns = {n: build(n, options.get(n), device, random_weights) for n in wanted}

    def terms(self, images: torch.Tensor, prompts: list[str], only: list[str] | None = None) -> dict[str, torch.Tensor]:
        return {n: self.fns[n](images, prompts).float() for n in (only or self.fns)}

    def weighted(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(w * terms[n] for n, w in self.weights.items())


def check_config(cfg: Config) -> None:
    """Every reward term a config names (training weights, options, evaluation) is registered, once the
    modules of `reward.modules` have registered theirs."""
    modules.import_all(cfg.reward.modules)
    for name in cfg.reward.weights:
        check_name(f"reward.weights.{name}", name)
        if name in EVAL_ONLY and cfg.reward.weights[name]:  # a 0 leaves the term out (as the help says)
            raise ConfigError(f"reward.weights.{name}: {name} has no gradient (an evaluation term); "
                              "train on a differentiable term (e.g. compressibility) and list it in eval.terms")
    for name, opts in cfg.reward.options.items():
        check_name(f"reward.options.{name}", name)
        check_options(name, opts or {})
        for key in PATH_OPTIONS & set(opts or {}):
            sources.check_exists(f"reward.options.{name}.{key}", str(opts[key]))
    check_name("eval.objective", cfg.eval.objective)
    for name in cfg.eval.terms:
        check_name("eval.terms", name)

