"""Expert parallelism: the all-to-all dispatch and the wrapper that shards MoELayer's experts.

Rank r of an expert-parallel group of P ranks owns the contiguous experts
[r*L, (r+1)*L), L = E / P. Per MoE layer, on every rank:

  start(x)  route + capacity on THIS rank's tokens -> permute (rows sorted by global expert,
            hence by destination rank) -> all_to_all the per-expert counts (tiny, blocking)
            -> launch the all_to_all of the token rows (uneven splits; async)
  ...       the block runs attention and the dense MLP meanwhile
  finish()  wait -> regroup the received rows by local expert -> experts -> undo the regroup
            -> all_to_all the results back -> un-permute, weight, sum the k contributions

Capacity: computed from each rank's LOCAL token count (as DeepSpeed's top-k gating does),
so C = ceil(capacity_factor * k * T_local / E) slots per expert per source rank. The rows
of one micro-batch are routed and dropped exactly as MoELayer routes and drops them on one
process, whatever P is; only where the surviving rows are computed changes. With
capacity_factor=None (dropless) every assignment survives anywhere.

Async or not, the arithmetic is the same: async_dispatch only decides whether the row
all-to-all is waited for in start() or in finish() (on GPU the wait in finish() lets NCCL
move the rows while attention runs; gloo on CPU gains little).

Shape legend: T tokens on this rank, D hidden, E experts (global), L local experts,
P expert-parallel ranks, A kept assignments sent by this rank, R rows received by this rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from moe.layer import MoELayer, MoEStats, Permutation
from moe.parallel.groups import ParallelGroups


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
    """What start() hands to finish()."""

    x_recv_RD: torch.Tensor  # rows from every source rank, source-major, then by local expert
    pending: list  # [(Work, send buffer)] while the async all-to-all is in flight
    counts_recv_PL: torch.Tensor  # [P, L] rows each source rank sent for each local expert
    input_splits: list[int]  # rows this rank sent to each rank
    output_splits: list[int]  # rows this rank received from each rank
    perm: Permutation
    stats: MoEStats
    num_tokens: int


class ExpertParallelMoE(MoELayer):
    """MoELayer holding only this rank's experts; the all-to-all moves tokens to their owners.

    Reuses MoELayer's route / permute / experts / unpermute unchanged: route and permute see
    the global E (config.num_experts); experts() runs whatever w1/w3/w2 hold, here [L, ...].
    """

    def __init__(self, moe: MoELayer, groups: ParallelGroups, async_dispatch: bool = True):
        nn.Module.__init__(self)  # not MoELayer.__init__: that would allocate all E experts again
        cfg = moe.config
        self.config = cfg
        self.ep_group = groups.ep_group
        self.edp_group = groups.edp_group
        self.ep_size = groups.ep_size
        self.ep_rank = groups.ep_rank
        self.num_local_experts = cfg.num_experts // groups.ep_size
        self.first_expert = groups.ep_rank * self.num_local_experts  # global id of local expert 0
        self.async_dispatch = async_dispatch
        self.gate = moe.gate  # the router stays replicated and data-parallel
        self.group_name = groups.group_name
        lo, hi = self.first_expert, self.first_expert + self.num_local_experts
        for name in ("w1", "w3", "w2"):
            full = getattr(moe, name)
            setattr(self, name, nn.Parameter(full.detach()[lo:hi].clone(), requires_grad=full.requires_grad))
        self.mark_expert_params()

    def mark_expert_params(self) -> None:
        """DeepSpeed's MoE markers (deepspeed.moe.utils.is_moe_param): these shards are not
        all-reduced over the data-parallel group but over the expert-data-parallel group of
        this name. They live on the Parameter objects, so whatever replaces the parameters
        (Module.to_empty after building on the meta device does) must mark them again:
        apply_deepspeed_moe does, right before deepspeed.initialize."""
        for name in ("w1", "w3", "w2"):
            param = getattr(self, name)
            param.allreduce = False
            param.group_name = self.group_name

    def extra_repr(self) -> str:
        return (f"experts {self.first_expert}..{self.first_expert + self.num_local_experts - 1} "
                f"of {self.config.num_experts}, ep_rank {self.ep_rank}/{self.ep_size}")

    def start(self, x_TD: torch.Tensor) -> _InFlight:
        """Route this rank's tokens and launch their rows towards the experts' owners."""
        plan, stats = self.route(x_TD)
        x_AD, perm = self.permute(x_TD, plan)  # sorted by global expert = by destination rank
        p, l = self.ep_size, self.num_local_experts
        counts_send_PL = perm.tokens_per_expert_E.view(p, l)
        counts_recv_PL = torch.empty_like(counts_send_PL)
        dist.all_to_all_single(counts_recv_PL, counts_send_PL, group=self.ep_group)
        # NOTE: device-to-host sync: all_to_all_single takes its split sizes as Python ints.
        splits = torch.cat([counts_send_PL.sum(1), counts_recv_PL.sum(1)]).tolist()
        input_splits, output_splits = splits[:p], splits[p:]
        pending = [] if self.async_dispatch else None
        x_recv_RD = all_to_all(x_AD, output_splits, input_splits, self.ep_group, pending)
        return _InFlight(x_recv_RD, pending or [], counts_recv_PL, input_splits, output_splits,
                         perm, stats, x_TD.shape[0])

    def finish(self, inflight: _InFlight) -> tuple[torch.Tensor, MoEStats]:
        """Wait for the rows, run the local experts, send the results home, combine."""
        for work, _ in inflight.pending:
            work.wait()
        inflight.pending.clear()
        counts_PL = inflight.counts_recv_PL
        num_rows = sum(inflight.output_splits)
        # Received rows are source-major ([P][L] blocks); the experts want them expert-major.
        # A stable sort by local expert keeps, inside each expert, source rank order then
        # token order: the same row order as MoELayer on the concatenated ranks' tokens.
        local_expert_R = torch.arange(self.num_local_experts, device=counts_PL.device).repeat(self.ep_size)
        local_expert_R = local_expert_R.repeat_interleave(counts_PL.reshape(-1), output_size=num_rows)
        order_R = torch.argsort(local_expert_R, stable=True)
        y_local_RD = self.experts(inflight.x_recv_RD[order_R], counts_PL.sum(0))
        y_recv_RD = torch.empty_like(y_local_RD).index_copy(0, order_R, y_local_RD)  # undo the regroup
        y_AD = all_to_all(y_recv_RD, inflight.input_splits, inflight.output_splits, self.ep_group)
        return self.unpermute(y_AD, inflight.perm, inflight.num_tokens), inflight.stats


def apply_expert_parallel(model: nn.Module, groups: ParallelGroups, async_dispatch: bool = True) -> nn.Module:
    """Replace every MoELayer in `model` (in place) by an ExpertParallelMoE holding this rank's
    shard of its experts. Every rank must start from the same weights (same seed), or the
    engine's initial broadcast decides them (dense from rank 0, experts per expert-data group)."""
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, MoELayer) and not isinstance(m, ExpertParallelMoE)]
    for name, moe in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ExpertParallelMoE(moe, groups, async_dispatch))
    return model


def expert_parallel_layers(model: nn.Module) -> list[tuple[str, ExpertParallelMoE]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ExpertParallelMoE)]


def expert_shards(model: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    """{state-dict name: (global id of its first expert, local shard)} of this rank's experts."""
    out = {}
    for name, layer in expert_parallel_layers(model):
        for w in ("w1", "w3", "w2"):
            out[f"{name}.{w}" if name else w] = (layer.first_expert, getattr(layer, w).detach())
    return out


@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every expert tensor gathered to all E experts, by global id:
    the same names and shapes as the single-process model. Collective over each ep group."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, layer in expert_parallel_layers(model):
        for w in ("w1", "w3", "w2"):
            key = f"{name}.{w}" if name else w
            shard = getattr(layer, w).detach().contiguous()
            parts = [torch.empty_like(shard) for _ in range(layer.ep_size)]
            dist.all_gather(parts, shard, group=layer.ep_group)
            state[key] = torch.cat(parts, 0)  # ep rank r holds experts [r*L, (r+1)*L)
    return state


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True):
    """Load a single-process (all-E-experts) state dict into an expert-parallel model: each
    rank copies its own experts' rows. No communication."""
    local = dict(state)
    for name, layer in expert_parallel_layers(model):
        lo, hi = layer.first_expert, layer.first_expert + layer.num_local_experts
        for w in ("w1", "w3", "w2"):
            key = f"{name}.{w}" if name else w
            if key in local:
                local[key] = local[key][lo:hi]
    return model.load_state_dict(local, strict=strict)
