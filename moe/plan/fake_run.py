"""Run floe's real model code on fake tensors and measure its activation memory.

FakeTensorMode gives every tensor a shape, dtype and storage size but no data, so a
4096-token Arctic block "runs" on a laptop in seconds. MoE routing, though, is data-
dependent: capacity dropping (bincount, boolean masks), the reference kernel's group
bounds and the expert-parallel split sizes (`.tolist()`) all need VALUES. `RoutingOracle`
supplies them, sitting between the code and FakeTensorMode:

  - every op whose tensor inputs all have known values (integer/bool routing bookkeeping,
    position ids, masks) is also run on real tensors, and the result is kept as the fake
    output's "shadow"; data-dependent ops (bincount, nonzero, boolean indexing, .item(),
    .tolist()) then take their shapes and values from the shadows;
  - the router's top-k choice is the one thing decided by float data the fake run does
    not have: the oracle plans it (`planned_expert_ids`): "balanced" (every expert gets
    tokens * k / E assignments, the expected load) or "worst" (this rank's experts full to
    capacity from every source rank, the most rows an expert-parallel rank can receive);
    sorting a fake float tensor keeps the order of positions;
  - the expert-parallel all-to-all of the per-expert counts runs on torch's fake process
    group (no data moves), so the oracle fills in what would arrive: every rank routes
    the same planned way, so rank j sends me what I send to my own experts.

Everything else (attention, norms, dense MLP, expert kernels, all-to-all of the rows,
loss, autograd) is floe's own code, unmodified; `PeakMemoryTracker` counts the fake
storages it creates.
"""
from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map
from torch.utils.weak import WeakTensorKeyDictionary

aten = torch.ops.aten
ROUTING_PLANS = ("balanced", "worst")
_SORTS = {aten.sort.default, aten.sort.stable, aten.argsort.default, aten.argsort.stable}
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def planned_expert_ids(num_tokens: int, num_experts: int, top_k: int, first_expert: int, num_local: int,
                       plan: str) -> torch.Tensor:
    """[T, k] distinct expert ids per token. "balanced": assignment a = t*k + j goes to expert
    a % E (T*k/E each). "worst": choices j < min(k, L) go to this rank's L experts
    [first, first + L) round robin (filling them past capacity when the tokens suffice),
    the rest round robin over the other experts."""
    if plan not in ROUTING_PLANS:
        raise ValueError(f"routing plan must be one of {ROUTING_PLANS}, got {plan!r}")
    t = torch.arange(num_tokens)[:, None]
    j = torch.arange(top_k)[None, :]
    if plan == "balanced":
        return (t * top_k + j) % num_experts
    local = first_expert + (t + j) % num_local
    others = torch.tensor([e for e in range(num_experts) if not first_expert <= e < first_expert + num_local],
                          dtype=torch.long)
    if len(others) == 0:
        return local
    remote = others[(t * top_k + j) % len(others)]
    return torch.where(j < min(top_k, num_local), local, remote)


class RoutingOracle(TorchDispatchMode):
    """Shadows known values under FakeTensorMode and plans the router (see module doc).

    Enter it INSIDE the FakeTensorMode (`with fake_mode, RoutingOracle(fake_mode, ...)`).
    ep_size / ep_rank / first_expert / num_local describe the rank whose run this is.
    """

    def __init__(self, fake_mode: FakeTensorMode, plan: str, ep_size: int = 1, ep_rank: int = 0,
                 first_expert: int = 0, num_local: int | None = None):
        super().__init__()
        self.fake_mode, self.plan = fake_mode, plan
        self.ep_size, self.ep_rank = ep_size, ep_rank
        self.first_expert, self.num_local = first_expert, num_local
        self.shadow = WeakTensorKeyDictionary()  # fake tensor -> real tensor holding its value
        self.rows_planned: list[tuple[int, int]] = []  # (tokens, experts) of each planned top-k

    def known(self, x) -> bool:
        return not isinstance(x, torch.Tensor) or x in self.shadow

    def value(self, x):
        if isinstance(x, torch.Tensor):
            return self.shadow[x]
        return x

    def _fake_of(self, real: torch.Tensor) -> torch.Tensor:
        return self.fake_mode.from_tensor(real)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            if args[0] not in self.shadow:
                raise RuntimeError("fake run: a value the fake run cannot know was read on the host (.item()/"
                                   ".tolist() of a tensor computed from float activations)")
            with _disable_current_modes():
                return self.shadow[args[0]].item()
        if func is aten.topk.default and args[0] not in self.shadow:
            return self._planned_topk(func, args, kwargs)
        if func in _SORTS and args[0] not in self.shadow:
            return self._position_order(func, args, kwargs)
        if func is torch.ops.c10d.alltoall_base_.default and self.known(args[1]):
            return self._symmetric_all_to_all(func, args, kwargs)
        flat, _ = tree_flatten((args, kwargs))
        real_out = None
        if all(self.known(x) for x in flat):
            with _disable_current_modes():
                real_out = func(*tree_map(self.value, args), **tree_map(self.value, kwargs))
        try:
            out = func(*args, **kwargs)
        except (DynamicOutputShapeException, DataDependentOutputException):
            if real_out is not None:
                out = tree_map(lambda r: self._fake_of(r) if isinstance(r, torch.Tensor) else r, real_out)
            elif func in _INDEX_OPS:
                out = func(args[0], self._long_indices(args[1]), *args[2:], **kwargs)
            else:
                raise
        if real_out is not None:
            for o, r in zip(tree_leaves(out), tree_leaves(real_out)):
                if isinstance(o, torch.Tensor) and isinstance(r, torch.Tensor):
                    self.shadow[o] = r
        return out

    def _long_indices(self, indices):
        """Boolean masks (with known values) -> the long index tensors they select."""
        out = []
        for idx in indices:
            if isinstance(idx, torch.Tensor) and idx.dtype == torch.bool and idx in self.shadow:
                with _disable_current_modes():
                    cols = self.shadow[idx].nonzero().unbind(1)
                for c in cols:
                    fake = self._fake_of(c)
                    self.shadow[fake] = c
                    out.append(fake)
            else:
                out.append(idx)
        return out

    def _planned_topk(self, func, args, kwargs):
        values, indices = func(*args, **kwargs)
        num_tokens, num_experts = args[0].shape
        num_local = self.num_local or num_experts
        with _disable_current_modes():
            self.shadow[indices] = planned_expert_ids(num_tokens, num_experts, indices.shape[1],
                                                      self.first_expert, num_local, self.plan)
        self.rows_planned.append((num_tokens, num_experts))
        return values, indices

    def _position_order(self, func, args, kwargs):
        out = func(*args, **kwargs)
        indices = out[1] if isinstance(out, tuple) else out
        dim = kwargs.get("dim", args[1] if len(args) > 1 and isinstance(args[1], int) else -1)
        shape = indices.shape
        with _disable_current_modes():
            order = torch.arange(shape[dim]).view([-1 if d == dim % len(shape) else 1 for d in range(len(shape))])
            self.shadow[indices] = order.expand(shape).contiguous()
        return out

    def _symmetric_all_to_all(self, func, args, kwargs):
        work = func(*args, **kwargs)
        out, inp = args[0], args[1]
        with _disable_current_modes():
            sent = self.shadow[inp].reshape(self.ep_size, -1)  # row q: what I send to ep rank q
            self.shadow[out] = sent[self.ep_rank].expand(self.ep_size, -1).reshape(out.shape).clone()
        return work


class SavedInputsSwiGLU(torch.autograd.Function):
    """The Triton expert kernel's memory behaviour (kernels/floe_kernels/ops.py _GroupedSwiGLU) on any device:
    forward keeps only x and the weights; backward recomputes gate, up and their product.
    The Triton kernels cannot run on fake tensors; this has the same saved tensors and the
    same backward-time [N, F] intermediates, computed by the reference kernels."""

    @staticmethod
    def forward(ctx, x_ND, w1, w3, w2, group_sizes):
        from floe.kernels import reference

        ctx.save_for_backward(x_ND, w1, w3, w2)
        ctx.group_sizes = group_sizes
        with torch.no_grad():
            return reference.grouped_swiglu(x_ND, w1, w3, w2, group_sizes)

    @staticmethod
    def backward(ctx, dy_ND):
        from floe.kernels import reference

        x_ND, w1, w3, w2 = ctx.saved_tensors
        group_sizes = ctx.group_sizes
        inputs = [t.detach().requires_grad_(t.requires_grad or t is x_ND) for t in (x_ND, w1, w3, w2)]
        with torch.enable_grad():
            y_ND = reference.grouped_swiglu(*inputs, group_sizes)
        grads = torch.autograd.grad(y_ND, [t for t in inputs if t.requires_grad], dy_ND)
        it = iter(grads)
        return (*[next(it) if t.requires_grad else None for t in inputs], None)


@contextlib.contextmanager
def expert_kernel_footprint(name: str):
    """Make the experts save what kernel `name` ("reference" or "triton") saves, for a fake run.
    Swaps kernels.grouped_swiglu, the function MoELayer.experts calls, for the duration."""
    from floe import kernels

    if name == "reference":
        yield
        return
    original = kernels.grouped_swiglu

    def saved_inputs_swiglu(x, w1, w3, w2, group_sizes, backend="auto"):
        return SavedInputsSwiGLU.apply(x, w1, w3, w2, group_sizes)

    kernels.grouped_swiglu = saved_inputs_swiglu
    try:
        yield
    finally:
        kernels.grouped_swiglu = original
