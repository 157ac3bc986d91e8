"""The global gradient norm under expert parallelism, and clipping by it (ZeRO-0, fp32)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_expert_param(p: torch.Tensor) -> bool:
    """DeepSpeed's expert marker (deepspeed.moe.utils.is_moe_param): not all-reduced over all ranks."""
    return getattr(p, "allreduce", True) is False


@torch.no_grad()
def global_grad_norm(parameters, ep_group=None) -> torch.Tensor:
    """L2 norm of dense and expert gradients together, after the data-parallel reduction.

    Dense gradients are identical on every rank; each expert lives on one rank of each
    expert-parallel group, so the experts' squared norms are summed over `ep_group`.
    Returns a CPU fp32 scalar (the same on every rank). Collective over ep_group.
    """
    params = [p for p in parameters if p.grad is not None]
    device = params[0].grad.device if params else torch.device("cpu")
    # One fused pass per tensor list (torch's foreach norm): no gradient-sized temporaries, which on a
    # CPU are fresh pages of stacked expert tensors (tens of MB each) faulted in on every step.
    dense_sq = _sum_sq([p.grad for p in params if not is_expert_param(p)], device)
    expert_sq = _sum_sq([p.grad for p in params if is_expert_param(p)], device)
    if ep_group is not None and dist.get_world_size(ep_group) > 1:
        dist.all_reduce(expert_sq, group=ep_group)
    return (dense_sq + expert_sq).sqrt().cpu()  # NOTE: one host sync


def _sum_sq(grads: list[torch.Tensor], device) -> torch.Tensor:
    """Sum of squares of every element of `grads`, in fp32, on the device (no sync)."""
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    norms = torch._foreach_norm([g.detach().float() for g in grads])  # .float(): no copy of fp32 gradients
    return torch.stack(norms).pow(2).sum()


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, ep_group=None) -> torch.Tensor:
    """Clip by global_grad_norm with DeepSpeed's formula coef = min(1, max_norm / (norm + 1e-6));
    returns the norm before clipping. Gradients are left untouched when the coefficient is 1."""
    params = [p for p in parameters if p.grad is not None]
    total = global_grad_norm(params, ep_group)
    coef = min(1.0, max_norm / (total.item() + 1e-6))
    if coef < 1.0:
        torch._foreach_mul_([p.grad for p in params], coef)
    return total
