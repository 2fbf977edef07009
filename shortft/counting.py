"""Counting a step on a CPU as a GPU would run it: attention kernels, autocast, FLOP formulas, aten ops.

`shortft bench --count-only` runs SD 1.5 and SDXL steps on meta tensors (no memory). There,
`scaled_dot_product_attention` runs its math path (fp32 copies of q, k, v, the [L, S] attention matrix
kept for backward, some 20 aten ops a call) where a recent NVIDIA GPU runs FlashAttention (bf16/fp16,
no mask) or the memory-efficient kernel, which keep q, k, v, the output and a log-sum-exp; and there
is no autocast, so bf16 is kept where the GPU keeps fp32 (after every norm) and the other way round.
Counted so, one ShortFT step of SD 1.5 at 512² was estimated at 136 GB where the H200 measured 48.8 GB.

- `gpu_attention()`: SDPA on meta tensors calls the GPU kernels' own ops (they have meta kernels);
- `gpu_autocast(dtype)`: functions on meta tensors cast their inputs as CUDA autocast would;
- `FLOP_FORMULAS`: FlopCounterMode's missing formula for PyTorch's CPU flash kernel (counted as 0);
- `OpCount`: the aten ops that reach a kernel, the host's share of a GPU step.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten
FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256


def _shape(t) -> tuple[int, ...]:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else t


def _forward_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(_shape(query), _shape(key), _shape(value))


def _backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(_shape(grad_out), _shape(query), _shape(key), _shape(value))


# FlopCounterMode(custom_mapping=FLOP_FORMULAS): the CPU flash kernel counted as the GPU's are.
FLOP_FORMULAS = {aten._scaled_dot_product_flash_attention_for_cpu: _forward_flops,
                 aten._scaled_dot_product_flash_attention_for_cpu_backward: _backward_flops}


def kernel_for(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None) -> str:
    """The kernel SDPA runs these inputs with on a recent NVIDIA GPU: "flash" or "efficient"."""
    head = query.size(-1)
    if (attn_mask is None and query.dtype in FLASH_DTYPES and head <= FLASH_MAX_HEAD_DIM and head % 8 == 0
            and key.size(-1) == head and value.size(-1) == head):
        return "flash"
    return "efficient"


def _as_on_gpu(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if enable_gqa and key.size(-3) != query.size(-3):  # grouped KV heads: broadcast as the kernels would
        repeat = query.size(-3) // key.size(-3)
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    if kernel_for(query, key, value, attn_mask) == "flash":
        return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False, scale=scale)[0]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:  # SDPA's own conversion: False -> -inf
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~attn_mask, float("-inf"))
        attn_mask = attn_mask.to(query.dtype).expand(*query.shape[:-1], key.size(-2))
    needs_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask, needs_lse, dropout_p,
                                                         is_causal, scale=scale)[0]


@contextlib.contextmanager
def gpu_attention():
    """Inside, SDPA on meta tensors runs the GPU kernels' ops (FLOPs, saved tensors and op counts as on a
    GPU); on any other device it is left alone. `torch.nn.functional.scaled_dot_product_attention` itself
    is replaced while inside (diffusers and transformers look it up there at each call): a
    TorchFunctionMode would not reach the calls that checkpointing recomputes in backward."""
    original = F.scaled_dot_product_attention

    @functools.wraps(original)
    def attention(query, *args, **kwargs):
        if query.device.type == "meta":
            return _as_on_gpu(query, *args, **kwargs)
        return original(query, *args, **kwargs)

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


# CUDA autocast's policy (torch.amp docs, "CUDA Ops that can autocast"), for the functions the
# diffusion models and reward models here call: these run in the autocast dtype ...
LOWER_PRECISION = ("torch.nn.functional.linear", "torch.nn.functional.conv1d", "torch.nn.functional.conv2d",
                   "torch.nn.functional.conv3d", "torch.nn.functional.conv_transpose1d",
                   "torch.nn.functional.conv_transpose2d", "torch.nn.functional.conv_transpose3d",
                   "torch.matmul", "torch.mm", "torch.bmm", "torch.baddbmm", "torch.addmm", "torch.einsum",
                   "torch.Tensor.matmul", "torch.Tensor.__matmul__", "torch.Tensor.mm", "torch.Tensor.bmm",
                   "torch.nn.functional.scaled_dot_product_attention")
# ... and these in fp32.
FLOAT32 = ("torch.nn.functional.group_norm", "torch.nn.functional.layer_norm", "torch.nn.functional.softmax",
           "torch.nn.functional.log_softmax", "torch.softmax", "torch.log_softmax", "torch.Tensor.softmax",
           "torch.Tensor.log_softmax", "torch.nn.functional.normalize", "torch.nn.functional.cosine_similarity",
           "torch.cosine_similarity", "torch.nn.functional.mse_loss", "torch.nn.functional.l1_loss",
           "torch.nn.functional.softplus", "torch.exp", "torch.Tensor.exp", "torch.log", "torch.Tensor.log",
           "torch.pow", "torch.Tensor.pow", "torch.Tensor.__pow__", "torch.Tensor.__rpow__", "torch.sum",
           "torch.Tensor.sum", "torch.norm", "torch.rsqrt", "torch.Tensor.rsqrt", "torch.cumsum",
           "torch.Tensor.cumsum", "torch.logsumexp", "torch.Tensor.logsumexp", "torch.reciprocal",
           "torch.Tensor.reciprocal", "torch.Tensor.__rtruediv__")


def _owner(path: str):
    import importlib

    module, _, name = path.rpartition(".")
    if module == "torch.Tensor":
        return torch.Tensor, name
    return importlib.import_module(module), name


@contextlib.contextmanager
def gpu_autocast(dtype: torch.dtype | None):
    """Inside, functions called on meta tensors cast their inputs as CUDA autocast to `dtype` would (None:
    no autocast, nothing changes). `torch.autocast` has no meta device, and a meta count without it
    keeps bf16 where the GPU keeps fp32 (after every GroupNorm and LayerNorm) and fp32 LoRA inputs where
    it keeps bf16. As autocast does, a cast of a leaf tensor that requires grad (a LoRA factor) is made
    once and reused; every other cast is made at each call, and autograd saves what it saves on a GPU."""
    if dtype is None:
        yield
        return
    cache: dict[tuple[int, bool], torch.Tensor] = {}

    def cast(value, to: torch.dtype, cast_from: tuple[torch.dtype, ...]):
        if not (isinstance(value, torch.Tensor) and value.dtype in cast_from):
            return value
        if value.is_leaf and value.requires_grad:  # a cast made under no_grad has no history: kept apart
            key = (id(value), torch.is_grad_enabled())
            if key not in cache:
                cache[key] = value.to(to)
            return cache[key]
        return value.to(to)

    def wrap(original, to, cast_from):
        @functools.wraps(original)
        def run(*args, **kwargs):
            if any(isinstance(a, torch.Tensor) and a.device.type == "meta" for a in (*args, *kwargs.values())):
                args = [cast(a, to, cast_from) for a in args]
                kwargs = {k: cast(v, to, cast_from) for k, v in kwargs.items()}
            return original(*args, **kwargs)

        return run

    patched = []
    for paths, to, cast_from in ((LOWER_PRECISION, dtype, (torch.float32,)),
                                 (FLOAT32, torch.float32, (torch.float16, torch.bfloat16))):
        for path in paths:
            owner, name = _owner(path)
            original = getattr(owner, name)
            patched.append((owner, name, original))
            setattr(owner, name, wrap(original, to, cast_from))
    try:
        yield
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)
        cache.clear()


NO_KERNEL = (aten.detach, aten._unsafe_view, aten.alias)  # metadata only, like the views


class OpCount(TorchDispatchMode):
    """Aten ops that reach a kernel (views and `NO_KERNEL` excluded): on a GPU each is about one kernel
    launch, the host's share of a step that eager PyTorch pays per op whatever the op's size."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket not in NO_KERNEL:
            self.ops += 1
        return func(*args, **(kwargs or {}))
