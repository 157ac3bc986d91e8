"""Autograd ops over the Triton grouped GEMMs (tier 2; raw kernels in triton_grouped_mm.py).

Same signatures and semantics as kernels/floe_kernels/reference.py. Shape legend: N rows sorted by
group, K input width, M output width, G groups, D hidden, F expert ffn width.

grouped_swiglu is the memory-optimised expert MLP: forward keeps only its inputs (x and
the weights), not gate, up or their product; backward forms dH = dY W2 (one grouped GEMM)
and recomputes gate and up in a kernel that turns dH into dGate in place, so the [N, F]
activations live only inside one backward call (three [N, F] buffers at the peak).
"""
from __future__ import annotations

import torch

import floe.kernels.triton_grouped_mm as tgm

# The kernel launches of one forward and backward of each op, in order: the call sites that
# tools/check_sm90.py compiles and tools/bench_grouped_gemm.py reports configs for.
CALL_SITES = {
    "grouped_mm": ("mm.fwd", "mm.dX", "mm.dW"),
    "grouped_swiglu": (
        "swiglu.fwd.gate_up", "swiglu.fwd.down",
        "swiglu.bwd.dH", "swiglu.bwd.gate_up", "swiglu.bwd.dX", "swiglu.bwd.dW2", "swiglu.bwd.dW13",
    ),
}


def _check_inputs(name: str, x: torch.Tensor, weights: list[torch.Tensor], group_sizes: torch.Tensor) -> None:
    problems = []
    if x.device.type != "cuda" and not tgm.interpreting():
        problems.append(
            f"tensors are on {x.device}, which Triton can only run with TRITON_INTERPRET=1 set before "
            "kernels.ops is first imported and while it runs; use FLOE_KERNELS=reference (or auto) for CPU tensors"
        )
    for w in weights:
        if w.device != x.device:
            problems.append(f"weight on {w.device} but x on {x.device}")
        if w.dtype != x.dtype:
            problems.append(f"weight dtype {w.dtype} but x dtype {x.dtype}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        problems.append(f"dtype {x.dtype} not supported (float32, float16, bfloat16)")
    if group_sizes.is_floating_point():
        problems.append(f"group_sizes must be integers, got {group_sizes.dtype}")
    if problems:
        raise ValueError(f"{name}: " + "; ".join(problems))


def _validated_sizes(group_sizes_G: torch.Tensor, num_rows: int, device: torch.device) -> torch.Tensor:
    """group_sizes on x's device; checked on the host when they live there, asynchronously on a GPU."""
    if group_sizes_G.device.type == "cpu":
        sizes = group_sizes_G.tolist()
        if any(s < 0 for s in sizes) or sum(sizes) != num_rows:
            raise ValueError(
                f"grouped_mm: group_sizes must be >= 0 and sum to x.shape[0]={num_rows}, got sum {sum(sizes)}"
            )
        return group_sizes_G.to(device, non_blocking=True)
    group_sizes_G = group_sizes_G.to(device)
    # A device-side assert instead of a host sync: bad sizes fail at the next sync point.
    torch._assert_async(
        ((group_sizes_G >= 0).all() & (group_sizes_G.sum() == num_rows)),
        "grouped_mm: group_sizes must be >= 0 and sum to x.shape[0]",
    )
    return group_sizes_G


def _bounds(x: torch.Tensor, group_sizes_G: torch.Tensor) -> torch.Tensor:
    """Row offsets [G + 1] of the groups, int32 on x's device (the kernels' whole schedule)."""
    return tgm.group_bounds(_validated_sizes(group_sizes_G, x.shape[0], x.device))


class _GroupedMM(torch.autograd.Function):
    """Y_g = X_g W_g; backward dX_g = dY_g W_g^T (W^T as a strided view), dW_g = X_g^T dY_g."""

    @staticmethod
    def forward(ctx, x_NK, w_GKM, group_sizes_G):
        bounds_G1 = _bounds(x_NK, group_sizes_G)
        y_NM = tgm.grouped_mm_fwd(x_NK, w_GKM, bounds_G1)
        ctx.save_for_backward(x_NK, w_GKM, bounds_G1)
        return y_NM

    @staticmethod
    def backward(ctx, dy_NM):
        x_NK, w_GKM, bounds_G1 = ctx.saved_tensors
        dx_NK = dw_GKM = None
        if ctx.needs_input_grad[0]:
            dx_NK = tgm.grouped_mm_fwd(dy_NM, w_GKM.transpose(1, 2), bounds_G1)
        if ctx.needs_input_grad[1]:
            dw_GKM, _ = tgm.grouped_mm_dw(x_NK, dy_NM, w_GKM, bounds_G1)
        return dx_NK, dw_GKM, None


class _GroupedSwiGLU(torch.autograd.Function):
    """y = (silu(x W1_g^T) * (x W3_g^T)) W2_g^T per group, recomputing the activation in backward."""

    @staticmethod
    def forward(ctx, x_ND, w1_GFD, w3_GFD, w2_GDF, group_sizes_G):
        bounds_G1 = _bounds(x_ND, group_sizes_G)
        h_NF, _, _ = tgm.swiglu_gate_up(x_ND, w1_GFD, w3_GFD, bounds_G1)
        y_ND = tgm.grouped_mm_fwd(h_NF, w2_GDF.transpose(1, 2), bounds_G1)
        ctx.save_for_backward(x_ND, w1_GFD, w3_GFD, w2_GDF, bounds_G1)
        return y_ND

    @staticmethod
    def backward(ctx, dy_ND):
        x_ND, w1_GFD, w3_GFD, w2_GDF, bounds_G1 = ctx.saved_tensors
        need_x, need_w1, need_w3, need_w2 = ctx.needs_input_grad[:4]
        # dH = dY W2_g, then recompute h = silu(gate) * up and turn dH into dGate (in place)
        # and dUp. Forming dH inside the gate/up kernel needs a third accumulator, which
        # spills on sm_90 at every usable tile size (tools/check_sm90.py).
        dh_NF = tgm.grouped_mm_fwd(dy_ND, w2_GDF, bounds_G1)
        h_NF, dgate_NF, dup_NF = tgm.swiglu_gate_up(x_ND, w1_GFD, w3_GFD, bounds_G1, dh_NF)
        dx_ND = dw1_GFD = dw3_GFD = dw2_GDF = None
        if need_x:
            # dX = dGate W1_g + dUp W3_g: both products accumulate in one kernel.
            dx_ND = tgm.grouped_mm_fwd(dgate_NF, w1_GFD, bounds_G1, dup_NF, w3_GFD)
        if need_w2:
            dw2_GDF, _ = tgm.grouped_mm_dw(dy_ND, h_NF, w2_GDF, bounds_G1)
        if need_w1 or need_w3:
            # dW1_g = dGate_g^T X_g and dW3_g = dUp_g^T X_g share the loads of X.
            dw1_GFD, dw3_GFD = tgm.grouped_mm_dw(dgate_NF, x_ND, w1_GFD, bounds_G1, dup_NF, w3_GFD)
        return dx_ND, dw1_GFD if need_w1 else None, dw3_GFD if need_w3 else None, dw2_GDF, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """Grouped matmul on Triton. x [N, K] sorted by group, w [G, K, M] (any strides), group_sizes [G] -> [N, M]."""
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[1] or group_sizes.shape != (w.shape[0],):
        raise ValueError(
            f"grouped_mm: expected x [N, K], w [G, K, M], group_sizes [G]; got "
            f"{tuple(x.shape)}, {tuple(w.shape)}, {tuple(group_sizes.shape)}"
        )
    _check_inputs("grouped_mm", x, [w], group_sizes)
    return _GroupedMM.apply(x, w, group_sizes)


def grouped_swiglu(
    x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, group_sizes: torch.Tensor
) -> torch.Tensor:
    """Expert SwiGLU on Triton. x [N, D], w1/w3 [G, F, D], w2 [G, D, F], group_sizes [G] -> [N, D]."""
    ok = (
        x.dim() == 2 and w1.dim() == 3 and w1.shape == w3.shape and w2.dim() == 3
        and w1.shape[2] == x.shape[1] and w2.shape == (w1.shape[0], w1.shape[2], w1.shape[1])
        and group_sizes.shape == (w1.shape[0],)
    )
    if not ok:
        raise ValueError(
            "grouped_swiglu: expected x [N, D], w1/w3 [G, F, D], w2 [G, D, F], group_sizes [G]; got "
            f"{tuple(x.shape)}, {tuple(w1.shape)}, {tuple(w3.shape)}, {tuple(w2.shape)}, {tuple(group_sizes.shape)}"
        )
    _check_inputs("grouped_swiglu", x, [w1, w3, w2], group_sizes)
    return _GroupedSwiGLU.apply(x, w1, w3, w2, group_sizes)
