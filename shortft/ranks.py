"""Averaging over the ranks of a run under torch.distributed (Ray Train's workers): the LoRA gradients and
the step's metrics. With one rank, nothing is sent."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_mean(values: list[float], device: torch.device, world_size: int) -> list[float]:
    """The mean of each value over ranks, in one all-reduce (float64: sums of metrics stay exact)."""
    if world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world_size).tolist()


def all_reduce_grads(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Average LoRA gradients over ranks in one flat bucket. The chain calls the UNet many times per
    step (and recomputes under checkpointing), which DDP's per-forward hooks do not expect; the
    gradient of the sum is the same, so one explicit all-reduce after backward does the job.

    A parameter no rank's backward reached keeps no gradient (None), as it would with one rank: a zero
    gradient is not the same to the optimizer (AdamW decays the weight and steps on its moments)."""
    if world_size == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    reached = torch.tensor([float(p.grad is not None) for p in params], dtype=grads[0].dtype, device=grads[0].device)
    flat = torch.cat([g.reshape(-1) for g in grads] + [reached])  # the counts ride along: still one all-reduce
    dist.all_reduce(flat)
    reached = flat[-len(params):].tolist()
    flat /= world_size
    offset = 0
    for p, ranks in zip(params, reached):
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone() if ranks else None
        offset += n


def same_on_all(value: int, device: torch.device, world_size: int) -> bool:
    """Whether every rank holds `value` (one all-reduce of its largest and smallest)."""
    if world_size == 1:
        return True
    t = torch.tensor([value, -value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t[0] == -t[1])
