"""Host-side choices for the Triton grouped GEMMs (kernels/floe_kernels/triton_grouped_mm.py): the sm_90
resource budgets that prune autotune configs, the 32-bit tile-offset check, and the TMA
descriptors for the weights.
"""
from __future__ import annotations

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

MAX_SHARED_BYTES = 227 * 1024  # opt-in shared memory per block on sm_90
# Registers per thread (sm_90: 255 at most), measured with tools/check_sm90.py:
# - one fp32 accumulator of 128 registers compiles without spills at every call site; two
#   (SwiGLU gate and up, dW1 and dW3) of 128 together are at the edge (0-92 bytes of spills
#   depending on the pipeline depth), since each K step also stages a second operand: 96;
# - the fp32 tiles an epilogue holds at once (SwiGLU backward: dH, gate, up, sigmoid): 128;
# - operands loaded through pointers (not TMA) keep addresses and masks in registers: counted
#   as one register per element a K step loads per thread, accumulators plus those stay
#   within 192 (the configs over it spilled 4-128 bytes, those under it none).
MAX_ACC_REGS = 128
MAX_TWO_ACC_REGS = 96
MAX_EPILOGUE_REGS = 128
MAX_ACC_POINTER_REGS = 192

def _fits(config: triton.Config, elem_bytes: int, stage_elems: int, tile_elems: int,
          num_acc: int = 1, epilogue_tiles: int = 1, pointer_elems: int | None = None) -> bool:
    """Whether a config's software pipeline (num_stages copies of the `stage_elems` operand
    elements one K step loads) fits sm_90's shared memory and its registers stay within the
    budgets above: `num_acc` fp32 accumulators of `tile_elems`, `epilogue_tiles` such tiles
    in the epilogue, and `pointer_elems` (default: all of `stage_elems`) loaded through
    pointers rather than TMA."""
    smem = config.num_stages * stage_elems * elem_bytes
    threads = 32 * config.num_warps
    acc_regs = num_acc * tile_elems // threads
    pointer_regs = (stage_elems if pointer_elems is None else pointer_elems) // threads
    return (smem <= MAX_SHARED_BYTES
            and acc_regs <= (MAX_ACC_REGS if num_acc == 1 else MAX_TWO_ACC_REGS)
            and max(num_acc, epilogue_tiles) * tile_elems // threads <= MAX_EPILOGUE_REGS
            and acc_regs + pointer_regs <= MAX_ACC_POINTER_REGS)


def _keep(configs: list[triton.Config], ok) -> list[triton.Config]:
    kept = [c for c in configs if ok(c)]
    assert kept, "every autotune config was pruned"  # the config lists are built to always keep some
    return kept


MAX_BLOCK = 256  # the largest block size of any config


def _check_tile_offsets(*tensors: torch.Tensor) -> None:
    """The row-tiled kernels address a tile as a 64-bit base plus 32-bit offsets inside it."""
    for t in tensors:
        if max(t.stride(), default=0) * MAX_BLOCK * 2 >= 2**31:
            raise ValueError(f"grouped GEMM: a tensor with strides {t.stride()} is too sparse for 32-bit "
                             "offsets inside a tile; pass a contiguous copy")


# None: TMA descriptors on CUDA devices of compute capability >= 9 (Hopper); so never for the
# interpreter's CPU tensors. True/False forces the choice (tests run both paths under the interpreter;
# tools/check_sm90.py traces the Hopper path on meta tensors).
FORCE_TMA: bool | None = None


def _tma_device(device: torch.device) -> bool:
    if FORCE_TMA is not None:
        return FORCE_TMA
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def weight_operand(w_GKM: torch.Tensor) -> tuple[torch.Tensor | TensorDescriptor, bool]:
    """(operand, k_major): a TMA descriptor over the memory of w [G, K, M] when the device has
    TMA and the layout allows one (a contiguous last dimension, 16-byte aligned base and
    strides), else w itself. k_major: the descriptor is over w^T's memory [G, M, K] (weights
    stored [G, out, in] and read transposed), so the kernel transposes each tile it loads.

    Weights, unlike the activations, are a regular [G, K, M] box per group: TMA clips every
    tile at the group's own K and M and fills the rest with zeros, which is exactly the mask.
    The block shape is set per autotune config by `_set_weight_blocks`."""
    if not _tma_device(w_GKM.device):
        return w_GKM, False
    if w_GKM.stride(2) == 1:
        mem, k_major = w_GKM, False
    elif w_GKM.stride(1) == 1:
        mem, k_major = w_GKM.transpose(1, 2), True
    else:
        return w_GKM, False
    elem = w_GKM.element_size()
    if mem.data_ptr() % 16 or any(s * elem % 16 for s in mem.stride()[:2]):
        return w_GKM, False
    return TensorDescriptor(mem, list(mem.shape), list(mem.stride()), [1, 16, 16]), k_major


def weight_operands(*ws_GKM: torch.Tensor) -> tuple[list, bool, bool]:
    """(operands, B_TMA, B_K_MAJOR) for weights read by one kernel: descriptors for all of
    them when each allows one in the same orientation, else the tensors themselves."""
    pairs = [weight_operand(w) for w in ws_GKM]
    descs = [isinstance(op, TensorDescriptor) for op, _ in pairs]
    if all(descs) and len({k for _, k in pairs}) == 1:
        return [op for op, _ in pairs], True, pairs[0][1]
    return list(ws_GKM), False, False


def _set_weight_blocks(nargs: dict) -> None:
    """Config pre_hook: give the weight descriptors the block shape of the config about to run."""
    bk, bn = nargs["BLOCK_K"], nargs["BLOCK_N"]
    for name in ("b_ptr", "b2_ptr", "w1_ptr", "w3_ptr"):
        desc = nargs.get(name)
        if isinstance(desc, TensorDescriptor):
            desc.block_shape = [1, bn, bk] if nargs["B_K_MAJOR"] else [1, bk, bn]
