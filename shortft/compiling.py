"""`model.compile`: torch.compile of the UNets with room for every graph the chain needs, and the
backends that give the right gradients on this device."""

from __future__ import annotations

import inspect

import torch

from shortft.config import ConfigError, ModelConfig
from shortft.plan import TrainingPlan


def compile_graphs(plan: TrainingPlan) -> int:
    """How many graphs of the UNet a run may compile: torch.compile guards on Python state and compiles
    again for each new one, and the chain changes three kinds of it from call to call.

    - the active LoRAs: `segment_1..j` in segment j of timestep-aware ShortFT, else the one LoRA; none
      (the base model's own jump, the untuned half of `shortft sample`); the LoRA shortcut's;
    - grad mode and the input's `requires_grad`: without grad (sampling, the forward of a checkpointed
      call, gradient-free calls), with grad on an input that needs it, and on one that does not (the
      first call, on the noise);
    - the batch: a new batch size (guided and unguided calls, training and evaluation) compiles once
      more before dynamo makes that dimension dynamic.
    """
    return (len(plan.adapters) + 2) * 3 * 2


def check_compile(model: ModelConfig, device: torch.device | None) -> None:
    """With `model.compile`, a ConfigError for a torch.compile backend torch does not have, and for
    inductor on a CPU: there torch 2.13's inductor computes the UNet's gradients wrong (a relative error
    of 0.48 in the input gradient of a diffusers UNet of two levels, with or without LoRAs; the forward
    is right, and aot_eager, which runs the same graphs without inductor's code, is exact): a fused
    kernel reads the upsampling gradient before the scatter-add that makes it, a mutation rename the CPU
    backend's loop fusion drops (a path CUDA does not take). Both in `tests/test_compile.py`.
    `device` None: the backend alone (`shortft.checks`, where the device is not yet known)."""
    if not model.compile:
        return
    from torch._dynamo import list_backends

    known = sorted({"inductor", *list_backends(exclude_tags=())})
    backend = model.compile_backend
    if backend not in known:
        raise ConfigError(f"model.compile_backend={backend!r}: not a torch.compile backend; one of {', '.join(known)}")
    if backend == "inductor" and device is not None and device.type == "cpu":
        raise ConfigError("model.compile=true on a CPU: torch's inductor computes wrong UNet gradients there "
                          "(docs/models.md); use model.compile=false, a GPU, or model.compile_backend=aot_eager "
                          "(exact, not faster)")


def compile_unet(unet: torch.nn.Module, limit: int, backend: str = "inductor") -> None:
    """torch.compile of `unet` (the training UNet or a `unet:` shortcut), in place (the module keeps its
    class, config and LoRA layers), with room for `limit` graphs (`compile_graphs`): past torch's default
    of 8 per function, dynamo runs the rest eagerly and says so only in a log line. A timestep-aware
    ShortFT step with per-call checkpointing needs more than 8 on its own (`tests/test_compile.py`)."""
    options = inspect.signature(torch.compile).parameters
    # torch 2.13+: a limit of this compile alone, whose graphs other compiled modules do not share
    kwargs = {k: v for k, v in (("recompile_limit", limit), ("isolate_recompiles", True)) if k in options}
    if "recompile_limit" not in kwargs:  # one limit for the process: every compiled module's graphs
        from torch._dynamo import config  # count against it (they are all graphs of Module._call_impl)

        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, getattr(config, name) + limit)
    unet.compile(backend=backend, **kwargs)
