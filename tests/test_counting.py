"""A step counted on meta tensors keeps, computes and launches what the GPU's attention kernels would:
checked against PyTorch's own CPU flash kernel, which keeps what the GPU's do."""

import pytest
import torch

from shortft.architectures import random_pipeline
from shortft.counting import FLOP_FORMULAS, OpCount, gpu_attention, kernel_for
from shortft.preflight import SavedBytes


def _unet_step(tiny_dir, device: str, route: bool = True, formulas: bool = True, dtype=torch.bfloat16):
    """FLOPs, bytes saved for backward and aten ops of one tiny UNet call and its backward."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    unet = random_pipeline(tiny_dir, torch.device(device), dtype).unet.requires_grad_(False)
    side, width = unet.config.sample_size, unet.config.cross_attention_dim
    x = torch.randn(2, 4, side, side, device=device, dtype=dtype, requires_grad=True)
    states = torch.randn(2, 7, width, device=device, dtype=dtype)
    saved = SavedBytes(unet.parameters())
    with (gpu_attention() if route else torch.enable_grad()), OpCount() as ops, \
            FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS if formulas else None) as flops:
        with saved.hooks():
            out = unet(x, 500, encoder_hidden_states=states).sample
        out.float().square().sum().backward()
    return flops.get_total_flops(), saved.total, ops.ops


# bf16: the GPU's layer norm (and meta's) keeps its statistics in fp32, the CPU's in bf16 (0.9% of the
# bytes here); fp32: only the GPU kernels' RNG seeds differ.
@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 0.015), (torch.float32, 0.001)])
def test_meta_counts_keep_flops_and_saved_bytes_of_the_fused_kernels(tiny_dir, dtype, tolerance):
    cpu_flops, cpu_saved, cpu_ops = _unet_step(tiny_dir, "cpu", dtype=dtype)
    meta_flops, meta_saved, meta_ops = _unet_step(tiny_dir, "meta", dtype=dtype)
    assert meta_flops == cpu_flops
    assert abs(meta_saved - cpu_saved) <= tolerance * cpu_saved, (meta_saved, cpu_saved)
    assert abs(meta_ops - cpu_ops) <= 0.02 * cpu_ops, (meta_ops, cpu_ops)
    # What the count was before: SDPA's math path on meta keeps the attention matrix, in more ops;
    # on a CPU, FlopCounterMode has no formula for the flash kernel and counts its FLOPs as 0.
    _, math_saved, math_ops = _unet_step(tiny_dir, "meta", route=False, dtype=dtype)
    assert math_saved > 1.05 * cpu_saved and math_ops > 1.1 * cpu_ops, (math_saved, math_ops)
    assert _unet_step(tiny_dir, "cpu", formulas=False, dtype=dtype)[0] < cpu_flops


def test_the_kernel_a_gpu_picks():
    q = torch.zeros(1, 8, 16, 40, dtype=torch.bfloat16, device="meta")
    assert kernel_for(q, q, q, None) == "flash"
    assert kernel_for(q, q, q, torch.zeros(1, 1, 16, 16, device="meta")) == "efficient"  # a mask
    assert kernel_for(q.float(), q.float(), q.float(), None) == "efficient"  # fp32
    wide = torch.zeros(1, 2, 16, 320, dtype=torch.bfloat16, device="meta")
    assert kernel_for(wide, wide, wide, None) == "efficient"  # head dim over 256


def test_calls_that_checkpointing_recomputes_in_backward_run_the_gpu_kernel_too():
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.checkpoint import checkpoint

    class Names(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    q = torch.zeros(2, 8, 64, 40, device="meta", dtype=torch.bfloat16, requires_grad=True)
    scale = torch.ones((), device="meta", requires_grad=True)
    for reentrant in (True, False):  # the chain's per-call checkpointing, and diffusers' per block
        seen = []
        with gpu_attention(), Names():
            out = checkpoint(lambda s, x: F.scaled_dot_product_attention(x * s, x, x), scale, q, use_reentrant=reentrant)
            out.float().sum().backward()
        assert seen.count("_scaled_dot_product_flash_attention") == 2 and "_safe_softmax" not in seen, seen


def test_meta_autocast_casts_as_cuda_autocast_does():
    """The oracle: CUDA autocast itself, on fake CUDA tensors (no GPU needed for a forward's dtypes;
    calls whose fake CUDA kernel needs a CUDA build are skipped)."""
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode

    from shortft.counting import gpu_autocast

    calls = {
        "linear": lambda x, xb, w: F.linear(x, w), "linear bf16 x": lambda x, xb, w: F.linear(xb, w),
        "matmul": lambda x, xb, w: x @ w, "bmm": lambda x, xb, w: torch.bmm(x, x.transpose(1, 2)),
        "einsum": lambda x, xb, w: torch.einsum("bij,jk->bik", x, w), "mm": lambda x, xb, w: torch.mm(w, w),
        "addmm": lambda x, xb, w: torch.addmm(w, w, w), "group_norm": lambda x, xb, w: F.group_norm(xb, 2),
        "layer_norm": lambda x, xb, w: F.layer_norm(xb, (8,)), "softmax": lambda x, xb, w: xb.softmax(-1),
        "F.softmax": lambda x, xb, w: F.softmax(xb, -1), "log_softmax": lambda x, xb, w: xb.log_softmax(-1),
        "silu": lambda x, xb, w: F.silu(xb), "gelu": lambda x, xb, w: F.gelu(xb), "mean": lambda x, xb, w: xb.mean(),
        "sum": lambda x, xb, w: xb.sum(), "pow": lambda x, xb, w: xb.pow(2), "**": lambda x, xb, w: xb ** 2,
        "norm": lambda x, xb, w: xb.norm(dim=-1), "normalize": lambda x, xb, w: F.normalize(xb, dim=-1),
        "exp": lambda x, xb, w: xb.exp(), "rsqrt": lambda x, xb, w: xb.rsqrt(), "mse": lambda x, xb, w: F.mse_loss(xb, xb),
        "cosine_similarity": lambda x, xb, w: F.cosine_similarity(xb, xb, dim=-1),
        "logsumexp": lambda x, xb, w: xb.logsumexp(-1), "cumsum": lambda x, xb, w: xb.cumsum(-1),
        "sigmoid": lambda x, xb, w: xb.sigmoid(), "mul": lambda x, xb, w: xb * x, "cat": lambda x, xb, w: torch.cat([xb, x]),
    }

    def inputs(device):
        return torch.ones(2, 4, 8, device=device), torch.ones(2, 4, 8, device=device, dtype=torch.bfloat16), \
            torch.ones(8, 8, device=device)

    cuda = {}
    with FakeTensorMode(allow_non_fake_inputs=True):
        torch.set_autocast_enabled("cuda", True)  # torch.autocast("cuda") turns itself off without a GPU
        torch.set_autocast_dtype("cuda", torch.bfloat16)
        try:
            for name, call in calls.items():
                try:
                    cuda[name] = call(*inputs("cuda")).dtype
                except RuntimeError:
                    pass
        finally:
            torch.set_autocast_enabled("cuda", False)
    assert len(cuda) >= 25, sorted(set(calls) - set(cuda))
    with gpu_autocast(torch.bfloat16):
        meta = {name: calls[name](*inputs("meta")).dtype for name in cuda}
    assert meta == cuda
    assert calls["group_norm"](*inputs("meta")).dtype == torch.bfloat16  # outside: no casts
