"""Expert parallelism: the all-to-all token dispatcher, and `apply_expert_parallel`, which
shards every MoE layer's GroupedExperts and installs that dispatcher (no layer subclass).

Rank r of an expert-parallel group of P ranks owns the contiguous experts
[r*L, (r+1)*L), L = E / P. Per MoE layer, on every rank (MoELayer.start / finish):

  dispatch  (start) route + capacity on THIS rank's tokens -> permute (rows sorted by global
            expert, hence by destination rank) -> all_to_all the per-expert counts (tiny,
            blocking) -> launch the all_to_all of the token rows (uneven splits; async)
  ...       the block runs attention and the dense MLP meanwhile
  receive   (finish) wait -> regroup the received rows by local expert -> experts
  combine   undo the regroup -> all_to_all the results back -> un-permute, weight, sum

Capacity: computed from each rank's LOCAL token count (as DeepSpeed's top-k gating does),
so C = ceil(capacity_factor * k * T_local / E) slots per expert per source rank. The rows
of one micro-batch are routed and dropped exactly as MoELayer routes and drops them on one
process, whatever P is; only where the surviving rows are computed changes. With
capacity_factor=None (dropless) every assignment survives anywhere.

Async or not, the arithmetic is the same: async_dispatch only decides whether the row
all-to-all is waited for in dispatch or in receive (on GPU the wait in receive lets NCCL
move the rows while attention runs; gloo on CPU gains little).

Shape legend: T tokens on this rank, D hidden, E experts (global), L local experts,
P expert-parallel ranks, A kept assignments sent by this rank, R rows received by this rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from floe.layer import MoELayer
from floe.parallel.groups import ParallelGroups


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of rows with uneven splits; its backward sends the gradients back.

    With `pending` (a list) the exchange is launched asynchronously and its Work handle is
    appended to `pending`: the caller must wait on it before reading the output.
    """

    @staticmethod
    def forward(ctx, x_ND, output_splits, input_splits, group, pending):
        ctx.group, ctx.input_splits, ctx.output_splits = group, input_splits, output_splits
        x_ND = x_ND.contiguous()
        out_MD = x_ND.new_empty((sum(output_splits),) + tuple(x_ND.shape[1:]))
        work = dist.all_to_all_single(out_MD, x_ND, output_splits, input_splits, group=group,
                                      async_op=pending is not None)
        if pending is not None:
            pending.append((work, x_ND))  # keep the send buffer alive until the wait
        return out_MD

    @staticmethod
    def backward(ctx, grad_MD):
        grad_MD = grad_MD.contiguous()
        grad_ND = grad_MD.new_empty((sum(ctx.input_splits),) + tuple(grad_MD.shape[1:]))
        dist.all_to_all_single(grad_ND, grad_MD, ctx.input_splits, ctx.output_splits, group=ctx.group)
        return grad_ND, None, None, None, None


def all_to_all(x_ND: torch.Tensor, output_splits: list[int], input_splits: list[int], group,
               pending: list | None = None) -> torch.Tensor:
    """Differentiable all_to_all_single: send input_splits[i] rows to rank i of `group`,
    receive output_splits[i] rows from it. Async when `pending` is given (see _AllToAll)."""
    return _AllToAll.apply(x_ND, output_splits, input_splits, group, pending)


@dataclass
class _InFlight:
    """What dispatch() hands to receive() and combine()."""

    x_recv_RD: torch.Tensor  # rows from every source rank, source-major, then by local expert
    pending: list  # [(Work, send buffer)] while the async all-to-all is in flight
    counts_recv_PL: torch.Tensor  # [P, L] rows each source rank sent for each local expert
    input_splits: list[int]  # rows this rank sent to each rank
    output_splits: list[int]  # rows this rank received from each rank
    order_R: torch.Tensor | None = None  # source-major -> expert-major (set by receive)


class AllToAllDispatcher:
    """Sends each kept row to the rank that owns its expert and brings the results back."""

    def __init__(self, groups: ParallelGroups, num_local_experts: int, async_dispatch: bool = True):
        self.groups = groups
        self.num_local_experts = num_local_experts
        self.async_dispatch = async_dispatch

    def dispatch(self, x_AD: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> _InFlight:
        """Launch this rank's rows (sorted by global expert = by destination rank) to their owners."""
        p, l, group = self.groups.ep_size, self.num_local_experts, self.groups.ep_group
        counts_send_PL = tokens_per_expert_E.view(p, l)
        counts_recv_PL = torch.empty_like(counts_send_PL)
        dist.all_to_all_single(counts_recv_PL, counts_send_PL, group=group)
        # NOTE: device-to-host sync: all_to_all_single takes its split sizes as Python ints.
        splits = torch.cat([counts_send_PL.sum(1), counts_recv_PL.sum(1)]).tolist()
        input_splits, output_splits = splits[:p], splits[p:]
        pending = [] if self.async_dispatch else None
        x_recv_RD = all_to_all(x_AD, output_splits, input_splits, group, pending)
        return _InFlight(x_recv_RD, pending or [], counts_recv_PL, input_splits, output_splits)

    def receive(self, inflight: _InFlight) -> tuple[torch.Tensor, torch.Tensor]:
        """Wait for the rows; regroup them by local expert: (x [R, D], tokens_per_local_expert [L])."""
        for work, _ in inflight.pending:
            work.wait()
        inflight.pending.clear()
        counts_PL = inflight.counts_recv_PL
        num_rows = sum(inflight.output_splits)
        # Received rows are source-major ([P][L] blocks); the experts want them expert-major.
        # A stable sort by local expert keeps, inside each expert, source rank order then
        # token order: the same row order as MoELayer on the concatenated ranks' tokens.
        local_expert_R = torch.arange(self.num_local_experts, device=counts_PL.device).repeat(self.groups.ep_size)
        local_expert_R = local_expert_R.repeat_interleave(counts_PL.reshape(-1), output_size=num_rows)
        inflight.order_R = torch.argsort(local_expert_R, stable=True)
        return inflight.x_recv_RD[inflight.order_R], counts_PL.sum(0)

    def combine(self, y_RD: torch.Tensor, inflight: _InFlight) -> torch.Tensor:
        """Undo the regroup and send every result back to the rank its token came from."""
        y_recv_RD = torch.empty_like(y_RD).index_copy(0, inflight.order_R, y_RD)
        return all_to_all(y_recv_RD, inflight.input_splits, inflight.output_splits, self.groups.ep_group)


def apply_expert_parallel(model: nn.Module, groups: ParallelGroups, async_dispatch: bool = True) -> nn.Module:
    """Shard every MoELayer's experts to this rank's range and give it the all-to-all
    dispatcher (in place). Works on a model built on the meta device. Every rank must then
    initialise with the same seed (keyed init: each rank gets the 1-process rows it holds)."""
    for layer in model.modules():
        if isinstance(layer, MoELayer) and not isinstance(layer.dispatcher, AllToAllDispatcher):
            num_local = layer.config.num_experts // groups.ep_size
            layer.experts.shard_(groups.ep_rank * num_local, num_local)
            layer.dispatcher = AllToAllDispatcher(groups, num_local, async_dispatch)
    return model


def expert_parallel_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    """(name, layer) of every MoELayer whose experts are sharded over an expert-parallel group."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, MoELayer) and isinstance(m.dispatcher, AllToAllDispatcher)]


@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every expert tensor gathered to all E experts, by global id:
    the same names and shapes as the single-process model. Collective over each ep group."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, layer in expert_parallel_layers(model):
        groups = layer.dispatcher.groups
        for w, param in layer.experts.expert_tensors().items():  # the weights and any adapters
            key = f"{name}.experts.{w}" if name else f"experts.{w}"
            shard = param.detach().contiguous()
            parts = [torch.empty_like(shard) for _ in range(groups.ep_size)]
            dist.all_gather(parts, shard, group=groups.ep_group)
            state[key] = torch.cat(parts, 0)  # ep rank r holds experts [r*L, (r+1)*L)
    return state
