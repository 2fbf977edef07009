"""LoRA adapters on the UNet (peft), switched per call, saved in the diffusers LoRA format.

Timestep-aware ShortFT keeps one adapter per segment (`segment_1` .. `segment_k`); segment j runs with
`segment_1..j` stacked. Each adapter is saved in its own folder as a plain diffusers LoRA, so that

    pipe.load_lora_weights("out/lora/segment_1")          # any one of them, or a shared `default`

works with a stock `StableDiffusionPipeline`; `enable_timestep_aware(pipe, "out/lora")` loads the whole
set and switches adapters by timestep during any sampler's loop (a UNet forward pre-hook).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Sequence

import torch

from shortft.config import ConfigError
from shortft.lora_plan import read_lora_plan
from shortft.safe_load import Unreadable

_ENABLED = "_shortft_timestep_aware"  # on a UNet while a TimestepAwareLora switches its adapters: the set's folder


class AdapterSwitch:
    """Sets which adapters are active on every LoRA layer of a model.

    peft's `set_adapter` also flips `requires_grad` on adapters (active = trainable), which would
    unfreeze earlier LoRAs in progressive training and freeze trainable ones during the shortcut
    call; we only need the forward switch, so the active list is set directly.

    `stack=True` also makes the layers sum several active adapters in two matmuls instead of peft's
    loop (`shortft.stacked_lora`): the model's own layers change class, so a user's pipeline
    (`enable_timestep_aware`) is left with peft's."""

    def __init__(self, model: torch.nn.Module, stack: bool = True):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        if stack:
            from shortft.stacked_lora import stack_adapters

            stack_adapters(self.layers)
        self.active: tuple[str, ...] | None = None

    def activate(self, names: Sequence[str]) -> None:
        names = tuple(names)
        if names == self.active:
            return
        for layer in self.layers:
            layer._active_adapter = list(names)
        self.active = names


def add_loras(unet, names: Sequence[str], rank: int, alpha: float | None, targets: Sequence[str]) -> None:
    """Adds zero-initialised (B = 0) LoRAs; their params are fp32 whatever the UNet's dtype."""
    from peft import LoraConfig

    for name in names:
        with warnings.catch_warnings():  # peft warns on every adapter after the first; several are the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            unet.add_adapter(
                LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(targets), init_lora_weights=True),
                adapter_name=name,
            )
    for pname, p in unet.named_parameters():
        if "lora_" in pname and any(f".{n}." in pname for n in names):
            p.data = p.data.float()


def lora_params(unet, name: str) -> dict[str, torch.nn.Parameter]:
    return {k: p for k, p in unet.named_parameters() if "lora_" in k and f".{name}." in k}


def check_targets(unet, targets: Sequence[str]) -> None:
    """A ConfigError naming the `lora.targets` that match no module of the UNet (peft's error is a traceback)."""
    names = [n for n, _ in unet.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ConfigError(f"lora.targets: {missing} match no UNet module; e.g. to_q, to_k, to_v, to_out.0")


def read_lora_file(folder: str | Path) -> dict[str, torch.Tensor]:
    """A saved adapter's weights (`<folder>/pytorch_lora_weights.safetensors`), keyed by UNet module path."""
    from safetensors.torch import load_file

    from safetensors import SafetensorError

    path = Path(folder) / "pytorch_lora_weights.safetensors"
    if not path.is_file():
        raise Unreadable(f"LoRA {folder}: no pytorch_lora_weights.safetensors there")
    try:
        weights = load_file(str(path))
    except PermissionError as e:  # the file may be whole: not damage
        raise ConfigError(f"LoRA {path}: not readable here ({e.strerror or e})") from None
    except (SafetensorError, OSError) as e:  # a file cut short (a copy that stopped), or another kind
        raise Unreadable(f"LoRA {path}: unreadable ({str(e).splitlines()[0][:120]}); the file is cut short or of "
                         "another kind") from None
    return {k.removeprefix("unet."): v for k, v in weights.items()}


def load_lora_state(unet, lora_dir: Path, names: Sequence[str]) -> None:
    """Loads saved adapter weights back into already-added adapters (resume, eval, sample). A file
    whose keys do not fit the adapters (another model, rank or target list) is a ConfigError, never a
    partial load."""
    from peft.utils import set_peft_model_state_dict

    for name in names:
        state = read_lora_file(Path(lora_dir) / name)
        try:
            result = set_peft_model_state_dict(unet, state, adapter_name=name)
        except RuntimeError as e:  # a shape mismatch: another rank or model
            lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
            first = next((line for line in lines if line.startswith("size mismatch")), lines[0])  # not the header
            raise ConfigError(f"LoRA {name} in {lora_dir}: does not fit this UNet's adapters ({first[:300]})") from None
        ours = {k for k in lora_params(unet, name)}
        missing = [k for k in result.missing_keys if k in ours]
        if result.unexpected_keys or missing:
            example = (result.unexpected_keys or missing)[0]
            raise ConfigError(f"LoRA {name} in {lora_dir}: {len(result.unexpected_keys)} keys this UNet does not "
                              f"have and {len(missing)} it lacks (e.g. {example}); it was trained for another "
                              "model or with other lora.targets")


def load_unet_lora(unet, folder: str | Path, adapter_name: str) -> None:
    """One saved adapter (`<folder>/pytorch_lora_weights.safetensors`, diffusers format) into the UNet
    only: no text-encoder look-up, so no "no LoRA keys" warnings. Keys that match no UNet module are a
    ConfigError, never a partial load."""
    state = read_lora_file(folder)
    modules = dict(unet.named_modules())
    targets = {k.split(".lora_")[0] for k in state}
    stray = sorted(t for t in targets if t not in modules)
    if stray:
        raise ConfigError(f"LoRA {folder}: {len(stray)} of its {len(targets)} target modules are not in this UNet "
                          f"(e.g. {stray[0]}); it was trained for another model")
    for key, tensor in state.items():  # same names, other widths (another model): peft's load printed a
        target, _, part = key.partition(".lora_")  # warning, then one "size mismatch" line per tensor
        weight = getattr(modules[target], "weight", None)
        if weight is None or part[:2] not in ("A.", "B.") or tensor.ndim < 2:
            continue
        side = 1 if part.startswith("A") else 0  # lora_A reads the layer's input, lora_B writes its output
        if tensor.shape[side] != weight.shape[side]:
            raise ConfigError(f"LoRA {folder}: {key} has shape {tuple(tensor.shape)}, which does not fit this UNet's "
                              f"{target} (weight {tuple(weight.shape)}); it was trained for another model")
    with warnings.catch_warnings():  # peft warns on every adapter after the first; several are the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        unet.load_lora_adapter(state, prefix=None, adapter_name=adapter_name, metadata=lora_metadata(folder))


def lora_metadata(folder: str | Path) -> dict | None:
    """The LoraConfig a saved adapter's file carries (`save_loras`: rank, alpha, targets); None for a file
    without it (written before it was saved there: it loads at alpha = rank)."""
    from safetensors import safe_open

    with safe_open(str(Path(folder) / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")  # diffusers' LORA_ADAPTER_METADATA_KEY
    meta = json.loads(raw) if raw else {}
    return {k.removeprefix("unet."): v for k, v in meta.items() if k.startswith("unet.")} or None


class TimestepAwareLora:
    """Switches LoRAs by timestep inside any diffusers sampler loop.

    Which adapters run at a call follows the pipeline's own schedule (`pipe.scheduler.timesteps`, set
    before its loop; a timestep it calls twice, as PNDM and Heun do, counted once), split into the run's
    segments by position as `shortft sample --steps N` splits it: any scheduler and any N get every
    segment's adapters, and the run's own N exactly its plan. (Matched to the nearest saved timestep,
    another N or scheduler missed segments 2..k, whose adapters each run at one timestep.) Adapters the
    pipeline had active stay active alongside. One set at a time per pipeline: a second is refused until the
    first is removed.

    `remove()` (or leaving the `with` block) unloads the adapters it loaded and the hook, leaving the
    pipeline as it was: a pipeline that had no LoRA then samples bit-identically to a fresh one."""

    def __init__(self, pipe, lora_dir: str | Path):
        lora_dir = Path(lora_dir)
        plan = read_lora_plan(lora_dir)
        self.pipe, self.unet = pipe, pipe.unet
        on = getattr(self.unet, _ENABLED, None)
        if on is not None:  # nested, the inner hook ran after the outer one and kept its adapters on at every step
            raise ConfigError(f"LoRA {lora_dir}: the pipeline already switches the set {on} by timestep; one set at "
                              "a time: leave its `with` block (or call its remove()) first")
        self.had_adapters = bool(getattr(self.unet, "peft_config", None))
        self.names = list(plan["adapters"])
        taken = [n for n in self.names if n in (getattr(self.unet, "peft_config", None) or {})]
        if taken:
            raise ConfigError(f"LoRA {lora_dir}: the pipeline already has an adapter named {taken[0]!r}; "
                              "delete it first (pipe.delete_adapters), or load yours under another name")
        self.kept = tuple(self.unet.active_adapters()) if self.had_adapters else ()  # the user's own, left on
        self.wrapped = set(_lora_layers(self.unet))  # the layers the user's own LoRAs wrap
        try:
            for name in self.names:
                load_unet_lora(self.unet, lora_dir / name, name)
        except BaseException:  # nothing of a half-loaded set stays behind
            self._unload()
            raise
        self.timesteps = plan["timesteps"]
        self.step_adapters = [tuple(a) for a in plan["step_adapters"]]
        self.segments, self.interior = plan["segments"], plan.get("interior") or _interior_of(plan)
        self.schedule, self.schedule_of = (), None  # the pipeline's timesteps as floats, and the tensor read
        self.schedule_adapters: list[tuple[str, ...]] = []
        self.switch = AdapterSwitch(self.unet, stack=False)
        self.handle = self.unet.register_forward_pre_hook(self._hook, with_kwargs=True)
        setattr(self.unet, _ENABLED, lora_dir)

    def adapters_at(self, t: float) -> tuple[str, ...]:
        from shortft.plan import sampler_plan, stacked

        timesteps = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
        if timesteps is None or not len(timesteps):  # no schedule to follow: the saved step nearest
            i = min(range(len(self.timesteps)), key=lambda i: abs(self.timesteps[i] - t))
            return self.step_adapters[i]
        if timesteps is not self.schedule_of:  # set_timesteps makes a new tensor: read once per sampling loop
            # each timestep once: PNDM calls its second twice, Heun all but its first (split by position,
            # PNDM ran segment 2's adapter a step late and Heun none of segments 2..k)
            schedule = tuple(dict.fromkeys(float(x) for x in timesteps))
            calls = sampler_plan(schedule, self.segments, stacked(self.names), self.interior)
            self.schedule, self.schedule_of, self.schedule_adapters = schedule, timesteps, [c.adapters for c in calls]
        schedule = self.schedule
        i = min(range(len(schedule)), key=lambda i: abs(schedule[i] - t))
        return self.schedule_adapters[i]

    def _hook(self, module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        t = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
        self.switch.activate(self.kept + self.adapters_at(t))

    def _unload(self) -> None:
        loaded = getattr(self.unet, "peft_config", None) or {}
        names = [n for n in self.names if n in loaded]  # one cut short as it loaded (Ctrl-C) too
        others = [n for n in loaded if n not in names]
        if not others:  # back to the plain modules, not LoRA wrappers with nothing in them (the state dict's
            # keys renamed `base_layer`): after delete_adapters, diffusers had dropped peft_config with the last
            # adapter and the check for it skipped this
            self.unet.unload_lora()
            return
        if names:
            self.unet.delete_adapters(names)
        for name, layer in _lora_layers(self.unet).items():  # the set's alone: plain modules again (left as
            if name not in self.wrapped and not layer.lora_A:  # empty wrappers, the keys renamed as above)
                parent, _, child = name.rpartition(".")
                setattr(self.unet.get_submodule(parent), child, layer.get_base_layer())
        if self.kept:  # deleting an active adapter makes peft activate another: the user's as they were
            AdapterSwitch(self.unet, stack=False).activate(self.kept)

    def remove(self) -> None:
        if self.handle is None:
            return
        self.handle.remove()
        self.handle = None
        with contextlib.suppress(AttributeError):
            delattr(self.unet, _ENABLED)
        self._unload()

    def __enter__(self) -> "TimestepAwareLora":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The model's peft LoRA layers by name."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def _interior_of(plan: dict) -> str:
    """A plan file written before it named `interior`: "none" where a step of a later segment ran with no
    adapter while others had them (the steps a ShortFT chain skips)."""
    steps = plan["step_adapters"]
    return "none" if any(steps) and any(not a for a in steps[1:]) else "segment"


def enable_timestep_aware(pipe, lora_dir: str | Path) -> TimestepAwareLora:
    """Load a ShortFT LoRA set into `pipe`'s UNet and switch adapters per timestep during sampling.

        with enable_timestep_aware(pipe, "runs/toy/lora"):
            images = pipe(prompt, num_inference_steps=50).images
    """
    return TimestepAwareLora(pipe, lora_dir)
