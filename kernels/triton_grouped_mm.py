"""Raw Triton grouped-GEMM kernels and their launchers (no autograd; see kernels/ops.py).

Rows of the activations are sorted by group (expert); group g owns rows
[bounds[g], bounds[g + 1]). Three GEMM shapes cover forward and backward:

    Y_g  = X_g  W_g       _grouped_mm_kernel     (forward, and dX_g = dY_g W_g^T via swapped strides)
    dW_g = X_g^T dY_g     _grouped_mm_dw_kernel  (one program per (group, output tile))
    H_g  = silu(X_g W1_g^T) * (X_g W3_g^T)       _swiglu_gate_up_kernel (two accumulators, one read of X;
                                                 its BACKWARD variant also forms dGate, dUp)

Weights are read through their strides, so `[G, out, in]` parameters and their transposed
views cost no copies. Accumulation is fp32; inputs fp32, fp16 or bf16; fp32 inputs use
IEEE dots (no TF32) so the result matches the reference.

Tile schedule: the row tiles of every group are enumerated on the device from the group
sizes (`build_row_schedule`), without a host sync. A group of s rows gets ceil(s / BLOCK_M)
tiles, an empty group none. The grid is sized by an upper bound that needs only N and G
(host-known shapes), so the Triton path has no device-to-host sync when the sizes live on
the GPU; the tiles past the real count (fewer than G) are marked empty and their programs
return at once.

Shape legend: N rows, K reduction width, M output width, G groups, D hidden, F expert ffn,
T row tiles (upper bound), BM/BN/BK/BR block sizes.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels import interpreter_enabled


# Decided at import, as triton.jit decides at decoration time whether it interprets.
INTERPRETED = interpreter_enabled()


def interpreting() -> bool:
    """Whether the kernels can run on CPU tensors now: they were decorated under
    TRITON_INTERPRET=1, and the interpreter, which reads the variable again at run time,
    still sees it."""
    return INTERPRETED and interpreter_enabled()


# Every output buffer of the Triton path is allocated here, so a test can poison them all
# (NaN-fill) and prove that every element is written by a kernel.
_empty = torch.empty


def _configs(gpu: list[triton.Config], interpreted: triton.Config) -> list[triton.Config]:
    """Autotune candidates on a GPU; one small fixed configuration under the interpreter,
    where every program is run in Python and bigger blocks only mean fewer programs."""
    return [interpreted] if INTERPRETED else gpu


# --------------------------------------------------------------------------- schedule


class RowSchedule(NamedTuple):
    """Row tiles of all groups. tiles_3T rows: group id, first row, end row (int32);
    padding tiles have first row == end row == 0. bounds_G1: group row offsets [G + 1]."""

    tiles_3T: torch.Tensor
    bounds_G1: torch.Tensor
    block_m: int


def pick_block_m(num_rows: int, num_groups: int) -> int:
    """BLOCK_M is fixed per call (not autotuned) because the schedule is built for it."""
    if INTERPRETED:
        return 16
    # Small groups waste most of a 128-row tile on masked rows.
    return 128 if num_rows >= 128 * num_groups else 64


def build_row_schedule(group_sizes_G: torch.Tensor, num_rows: int, block_m: int) -> RowSchedule:
    """Enumerate (group, row range) of every row tile on the device, with no host sync."""
    device = group_sizes_G.device
    num_groups = group_sizes_G.shape[0]
    sizes_G = group_sizes_G.to(torch.int64)
    group_end_G = torch.cumsum(sizes_G, 0)
    group_start_G = group_end_G - sizes_G
    tiles_G = (sizes_G + block_m - 1) // block_m
    tile_end_G = torch.cumsum(tiles_G, 0)
    # sum_g ceil(s_g / BM) <= (N + G (BM - 1)) / BM, and never more than one tile per row.
    num_tiles = max(1, min(num_rows, (num_rows + num_groups * (block_m - 1)) // block_m))
    t_T = torch.arange(num_tiles, device=device, dtype=torch.int64)
    # right=True skips empty groups: their tile_end equals the previous group's.
    g_T = torch.searchsorted(tile_end_G, t_T, right=True)
    valid_T = g_T < num_groups
    g_T = g_T.clamp(max=num_groups - 1)
    first_tile_T = tile_end_G[g_T] - tiles_G[g_T]
    row_start_T = group_start_G[g_T] + (t_T - first_tile_T) * block_m
    row_end_T = group_end_G[g_T]
    zero = torch.zeros((), dtype=torch.int64, device=device)
    tiles_3T = torch.stack(
        [g_T, torch.where(valid_T, row_start_T, zero), torch.where(valid_T, row_end_T, zero)]
    ).to(torch.int32)
    bounds_G1 = torch.cat([zero.view(1), group_end_G]).to(torch.int32)
    return RowSchedule(tiles_3T.contiguous(), bounds_G1, block_m)


def _dot_precision(dtype: torch.dtype) -> str:
    # TF32 would cost fp32 inputs ~1e-3 relative error; the reference is exact fp32.
    return "ieee" if dtype == torch.float32 else "tf32"


# --------------------------------------------------------------------------- kernels


@triton.jit
def _tile_of(pid, tiles_ptr, num_tiles, num_cols, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(group, first row, end row, column tile) of program `pid` from the row schedule, GROUP_M
    row tiles at a time so that neighbouring programs share B columns in L2 (Triton matmul
    tutorial swizzle). A padding program past the last real tile gets row_start >= row_end."""
    num_pid_n = tl.cdiv(num_cols, BLOCK_N)
    num_pid_in_band = GROUP_M * num_pid_n
    band = pid // num_pid_in_band
    first_t = band * GROUP_M
    band_size = tl.minimum(num_tiles - first_t, GROUP_M)
    t = first_t + (pid % num_pid_in_band) % band_size
    pid_n = (pid % num_pid_in_band) // band_size
    g = tl.load(tiles_ptr + t).to(tl.int64)
    row_start = tl.load(tiles_ptr + num_tiles + t)
    row_end = tl.load(tiles_ptr + 2 * num_tiles + t)
    return g, row_start, row_end, pid_n


_MM_GPU_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [
        (128, 64, 8, 3),
        (128, 64, 4, 4),
        (256, 64, 8, 3),
        (128, 128, 8, 3),
        (64, 64, 4, 4),
        (128, 32, 4, 4),
    ]
]
_MM_INTERP_CONFIG = triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)


@triton.autotune(configs=_configs(_MM_GPU_CONFIGS, _MM_INTERP_CONFIG), key=["N_OUT", "K", "BLOCK_M", "HAS_SECOND"])
@triton.jit
def _grouped_mm_kernel(
    a_ptr, b_ptr, a2_ptr, b2_ptr, c_ptr, tiles_ptr,
    num_tiles, N_OUT, K,
    stride_am, stride_ak, stride_bg, stride_bk, stride_bn,
    stride_a2m, stride_a2k, stride_b2g, stride_b2k, stride_b2n,
    stride_cm, stride_cn,
    HAS_SECOND: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[rows of g] = A[rows of g] @ B[g] (+ A2[rows of g] @ B2[g] when HAS_SECOND)."""
    g, row_start, row_end, pid_n = _tile_of(tl.program_id(0), tiles_ptr, num_tiles, N_OUT, BLOCK_N, GROUP_M)
    if row_start >= row_end:  # padding tile past the last real one
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    rows64 = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N_OUT
    ks = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + rows64[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + g * stride_bg + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    if HAS_SECOND:
        a2_ptrs = a2_ptr + rows64[:, None] * stride_a2m + ks[None, :] * stride_a2k
        b2_ptrs = b2_ptr + g * stride_b2g + ks[:, None] * stride_b2k + cols[None, :] * stride_b2n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + ks) < K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
        if HAS_SECOND:
            a2 = tl.load(a2_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b2 = tl.load(b2_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc = tl.dot(a2, b2, acc, input_precision=DOT_PRECISION)
            a2_ptrs += BLOCK_K * stride_a2k
            b2_ptrs += BLOCK_K * stride_b2k
    c_ptrs = c_ptr + rows64[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


_DW_GPU_CONFIGS = [
    triton.Config({"BLOCK_K": bk, "BLOCK_N": bn, "BLOCK_R": br}, num_warps=w, num_stages=s)
    for bk, bn, br, w, s in [
        (128, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 256, 64, 8, 3),
        (64, 64, 64, 4, 4),
    ]
]
_DW_INTERP_CONFIG = triton.Config({"BLOCK_K": 32, "BLOCK_N": 32, "BLOCK_R": 16}, num_warps=4, num_stages=1)


@triton.autotune(configs=_configs(_DW_GPU_CONFIGS, _DW_INTERP_CONFIG), key=["KA", "N_OUT", "HAS_SECOND"])
@triton.jit
def _grouped_mm_dw_kernel(
    a_ptr, a2_ptr, b_ptr, c_ptr, c2_ptr, bounds_ptr,
    KA, N_OUT,
    stride_am, stride_ak, stride_a2m, stride_a2k, stride_bm, stride_bn,
    stride_cg, stride_ck, stride_cn, stride_c2g, stride_c2k, stride_c2n,
    HAS_SECOND: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """C[g] = A[rows of g]^T @ B[rows of g] (and C2[g] = A2^T @ B, sharing the loads of B).

    Launched for every group: an empty group runs no loop iteration and stores zeros, so
    its weight gradient is written like any other."""
    pid = tl.program_id(0)
    num_k = tl.cdiv(KA, BLOCK_K)
    num_n = tl.cdiv(N_OUT, BLOCK_N)
    g = pid // (num_k * num_n)
    pid_k = (pid % (num_k * num_n)) // num_n
    pid_n = pid % num_n
    row_start = tl.load(bounds_ptr + g)
    row_end = tl.load(bounds_ptr + g + 1)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = ks < KA
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N_OUT
    rs = tl.arange(0, BLOCK_R)

    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    if HAS_SECOND:
        acc2 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows64 = (r0 + rs).to(tl.int64)
        r_mask = (r0 + rs) < row_end
        # A is read transposed through its strides: a [BK, BR] tile, no copy of A^T.
        a = tl.load(a_ptr + ks[:, None] * stride_ak + rows64[None, :] * stride_am,
                    mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        b = tl.load(b_ptr + rows64[:, None] * stride_bm + cols[None, :] * stride_bn,
                    mask=r_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if HAS_SECOND:
            a2 = tl.load(a2_ptr + ks[:, None] * stride_a2k + rows64[None, :] * stride_a2m,
                         mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            acc2 = tl.dot(a2, b, acc2, input_precision=DOT_PRECISION)
    out_mask = k_mask[:, None] & col_mask[None, :]
    g64 = g.to(tl.int64)
    c_ptrs = c_ptr + g64 * stride_cg + ks[:, None] * stride_ck + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=out_mask)
    if HAS_SECOND:
        c2_ptrs = c2_ptr + g64 * stride_c2g + ks[:, None] * stride_c2k + cols[None, :] * stride_c2n
        tl.store(c2_ptrs, acc2.to(c2_ptr.dtype.element_ty), mask=out_mask)


_SWIGLU_GPU_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [
        (128, 64, 8, 3),
        (64, 64, 4, 4),
        (128, 32, 8, 4),
        (64, 128, 8, 3),
    ]
]


@triton.autotune(configs=_configs(_SWIGLU_GPU_CONFIGS, _MM_INTERP_CONFIG), key=["F", "D", "BLOCK_M", "BACKWARD"])
@triton.jit
def _swiglu_gate_up_kernel(
    x_ptr, w1_ptr, w3_ptr, dy_ptr, w2_ptr, h_ptr, dgate_ptr, dup_ptr, tiles_ptr,
    num_tiles, F, D,
    stride_xm, stride_xd, stride_w1g, stride_w1f, stride_w1d, stride_w3g, stride_w3f, stride_w3d,
    stride_dym, stride_dyd, stride_w2g, stride_w2d, stride_w2f,
    stride_hm, stride_hf,
    BACKWARD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """H = silu(X W1_g^T) * (X W3_g^T) over one [BM, BN] tile of F, X read once for both.

    BACKWARD recomputes gate and up (nothing was stored in forward), also forms
    dH = dY W2_g in the same D loop, and writes H (for dW2), dGate and dUp; all three
    products reduce over D, so one program covers them."""
    g, row_start, row_end, pid_n = _tile_of(tl.program_id(0), tiles_ptr, num_tiles, F, BLOCK_N, GROUP_M)
    if row_start >= row_end:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    rows64 = rows.to(tl.int64)
    fs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    f_mask = fs < F
    ds = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + rows64[:, None] * stride_xm + ds[None, :] * stride_xd
    # W1_g^T and W3_g^T as [BK(d), BN(f)] tiles read through the (out, in) strides.
    w1_ptrs = w1_ptr + g * stride_w1g + ds[:, None] * stride_w1d + fs[None, :] * stride_w1f
    w3_ptrs = w3_ptr + g * stride_w3g + ds[:, None] * stride_w3d + fs[None, :] * stride_w3f
    if BACKWARD:
        dy_ptrs = dy_ptr + rows64[:, None] * stride_dym + ds[None, :] * stride_dyd
        w2_ptrs = w2_ptr + g * stride_w2g + ds[:, None] * stride_w2d + fs[None, :] * stride_w2f
        acc_dh = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        d_mask = (d0 + ds) < D
        x = tl.load(x_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w_mask = d_mask[:, None] & f_mask[None, :]
        w1 = tl.load(w1_ptrs, mask=w_mask, other=0.0)
        w3 = tl.load(w3_ptrs, mask=w_mask, other=0.0)
        acc_gate = tl.dot(x, w1, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(x, w3, acc_up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xd
        w1_ptrs += BLOCK_K * stride_w1d
        w3_ptrs += BLOCK_K * stride_w3d
        if BACKWARD:
            dy = tl.load(dy_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            w2 = tl.load(w2_ptrs, mask=w_mask, other=0.0)
            acc_dh = tl.dot(dy, w2, acc_dh, input_precision=DOT_PRECISION)
            dy_ptrs += BLOCK_K * stride_dyd
            w2_ptrs += BLOCK_K * stride_w2d

    sig = tl.sigmoid(acc_gate)
    silu = acc_gate * sig
    out_offs = rows64[:, None] * stride_hm + fs[None, :] * stride_hf
    out_mask = row_mask[:, None] & f_mask[None, :]
    tl.store(h_ptr + out_offs, (silu * acc_up).to(h_ptr.dtype.element_ty), mask=out_mask)
    if BACKWARD:
        # d silu(z)/dz = sig(z) (1 + z (1 - sig(z)))
        dgate = acc_dh * acc_up * sig * (1.0 + acc_gate * (1.0 - sig))
        dup = acc_dh * silu
        tl.store(dgate_ptr + out_offs, dgate.to(dgate_ptr.dtype.element_ty), mask=out_mask)
        tl.store(dup_ptr + out_offs, dup.to(dup_ptr.dtype.element_ty), mask=out_mask)


# --------------------------------------------------------------------------- launchers


def grouped_mm_fwd(
    a_NK: torch.Tensor, b_GKM: torch.Tensor, sched: RowSchedule,
    a2_NK: torch.Tensor | None = None, b2_GKM: torch.Tensor | None = None,
) -> torch.Tensor:
    """C[rows of g] = A_g B_g (+ A2_g B2_g). a [N, K], b [G, K, M] any strides -> c [N, M].

    dX of a grouped_mm is this with b = W^T (a strided view: no copy)."""
    num_rows, k = a_NK.shape
    m = b_GKM.shape[2]
    c_NM = _empty(num_rows, m, dtype=a_NK.dtype, device=a_NK.device)
    if num_rows == 0 or m == 0:
        return c_NM
    if k == 0:
        return c_NM.zero_()
    has_second = a2_NK is not None
    a2_NK = a2_NK if has_second else a_NK
    b2_GKM = b2_GKM if has_second else b_GKM
    num_tiles = sched.tiles_3T.shape[1]
    grid = lambda meta: (num_tiles * triton.cdiv(m, meta["BLOCK_N"]),)
    _grouped_mm_kernel[grid](
        a_NK, b_GKM, a2_NK, b2_GKM, c_NM, sched.tiles_3T,
        num_tiles, m, k,
        a_NK.stride(0), a_NK.stride(1), b_GKM.stride(0), b_GKM.stride(1), b_GKM.stride(2),
        a2_NK.stride(0), a2_NK.stride(1), b2_GKM.stride(0), b2_GKM.stride(1), b2_GKM.stride(2),
        c_NM.stride(0), c_NM.stride(1),
        HAS_SECOND=has_second, DOT_PRECISION=_dot_precision(a_NK.dtype), BLOCK_M=sched.block_m,
    )
    return c_NM


def grouped_mm_dw(
    a_NK: torch.Tensor, b_NM: torch.Tensor, like_GKM: torch.Tensor, bounds_G1: torch.Tensor,
    a2_NK: torch.Tensor | None = None, like2_GKM: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """C[g] = A_g^T B_g, a [N, K], b [N, M] -> c [G, K, M] with the strides of `like_GKM`
    (so the gradient of a transposed weight view lands contiguous in the parameter).
    With a2, also C2[g] = A2_g^T B_g into the layout of `like2_GKM`. Empty groups get zeros."""
    k, m = a_NK.shape[1], b_NM.shape[1]
    num_groups = like_GKM.shape[0]
    has_second = a2_NK is not None
    c_GKM = _empty_same_layout(like_GKM)
    c2_GKM = _empty_same_layout(like2_GKM) if has_second else None
    if num_groups == 0 or k == 0 or m == 0:
        return c_GKM, c2_GKM
    a2 = a2_NK if has_second else a_NK
    c2 = c2_GKM if has_second else c_GKM
    grid = lambda meta: (num_groups * triton.cdiv(k, meta["BLOCK_K"]) * triton.cdiv(m, meta["BLOCK_N"]),)
    _grouped_mm_dw_kernel[grid](
        a_NK, a2, b_NM, c_GKM, c2, bounds_G1,
        k, m,
        a_NK.stride(0), a_NK.stride(1), a2.stride(0), a2.stride(1), b_NM.stride(0), b_NM.stride(1),
        c_GKM.stride(0), c_GKM.stride(1), c_GKM.stride(2), c2.stride(0), c2.stride(1), c2.stride(2),
        HAS_SECOND=has_second, DOT_PRECISION=_dot_precision(a_NK.dtype),
    )
    return c_GKM, c2_GKM


def _empty_same_layout(like: torch.Tensor) -> torch.Tensor:
    """A dense buffer with the dimension order of `like` (e.g. a transposed weight view), so
    the gradient of a `[G, out, in]` parameter seen through a transposed view is contiguous
    once autograd transposes it back."""
    order = sorted(range(like.dim()), key=lambda i: like.stride(i))
    strides = [0] * like.dim()
    expected = 1
    for i in order:
        strides[i] = expected
        expected *= like.shape[i]
    buf = _empty(like.numel(), dtype=like.dtype, device=like.device)
    return buf.as_strided(like.shape, strides)


def swiglu_gate_up(
    x_ND: torch.Tensor, w1_GFD: torch.Tensor, w3_GFD: torch.Tensor, sched: RowSchedule,
    dy_ND: torch.Tensor | None = None, w2_GDF: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Forward: h [N, F] = silu(x W1_g^T) * (x W3_g^T), returns (h, None, None).
    Backward (dy and w2 given): recompute gate/up, returns (h, dgate, dup), all [N, F]."""
    num_rows, d = x_ND.shape
    f = w1_GFD.shape[1]
    backward = dy_ND is not None
    h_NF = _empty(num_rows, f, dtype=x_ND.dtype, device=x_ND.device)
    dgate_NF = _empty(num_rows, f, dtype=x_ND.dtype, device=x_ND.device) if backward else None
    dup_NF = _empty(num_rows, f, dtype=x_ND.dtype, device=x_ND.device) if backward else None
    if num_rows == 0 or f == 0:
        return h_NF, dgate_NF, dup_NF
    if d == 0:  # gate = up = 0, so every output is 0
        return h_NF.zero_(), dgate_NF.zero_() if backward else None, dup_NF.zero_() if backward else None
    # Unused pointer arguments still need a valid tensor; they are never dereferenced.
    dy = dy_ND if backward else x_ND
    w2 = w2_GDF if backward else w1_GFD.transpose(1, 2)
    dg = dgate_NF if backward else h_NF
    du = dup_NF if backward else h_NF
    num_tiles = sched.tiles_3T.shape[1]
    grid = lambda meta: (num_tiles * triton.cdiv(f, meta["BLOCK_N"]),)
    _swiglu_gate_up_kernel[grid](
        x_ND, w1_GFD, w3_GFD, dy, w2, h_NF, dg, du, sched.tiles_3T,
        num_tiles, f, d,
        x_ND.stride(0), x_ND.stride(1),
        w1_GFD.stride(0), w1_GFD.stride(1), w1_GFD.stride(2),
        w3_GFD.stride(0), w3_GFD.stride(1), w3_GFD.stride(2),
        dy.stride(0), dy.stride(1), w2.stride(0), w2.stride(1), w2.stride(2),
        h_NF.stride(0), h_NF.stride(1),
        BACKWARD=backward, DOT_PRECISION=_dot_precision(x_ND.dtype), BLOCK_M=sched.block_m,
    )
    return h_NF, dgate_NF, dup_NF
