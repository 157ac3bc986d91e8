"""Raw Triton grouped-GEMM kernels and their launchers (no autograd; see kernels/floe_kernels/ops.py).

Rows of the activations are sorted by group (expert); group g owns rows
[bounds[g], bounds[g + 1]). Three kernels cover forward and backward:

    Y_g  = X_g  W_g       _grouped_mm_kernel     (forward, dX_g = dY_g W_g^T via swapped strides,
                                                 and dH_g = dY_g W2_g of the SwiGLU backward)
    dW_g = X_g^T dY_g     _grouped_mm_dw_kernel  (persistent over (group, output tile))
    H_g  = silu(X_g W1_g^T) * (X_g W3_g^T)       _swiglu_gate_up_kernel (two accumulators, one read of X;
                                                 its BACKWARD variant reads dH and writes dGate, dUp)

Weights are read through their strides, so `[G, out, in]` parameters and their transposed
views cost no copies; on sm_90+ the row-tiled kernels read them through TMA descriptors
(kernels/floe_kernels/triton_host.py `weight_operand`: a [G, K, M] box per group, clipped at each group's
K and M), elsewhere and under the interpreter through pointers. Accumulation is fp32; inputs fp32, fp16 or bf16; fp32 inputs use
IEEE dots (no TF32) so the result matches the reference.

Persistent schedule: the row-tiled kernels launch about one program per SM; program p takes
tiles p, p + P, p + 2P... of the sequence "group 0's tiles, group 1's tiles, ...", where a
group of s rows has ceil(s / BLOCK_M) * ceil(M / BLOCK_N) tiles and an empty group none. Each
program walks the group offsets forward as its tile index grows, so the schedule needs no
host sync and no tile table, and BLOCK_M is an ordinary autotuned block size. Inside a group,
tiles go GROUP_M row tiles at a time down each column tile, so the programs running together
share the weight columns they read in L2. The dW kernel takes tiles the same way; its groups
all have the same number of (K, M) output tiles, so it needs no walk.

Autotuning: every config list is pruned before benchmarking (`_prune_*`) by the shared memory
its software pipeline needs and by a register model (accumulators, epilogue tiles, operands
loaded through pointers; kernels/floe_kernels/triton_host.py), the limits that tools/check_sm90.py found
to cause launch failures and spills on sm_90; the key holds the shapes, a bucket of rows per
group, the TMA flag and the strides (layouts).

Shape legend: N rows, K reduction width, M output width, G groups, D hidden, F expert ffn,
BM/BN/BK/BR block sizes.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from floe.kernels.environment import interpreter_enabled
from floe.kernels.triton_host import _check_tile_offsets, _fits, _keep, _set_weight_blocks, weight_operands


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

INTERPRETER_PROGRAMS = 3  # a few programs, so the interpreter walks several tiles per program


def _configs(gpu: list[triton.Config], interpreted: triton.Config) -> list[triton.Config]:
    """Autotune candidates on a GPU; one small fixed configuration under the interpreter,
    where every program is run in Python and bigger blocks only mean fewer programs."""
    return [interpreted] if INTERPRETED else gpu


def rows_bucket(num_rows: int, num_groups: int) -> int:
    """Autotune key: mean rows per group rounded up to a power of two (small groups want a
    smaller BLOCK_M), so a new batch with similar routing reuses the tuned config."""
    return triton.next_power_of_2(max(1, num_rows // max(1, num_groups)))


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _persistent_programs(device: torch.device, max_tiles: int) -> int:
    """Programs of a persistent launch: one per SM (fewer when there are fewer tiles)."""
    if device.type != "cuda":
        return max(1, min(INTERPRETER_PROGRAMS, max_tiles))
    return max(1, min(_num_sms(device.index if device.index is not None else torch.cuda.current_device()), max_tiles))


def _max_tiles(num_rows: int, num_groups: int, block_m: int, num_col_tiles: int) -> int:
    # sum_g ceil(s_g / BM) <= (N + G (BM - 1)) / BM, and never more than one row tile per row.
    return max(1, min(num_rows, (num_rows + num_groups * (block_m - 1)) // block_m)) * num_col_tiles


def _dot_precision(dtype: torch.dtype) -> str:
    # TF32 would cost fp32 inputs ~1e-3 relative error; the reference is exact fp32.
    return "ieee" if dtype == torch.float32 else "tf32"


# --------------------------------------------------------------------------- TMA


@triton.jit
def _weight_tile(b_desc, g, k0, n0, B_K_MAJOR: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The [BK, BN] tile of weight g at (k0, n0) through a TMA descriptor (zeros past K and M)."""
    if B_K_MAJOR:  # the descriptor is over memory [G, M, K]
        return tl.trans(b_desc.load([g, n0, k0]).reshape(BLOCK_N, BLOCK_K))
    else:
        return b_desc.load([g, k0, n0]).reshape(BLOCK_K, BLOCK_N)


# --------------------------------------------------------------------------- schedule


@triton.jit
def _num_row_tiles(bounds_ptr, num_groups, num_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Total tiles of all groups: sum_g ceil(s_g / BM) * ceil(M / BN)."""
    total = 0
    for g in range(num_groups):
        rows = tl.load(bounds_ptr + g + 1) - tl.load(bounds_ptr + g)
        total += tl.cdiv(rows, BLOCK_M)
    return total * tl.cdiv(num_cols, BLOCK_N)


@triton.jit
def _seek_group(t, g, first_tile, bounds_ptr, num_pid_n, BLOCK_M: tl.constexpr):
    """Move (g, first_tile: g's first tile index) forward until tile t lies in group g.
    Tiles of one program only grow, so over a whole launch this walks the groups once."""
    row_start = tl.load(bounds_ptr + g)
    row_end = tl.load(bounds_ptr + g + 1)
    group_tiles = tl.cdiv(row_end - row_start, BLOCK_M) * num_pid_n
    while t >= first_tile + group_tiles:
        first_tile += group_tiles
        g += 1
        row_start = row_end
        row_end = tl.load(bounds_ptr + g + 1)
        group_tiles = tl.cdiv(row_end - row_start, BLOCK_M) * num_pid_n
    return g, first_tile, row_start, row_end


@triton.jit
def _swizzle(local, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of tile `local` of a num_pid_m x num_pid_n grid, GROUP_M row tiles at a
    time down each column tile (Triton matmul tutorial swizzle), so that concurrent tiles
    share the column operand in L2."""
    num_pid_in_band = GROUP_M * num_pid_n
    first_m = (local // num_pid_in_band) * GROUP_M
    band_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (local % num_pid_in_band) % band_size
    pid_n = (local % num_pid_in_band) // band_size
    return pid_m, pid_n


@triton.jit
def _tile_in_group(local, row_start, row_end, num_pid_n, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr):
    """(first row, column tile) of a group's tile `local`, swizzled (`_swizzle`)."""
    pid_m, pid_n = _swizzle(local, tl.cdiv(row_end - row_start, BLOCK_M), num_pid_n, GROUP_M)
    return row_start + pid_m * BLOCK_M, pid_n


# --------------------------------------------------------------------------- kernels


_MM_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s,
                  pre_hook=_set_weight_blocks)
    for bm, bn, bk, w, s in [
        (128, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 256, 64, 8, 3),
        (128, 128, 128, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 256, 64, 8, 4),
        (64, 128, 128, 4, 3),
    ]
]
_MM_INTERP_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=4, num_stages=1,
                                  pre_hook=_set_weight_blocks)


def _prune_mm(configs, named_args, **kwargs):
    """Configs whose pipeline fits shared memory (with A2/B2, twice the operands) and whose
    accumulator (one, also with A2/B2) fits the registers; BLOCK_M 128 only when groups
    average >= 128 rows."""
    num_ops = 2 if kwargs.get("HAS_SECOND", named_args.get("HAS_SECOND")) else 1
    b_tma = kwargs.get("B_TMA", named_args.get("B_TMA"))
    elem = named_args["a_ptr"].element_size()
    small_groups = named_args["ROWS_BUCKET"] < 128

    def ok(c):
        m, n, k = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if small_groups and m > 64 and not INTERPRETED:
            return False
        pointer_elems = num_ops * (m * k + (0 if b_tma else k * n))
        return _fits(c, elem, num_ops * (m * k + k * n), m * n, pointer_elems=pointer_elems)

    return _keep(configs, ok)


@triton.autotune(
    configs=_configs(_MM_GPU_CONFIGS, _MM_INTERP_CONFIG),
    key=["N_OUT", "K", "ROWS_BUCKET", "HAS_SECOND", "B_TMA", "stride_ak", "stride_bk", "stride_bn"],
    prune_configs_by={"early_config_prune": _prune_mm},
)
@triton.jit
def _grouped_mm_kernel(
    a_ptr, b_ptr, a2_ptr, b2_ptr, c_ptr, bounds_ptr,
    num_groups, N_OUT, K, ROWS_BUCKET,
    stride_am, stride_ak, stride_bg, stride_bk, stride_bn,
    stride_a2m, stride_a2k, stride_b2g, stride_b2k, stride_b2n,
    stride_cm, stride_cn,
    HAS_SECOND: tl.constexpr, DOT_PRECISION: tl.constexpr, B_TMA: tl.constexpr, B_K_MAJOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[rows of g] = A[rows of g] @ B[g] (+ A2[rows of g] @ B2[g] when HAS_SECOND); persistent.
    With B_TMA, b_ptr and b2_ptr are TMA descriptors (see triton_host.weight_operand)."""
    num_pid_n = tl.cdiv(N_OUT, BLOCK_N)
    num_tiles = _num_row_tiles(bounds_ptr, num_groups, N_OUT, BLOCK_M, BLOCK_N)
    g = 0
    first_tile = 0
    for t in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        g, first_tile, row_start, row_end = _seek_group(t, g, first_tile, bounds_ptr, num_pid_n, BLOCK_M)
        tile_row, pid_n = _tile_in_group(t - first_tile, row_start, row_end, num_pid_n, BLOCK_M, GROUP_M)
        g64 = g.to(tl.int64)
        ms = tl.arange(0, BLOCK_M)
        ns = tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        row_mask = tile_row + ms < row_end
        col_mask = pid_n * BLOCK_N + ns < N_OUT
        # Pointers are a 64-bit tile base plus 32-bit offsets inside the tile (see
        # `_check_tile_offsets`): a 64-bit product per element costs registers, and at
        # 128x256 tiles those spilled in the epilogue (tools/check_sm90.py).
        row64 = tile_row.to(tl.int64)
        col64 = (pid_n * BLOCK_N).to(tl.int64)
        a_ptrs = (a_ptr + row64 * stride_am) + (ms[:, None] * stride_am + ks[None, :] * stride_ak)
        if HAS_SECOND:
            a2_ptrs = (a2_ptr + row64 * stride_a2m) + (ms[:, None] * stride_a2m + ks[None, :] * stride_a2k)
        if not B_TMA:
            b_ptrs = (b_ptr + g64 * stride_bg + col64 * stride_bn) + (ks[:, None] * stride_bk + ns[None, :] * stride_bn)
            if HAS_SECOND:
                b2_ptrs = ((b2_ptr + g64 * stride_b2g + col64 * stride_b2n)
                           + (ks[:, None] * stride_b2k + ns[None, :] * stride_b2n))
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = (k0 + ks) < K
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            if B_TMA:
                b = _weight_tile(b_ptr, g, k0, pid_n * BLOCK_N, B_K_MAJOR, BLOCK_K, BLOCK_N)
            else:
                b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
                b_ptrs += BLOCK_K * stride_bk
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            if HAS_SECOND:
                a2 = tl.load(a2_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                if B_TMA:
                    b2 = _weight_tile(b2_ptr, g, k0, pid_n * BLOCK_N, B_K_MAJOR, BLOCK_K, BLOCK_N)
                else:
                    b2 = tl.load(b2_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
                    b2_ptrs += BLOCK_K * stride_b2k
                acc = tl.dot(a2, b2, acc, input_precision=DOT_PRECISION)
                a2_ptrs += BLOCK_K * stride_a2k
        c_ptrs = (c_ptr + row64 * stride_cm + col64 * stride_cn) + (ms[:, None] * stride_cm + ns[None, :] * stride_cn)
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


_DW_GPU_CONFIGS = [
    triton.Config({"BLOCK_K": bk, "BLOCK_N": bn, "BLOCK_R": br, "GROUP_K": 8}, num_warps=w, num_stages=s)
    for bk, bn, br, w, s in [
        (128, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 32, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 256, 64, 8, 3),
        (64, 64, 64, 4, 4),
        (128, 64, 64, 8, 4),  # 8 warps at 64 registers for both accumulators of dW1/dW3
        (64, 128, 64, 8, 4),
    ]
]
_DW_INTERP_CONFIG = triton.Config({"BLOCK_K": 32, "BLOCK_N": 32, "BLOCK_R": 16, "GROUP_K": 2}, num_warps=4,
                                  num_stages=1)


def _prune_dw(configs, named_args, **kwargs):
    """Shared memory of A (twice with A2) and B per stage; one accumulator per output."""
    num_out = 2 if kwargs.get("HAS_SECOND", named_args.get("HAS_SECOND")) else 1
    elem = named_args["a_ptr"].element_size()

    def ok(c):
        bk, bn, br = c.kwargs["BLOCK_K"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_R"]
        return _fits(c, elem, num_out * bk * br + br * bn, bk * bn, num_acc=num_out, epilogue_tiles=num_out)

    return _keep(configs, ok)


@triton.autotune(
    configs=_configs(_DW_GPU_CONFIGS, _DW_INTERP_CONFIG),
    key=["KA", "N_OUT", "ROWS_BUCKET", "HAS_SECOND", "stride_am", "stride_bm", "stride_ck"],
    prune_configs_by={"early_config_prune": _prune_dw},
)
@triton.jit
def _grouped_mm_dw_kernel(
    a_ptr, a2_ptr, b_ptr, c_ptr, c2_ptr, bounds_ptr,
    num_groups, KA, N_OUT, ROWS_BUCKET,
    stride_am, stride_ak, stride_a2m, stride_a2k, stride_bm, stride_bn,
    stride_cg, stride_ck, stride_cn, stride_c2g, stride_c2k, stride_c2n,
    HAS_SECOND: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_K: tl.constexpr,
):
    """C[g] = A[rows of g]^T @ B[rows of g] (and C2[g] = A2^T @ B, sharing the loads of B); persistent.

    Every group has ceil(KA / BK) * ceil(M / BN) output tiles, so tile t is in group
    t // tiles_per_group with no walk; program p takes tiles p, p + P, ... like the row-tiled
    kernels, GROUP_K row tiles at a time down each column tile. An empty group runs no loop
    iteration and stores zeros, so its weight gradient is written like any other."""
    num_pid_k = tl.cdiv(KA, BLOCK_K)
    num_pid_n = tl.cdiv(N_OUT, BLOCK_N)
    tiles_per_group = num_pid_k * num_pid_n
    ks = tl.arange(0, BLOCK_K)
    ns = tl.arange(0, BLOCK_N)
    rs = tl.arange(0, BLOCK_R)
    for t in range(tl.program_id(0), num_groups * tiles_per_group, tl.num_programs(0)):
        g = t // tiles_per_group
        pid_k, pid_n = _swizzle(t % tiles_per_group, num_pid_k, num_pid_n, GROUP_K)
        row_start = tl.load(bounds_ptr + g)
        row_end = tl.load(bounds_ptr + g + 1)
        k_mask = pid_k * BLOCK_K + ks < KA
        col_mask = pid_n * BLOCK_N + ns < N_OUT
        k64 = (pid_k * BLOCK_K).to(tl.int64)
        n64 = (pid_n * BLOCK_N).to(tl.int64)
        row64 = row_start.to(tl.int64)
        # A is read transposed through its strides: a [BK, BR] tile, no copy of A^T. A 64-bit
        # base plus 32-bit offsets inside the tile, as in the row-tiled kernels.
        a_ptrs = (a_ptr + row64 * stride_am + k64 * stride_ak) + (ks[:, None] * stride_ak + rs[None, :] * stride_am)
        b_ptrs = (b_ptr + row64 * stride_bm + n64 * stride_bn) + (rs[:, None] * stride_bm + ns[None, :] * stride_bn)
        if HAS_SECOND:
            a2_ptrs = ((a2_ptr + row64 * stride_a2m + k64 * stride_a2k)
                       + (ks[:, None] * stride_a2k + rs[None, :] * stride_a2m))
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        if HAS_SECOND:
            acc2 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for r0 in range(row_start, row_end, BLOCK_R):
            r_mask = r0 + rs < row_end
            a = tl.load(a_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=r_mask[:, None] & col_mask[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_R * stride_am
            b_ptrs += BLOCK_R * stride_bm
            if HAS_SECOND:
                a2 = tl.load(a2_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
                acc2 = tl.dot(a2, b, acc2, input_precision=DOT_PRECISION)
                a2_ptrs += BLOCK_R * stride_a2m
        out_mask = k_mask[:, None] & col_mask[None, :]
        g64 = g.to(tl.int64)
        c_ptrs = (c_ptr + g64 * stride_cg + k64 * stride_ck + n64 * stride_cn) + (ks[:, None] * stride_ck
                                                                                 + ns[None, :] * stride_cn)
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=out_mask)
        if HAS_SECOND:
            c2_ptrs = ((c2_ptr + g64 * stride_c2g + k64 * stride_c2k + n64 * stride_c2n)
                       + (ks[:, None] * stride_c2k + ns[None, :] * stride_c2n))
            tl.store(c2_ptrs, acc2.to(c2_ptr.dtype.element_ty), mask=out_mask)


_SWIGLU_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s,
                  pre_hook=_set_weight_blocks)
    for bm, bn, bk, w, s in [
        (128, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 64, 64, 4, 4),
        (128, 128, 32, 8, 4),
        (128, 64, 64, 8, 4),  # 64 accumulator registers: fits the backward epilogue
        (128, 64, 128, 8, 3),
        (64, 128, 64, 4, 4),
        (64, 128, 64, 8, 4),
        (64, 256, 64, 8, 3),
        (64, 64, 128, 4, 3),
    ]
]


def _prune_swiglu(configs, named_args, **kwargs):
    """X tile plus the W1 and W3 tiles per stage; gate and up accumulators; an epilogue holding
    gate, up and sigmoid, and in BACKWARD also dH (at 128 registers for those four tiles it
    spilled 600-850 bytes per thread, none at 64: tools/check_sm90.py)."""
    elem = named_args["x_ptr"].element_size()
    small_groups = named_args["ROWS_BUCKET"] < 128
    epilogue_tiles = 4 if kwargs.get("BACKWARD", named_args.get("BACKWARD")) else 3
    b_tma = kwargs.get("B_TMA", named_args.get("B_TMA"))

    def ok(c):
        m, n, k = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if small_groups and m > 64 and not INTERPRETED:
            return False
        pointer_elems = m * k + (0 if b_tma else 2 * k * n)
        return _fits(c, elem, m * k + 2 * k * n, m * n, num_acc=2, epilogue_tiles=epilogue_tiles,
                     pointer_elems=pointer_elems)

    return _keep(configs, ok)


@triton.autotune(
    configs=_configs(_SWIGLU_GPU_CONFIGS, _MM_INTERP_CONFIG),
    key=["F", "D", "ROWS_BUCKET", "BACKWARD", "B_TMA", "stride_xd", "stride_w1d", "stride_w3d"],
    prune_configs_by={"early_config_prune": _prune_swiglu},
    restore_value=["dh_ptr"],  # BACKWARD overwrites dH with dGate: each benchmark run needs the original
)
@triton.jit
def _swiglu_gate_up_kernel(
    x_ptr, w1_ptr, w3_ptr, dh_ptr, h_ptr, dup_ptr, bounds_ptr,
    num_groups, F, D, ROWS_BUCKET,
    stride_xm, stride_xd, stride_w1g, stride_w1f, stride_w1d, stride_w3g, stride_w3f, stride_w3d,
    stride_hm, stride_hf,
    BACKWARD: tl.constexpr, DOT_PRECISION: tl.constexpr, B_TMA: tl.constexpr, B_K_MAJOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """H = silu(X W1_g^T) * (X W3_g^T) over [BM, BN] tiles of F, X read once for both; persistent.
    With B_TMA, w1_ptr and w3_ptr are TMA descriptors over W1^T, W3^T (see triton_host.weight_operand).

    BACKWARD recomputes gate and up (nothing was stored in forward), reads dH = dY W2_g
    (one grouped GEMM before this one), writes H (for dW2) and dUp, and overwrites dH with
    dGate in place: each element is read and then written by the same program. Two
    accumulators, not the three of forming dH here too, is what keeps it spill-free on sm_90
    (tools/check_sm90.py)."""
    num_pid_n = tl.cdiv(F, BLOCK_N)
    num_tiles = _num_row_tiles(bounds_ptr, num_groups, F, BLOCK_M, BLOCK_N)
    g = 0
    first_tile = 0
    for t in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        g, first_tile, row_start, row_end = _seek_group(t, g, first_tile, bounds_ptr, num_pid_n, BLOCK_M)
        tile_row, pid_n = _tile_in_group(t - first_tile, row_start, row_end, num_pid_n, BLOCK_M, GROUP_M)
        g64 = g.to(tl.int64)
        ms = tl.arange(0, BLOCK_M)
        ns = tl.arange(0, BLOCK_N)
        ds = tl.arange(0, BLOCK_K)
        row_mask = tile_row + ms < row_end
        f_mask = pid_n * BLOCK_N + ns < F
        row64 = tile_row.to(tl.int64)
        f64 = (pid_n * BLOCK_N).to(tl.int64)
        # 64-bit tile base + 32-bit offsets inside the tile, as in _grouped_mm_kernel.
        x_ptrs = (x_ptr + row64 * stride_xm) + (ms[:, None] * stride_xm + ds[None, :] * stride_xd)
        if not B_TMA:
            # W1_g^T and W3_g^T as [BK(d), BN(f)] tiles read through the (out, in) strides.
            w1_ptrs = (w1_ptr + g64 * stride_w1g + f64 * stride_w1f) + (ds[:, None] * stride_w1d + ns[None, :] * stride_w1f)
            w3_ptrs = (w3_ptr + g64 * stride_w3g + f64 * stride_w3f) + (ds[:, None] * stride_w3d + ns[None, :] * stride_w3f)
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_K):
            d_mask = (d0 + ds) < D
            x = tl.load(x_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            if B_TMA:
                w1 = _weight_tile(w1_ptr, g, d0, pid_n * BLOCK_N, B_K_MAJOR, BLOCK_K, BLOCK_N)
                w3 = _weight_tile(w3_ptr, g, d0, pid_n * BLOCK_N, B_K_MAJOR, BLOCK_K, BLOCK_N)
            else:
                w_mask = d_mask[:, None] & f_mask[None, :]
                w1 = tl.load(w1_ptrs, mask=w_mask, other=0.0)
                w3 = tl.load(w3_ptrs, mask=w_mask, other=0.0)
                w1_ptrs += BLOCK_K * stride_w1d
                w3_ptrs += BLOCK_K * stride_w3d
            acc_gate = tl.dot(x, w1, acc_gate, input_precision=DOT_PRECISION)
            acc_up = tl.dot(x, w3, acc_up, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K * stride_xd
        sig = tl.sigmoid(acc_gate)
        silu = acc_gate * sig
        out_tile = row64 * stride_hm + f64 * stride_hf
        out_offs = ms[:, None] * stride_hm + ns[None, :] * stride_hf
        out_mask = row_mask[:, None] & f_mask[None, :]
        tl.store(h_ptr + out_tile + out_offs, (silu * acc_up).to(h_ptr.dtype.element_ty), mask=out_mask)
        if BACKWARD:
            dh = tl.load(dh_ptr + out_tile + out_offs, mask=out_mask, other=0.0).to(tl.float32)
            # d silu(z)/dz = sig(z) (1 + z (1 - sig(z)))
            dgate = dh * acc_up * sig * (1.0 + acc_gate * (1.0 - sig))
            tl.store(dup_ptr + out_tile + out_offs, (dh * silu).to(dup_ptr.dtype.element_ty), mask=out_mask)
            tl.store(dh_ptr + out_tile + out_offs, dgate.to(dh_ptr.dtype.element_ty), mask=out_mask)


KERNELS = ("_grouped_mm_kernel", "_grouped_mm_dw_kernel", "_swiglu_gate_up_kernel")
_PRUNE = {"_grouped_mm_kernel": _prune_mm, "_grouped_mm_dw_kernel": _prune_dw, "_swiglu_gate_up_kernel": _prune_swiglu}


def prune_for(kernel_name: str):
    """The `early_config_prune` of a kernel (tools/check_sm90.py reports what survives it)."""
    return _PRUNE[kernel_name]

# --------------------------------------------------------------------------- launchers


def group_bounds(group_sizes_G: torch.Tensor) -> torch.Tensor:
    """Row offsets [G + 1] (int32, on the sizes' device) that the kernels read; no host sync."""
    zero = torch.zeros(1, dtype=torch.int64, device=group_sizes_G.device)
    return torch.cat([zero, torch.cumsum(group_sizes_G.to(torch.int64), 0)]).to(torch.int32)


def grouped_mm_fwd(
    a_NK: torch.Tensor, b_GKM: torch.Tensor, bounds_G1: torch.Tensor,
    a2_NK: torch.Tensor | None = None, b2_GKM: torch.Tensor | None = None,
) -> torch.Tensor:
    """C[rows of g] = A_g B_g (+ A2_g B2_g). a [N, K], b [G, K, M] any strides -> c [N, M].

    dX of a grouped_mm is this with b = W^T (a strided view: no copy)."""
    num_rows, k = a_NK.shape
    num_groups, m = b_GKM.shape[0], b_GKM.shape[2]
    c_NM = _empty(num_rows, m, dtype=a_NK.dtype, device=a_NK.device)
    if num_rows == 0 or m == 0:
        return c_NM
    if k == 0:
        return c_NM.zero_()
    has_second = a2_NK is not None
    a2_NK = a2_NK if has_second else a_NK
    b2_GKM = b2_GKM if has_second else b_GKM
    _check_tile_offsets(a_NK, a2_NK, b_GKM[0], b2_GKM[0], c_NM)
    (b, b2), tma, k_major = weight_operands(b_GKM, b2_GKM)
    grid = lambda meta: (_persistent_programs(
        a_NK.device, _max_tiles(num_rows, num_groups, meta["BLOCK_M"], triton.cdiv(m, meta["BLOCK_N"]))),)
    _grouped_mm_kernel[grid](
        a_NK, b, a2_NK, b2, c_NM, bounds_G1,
        num_groups, m, k, rows_bucket(num_rows, num_groups),
        a_NK.stride(0), a_NK.stride(1), b_GKM.stride(0), b_GKM.stride(1), b_GKM.stride(2),
        a2_NK.stride(0), a2_NK.stride(1), b2_GKM.stride(0), b2_GKM.stride(1), b2_GKM.stride(2),
        c_NM.stride(0), c_NM.stride(1),
        HAS_SECOND=has_second, DOT_PRECISION=_dot_precision(a_NK.dtype), B_TMA=tma, B_K_MAJOR=k_major,
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
    _check_tile_offsets(a_NK, a2, b_NM, c_GKM[0], c2[0])
    grid = lambda meta: (_persistent_programs(
        a_NK.device, num_groups * triton.cdiv(k, meta["BLOCK_K"]) * triton.cdiv(m, meta["BLOCK_N"])),)
    _grouped_mm_dw_kernel[grid](
        a_NK, a2, b_NM, c_GKM, c2, bounds_G1,
        num_groups, k, m, rows_bucket(a_NK.shape[0], num_groups),
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
    x_ND: torch.Tensor, w1_GFD: torch.Tensor, w3_GFD: torch.Tensor, bounds_G1: torch.Tensor,
    dh_NF: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Forward: h [N, F] = silu(x W1_g^T) * (x W3_g^T), returns (h, None, None).
    Backward (dh = dY W2_g given, [N, F]): recompute gate/up, returns (h, dgate, dup); dgate is
    written over dh (the caller's dh buffer is consumed)."""
    num_rows, d = x_ND.shape
    num_groups, f = w1_GFD.shape[0], w1_GFD.shape[1]
    backward = dh_NF is not None
    h_NF = _empty(num_rows, f, dtype=x_ND.dtype, device=x_ND.device)
    dup_NF = _empty(num_rows, f, dtype=x_ND.dtype, device=x_ND.device) if backward else None
    if num_rows == 0 or f == 0:
        return h_NF, dh_NF, dup_NF
    if d == 0:  # gate = up = 0, so every output is 0
        return h_NF.zero_(), dh_NF.zero_() if backward else None, dup_NF.zero_() if backward else None
    assert not backward or dh_NF.stride() == h_NF.stride()  # the kernel indexes all three alike
    # Unused pointer arguments still need a valid tensor; they are never dereferenced.
    dh = dh_NF if backward else h_NF
    du = dup_NF if backward else h_NF
    _check_tile_offsets(x_ND, w1_GFD[0], w3_GFD[0], h_NF)
    # The kernel reads W1^T and W3^T as [G, D, F] "B" operands.
    (w1, w3), tma, k_major = weight_operands(w1_GFD.transpose(1, 2), w3_GFD.transpose(1, 2))
    if not tma:
        w1, w3 = w1_GFD, w3_GFD
    grid = lambda meta: (_persistent_programs(
        x_ND.device, _max_tiles(num_rows, num_groups, meta["BLOCK_M"], triton.cdiv(f, meta["BLOCK_N"]))),)
    _swiglu_gate_up_kernel[grid](
        x_ND, w1, w3, dh, h_NF, du, bounds_G1,
        num_groups, f, d, rows_bucket(num_rows, num_groups),
        x_ND.stride(0), x_ND.stride(1),
        w1_GFD.stride(0), w1_GFD.stride(1), w1_GFD.stride(2),
        w3_GFD.stride(0), w3_GFD.stride(1), w3_GFD.stride(2),
        h_NF.stride(0), h_NF.stride(1),
        BACKWARD=backward, DOT_PRECISION=_dot_precision(x_ND.dtype), B_TMA=tma, B_K_MAJOR=k_major,
    )
    return h_NF, dh_NF, dup_NF
