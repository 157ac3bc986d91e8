"""Pure-PyTorch reference kernels: the CPU path and the test oracle for the Triton kernels.

Shape legend: N rows (tokens routed to this rank, sorted by group), K input width,
M output width, G groups (local experts).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _group_sizes(group_sizes: torch.Tensor, num_rows: int) -> list[int]:
    """The groups' row counts [G], on the host."""
    # NOTE: device-to-host sync; the per-group loop needs Python ints.
    sizes = group_sizes.tolist()
    if any(s < 0 for s in sizes) or sum(sizes) != num_rows:
        raise ValueError(
            f"grouped_mm: group_sizes must be >= 0 and sum to x.shape[0]={num_rows}, got sum {sum(sizes)}"
        )
    return sizes


class _GroupedMM(torch.autograd.Function):
    """Y_g = X_g @ W_g for contiguous row groups, with a hand-written backward.

    Autograd through `w[g]` inside a loop would build a full-size zero gradient per
    group (O(G^2) memory traffic); here each group writes its own slice of dW once.
    The groups' views come from one split/unbind each, not two slices and a select per group.
    """

    @staticmethod
    def forward(ctx, x_NK, w_GKM, sizes: list[int]):
        out_NM = x_NK.new_empty(x_NK.shape[0], w_GKM.shape[2])
        for x_g, w_g, out_g in zip(x_NK.split(sizes), w_GKM.unbind(0), out_NM.split(sizes)):
            if x_g.shape[0]:
                torch.mm(x_g, w_g, out=out_g)
        ctx.save_for_backward(x_NK, w_GKM)
        ctx.sizes = sizes
        return out_NM

    @staticmethod
    def backward(ctx, dy_NM):
        x_NK, w_GKM = ctx.saved_tensors
        sizes = ctx.sizes
        dy_g = dy_NM.contiguous().split(sizes)
        dx_NK = dw_GKM = None
        if ctx.needs_input_grad[0]:
            dx_NK = x_NK.new_empty(x_NK.shape)
            for dy, w, dx in zip(dy_g, w_GKM.unbind(0), dx_NK.split(sizes)):
                if dy.shape[0]:
                    torch.mm(dy, w.t(), out=dx)
        if ctx.needs_input_grad[1]:
            # dW in the weight's own memory layout (the layer passes transposed views of its
            # [G, out, in] parameters), so autograd accumulates it without a strided copy;
            # each group's dW is then written as a contiguous [M, K] product.
            dw_GKM = torch.empty_like(w_GKM)
            transposed = dw_GKM.stride(1) < dw_GKM.stride(2)
            for dy, x, dw in zip(dy_g, x_NK.split(sizes), dw_GKM.unbind(0)):
                if not dy.shape[0]:
                    dw.zero_()  # an expert with no rows has a zero gradient
                elif transposed:
                    torch.mm(dy.t(), x, out=dw.t())
                else:
                    torch.mm(x.t(), dy, out=dw)
        return dx_NK, dw_GKM, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """Grouped matmul. x [N, K] sorted by group, w [G, K, M] (any strides), group_sizes [G] -> [N, M]."""
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[1] or group_sizes.shape != (w.shape[0],):
        raise ValueError(
            f"grouped_mm: expected x [N, K], w [G, K, M], group_sizes [G]; got "
            f"{tuple(x.shape)}, {tuple(w.shape)}, {tuple(group_sizes.shape)}"
        )
    return _GroupedMM.apply(x, w, _group_sizes(group_sizes, x.shape[0]))


def grouped_swiglu(
    x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, group_sizes: torch.Tensor
) -> torch.Tensor:
    """Expert SwiGLU MLP per group: (silu(x W1_g^T) * (x W3_g^T)) W2_g^T.

    x [N, D] sorted by group; w1, w3 [G, F, D] and w2 [G, D, F] in nn.Linear (out, in)
    orientation, passed to grouped_mm as transposed views (no copies). Returns [N, D].
    """
    gate_NF = grouped_mm(x, w1.transpose(1, 2), group_sizes)
    up_NF = grouped_mm(x, w3.transpose(1, 2), group_sizes)
    return grouped_mm(F.silu(gate_NF) * up_NF, w2.transpose(1, 2), group_sizes)
