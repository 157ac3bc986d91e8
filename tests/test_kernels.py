"""Triton grouped GEMMs (kernels/floe_kernels/ops.py) against the reference (kernels/floe_kernels/reference.py).

Without CUDA the kernels run under the Triton interpreter on CPU tensors: TRITON_INTERPRET=1
is set while kernels.triton_grouped_mm is (re)imported (triton.jit decides at decoration time
whether it interprets) and, through monkeypatch, during each test here (the interpreter reads
it again at run time); it is restored in between, so other test modules in the same session
and the processes they start see the environment unchanged. With CUDA the same tests run the compiled
kernels, plus the bf16 tests the interpreter cannot run.

Every output buffer of the Triton path is NaN-poisoned (tgm._empty is patched), every test
counts the kernel launches, and the reference is made to raise inside the Triton calls, so
an unwritten element, a silent fallback or a skipped kernel fails the test.

Shape legend: N rows, K input width, M output width, G groups, D hidden, F expert ffn.
"""
from __future__ import annotations

import collections
import importlib
import importlib.util
import math
import os
import re
import subprocess
import sys
import types

import itertools

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def _triton_would_interpret() -> bool:
    """Whether Triton runs (or, not yet imported, will run) its own jit'd library functions
    (tl.zeros, tl.cdiv...) in the interpreter: decided once, when triton is first imported."""
    if "triton" not in sys.modules:
        return True
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.zeros, InterpretedFunction)


# Without a GPU, if something imported triton before this module without TRITON_INTERPRET,
# the interpreter cannot work in this process: the tests then run in a fresh one.
RUN_IN_SUBPROCESS = not ON_GPU and not _triton_would_interpret()


def _import_triton_modules():
    """kernels.triton_grouped_mm and kernels.ops, decorated for the interpreter when there is no GPU."""
    if ON_GPU:
        from floe.kernels import ops, triton_grouped_mm

        return triton_grouped_mm, ops
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401  (first import: its library is decorated for the interpreter)

        if "kernels.triton_grouped_mm" in sys.modules and not sys.modules["kernels.triton_grouped_mm"].INTERPRETED:
            importlib.reload(sys.modules["kernels.triton_grouped_mm"])  # imported earlier, compiled mode
        from floe.kernels import ops, triton_grouped_mm
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    assert triton_grouped_mm.INTERPRETED
    return triton_grouped_mm, ops


tgm, ops = (None, None) if RUN_IN_SUBPROCESS else _import_triton_modules()
from floe import kernels
from floe.kernels import reference, triton_host
from tools.gpu_check_steps import pytest_counts

REF_GROUPED_MM = reference.grouped_mm  # the oracle
REF_GROUPED_SWIGLU = reference.grouped_swiglu

KERNEL_NAMES = ("_grouped_mm_kernel", "_grouped_mm_dw_kernel", "_swiglu_gate_up_kernel")
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


class _CountingKernel:
    """Stands in for an (autotuned) kernel; counts `kernel[grid](...)` launches and records
    in `counts.b_tma` whether each launch read its weights through TMA descriptors."""

    def __init__(self, kernel, name, counts):
        self.kernel, self.name, self.counts = kernel, name, counts

    def __getitem__(self, grid):
        self.counts[self.name] += 1

        def launch(*args, **kwargs):
            self.counts.b_tma.append((self.name, kwargs.get("B_TMA")))
            return self.kernel[grid](*args, **kwargs)

        return launch


def _nan_empty(*size, dtype=None, device=None):
    out = torch.empty(*size, dtype=dtype, device=device)
    return out.fill_(float("nan"))


@pytest.fixture
def launches(monkeypatch):
    """Counter of kernel launches, with every Triton-path buffer poisoned and the reference
    disabled inside kernels.* calls, so only the Triton kernels can produce the results."""
    counts = collections.Counter()
    counts.b_tma = []
    for name in KERNEL_NAMES:
        monkeypatch.setattr(tgm, name, _CountingKernel(getattr(tgm, name), name, counts))
    monkeypatch.setattr(tgm, "_empty", _nan_empty)

    def no_fallback(*args, **kwargs):
        raise AssertionError("reference backend called while the Triton backend was forced")

    # kernels/__init__ reaches the reference through its module attribute `reference`.
    monkeypatch.setattr(kernels, "reference", types.SimpleNamespace(grouped_mm=no_fallback, grouped_swiglu=no_fallback))
    monkeypatch.setenv("FLOE_KERNELS", "triton")  # what a backend="auto" call (the default) then uses
    yield counts


@pytest.fixture(autouse=True)
def _interpreter_and_backend(request, monkeypatch):
    """TRITON_INTERPRET=1 for the duration of each test (the interpreter reads it again at
    run time), and the automatic backend back afterwards."""
    if RUN_IN_SUBPROCESS and request.function is not test_kernels_in_fresh_interpreter_process:
        pytest.skip("triton was imported without TRITON_INTERPRET: run by test_kernels_in_fresh_interpreter_process")
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


# The tests of this module that run (and must pass) under the interpreter: all but the GPU-only ones
# and test_kernels_in_fresh_interpreter_process. Change it with the tests, in the same commit.
INTERPRETER_TESTS = 52
GPU_ONLY_SKIPS = ("bf16 needs a GPU (the Triton interpreter has no bf16 dot)",
                  "the tests of this module run in this process")


def test_kernels_in_fresh_interpreter_process():
    """The whole module in a new process with TRITON_INTERPRET=1 from the start."""
    if not RUN_IN_SUBPROCESS:
        pytest.skip("the tests of this module run in this process")
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", os.path.abspath(__file__)],
        cwd=repo_root, env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True, text=True, timeout=900, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    counts = pytest_counts(proc.stdout)
    skips = re.findall(r"SKIPPED \[(\d+)\] [^:]+:\d+: (.*)", proc.stdout)
    # Every skip there is a GPU-only test or this test itself; everything else ran and passed.
    assert all(reason in GPU_ONLY_SKIPS for _, reason in skips), skips
    assert counts["skipped"] == sum(int(n) for n, _ in skips)
    assert counts["passed"] == INTERPRETER_TESTS and counts["failed"] == counts["errors"] == 0, proc.stdout[-3000:]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite elements"
    denom = ref.double().norm().item()
    err = (out.double() - ref.double()).norm().item()
    return err if denom == 0 else err / denom


# (group sizes, K, M): empty groups, a one-row group, all rows in one group, sizes and
# widths that are not multiples of the tiles (BM 16, BN/BK 32 under the interpreter),
# every group empty, and 128 random groups (drawn in the test).
SHAPES = {
    "empty_groups": ([0, 5, 1, 0, 30, 7, 0], 40, 24),
    "one_row": ([1], 16, 16),
    "one_group_has_all": ([0, 0, 37, 0], 24, 40),
    "odd_sizes": ([17, 33, 2], 48, 40),
    "all_empty": ([0, 0, 0], 16, 24),
    "g128_random": (None, 16, 24),
}


def _sizes(spec):
    if spec is not None:
        return torch.tensor(spec, dtype=torch.long)
    sizes = torch.randint(0, 5, (128,))
    sizes[torch.randperm(128)[:16]] = 0  # some empty groups for sure
    return sizes


def _leaf(t):
    return t.detach().requires_grad_(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_grouped_mm_matches_reference(shape, dtype, launches):
    spec, k, m = SHAPES[shape]
    sizes_G = _sizes(spec)
    num_groups, num_rows = sizes_G.numel(), int(sizes_G.sum())
    x_NK = _leaf(torch.randn(num_rows, k, device=DEVICE).to(dtype))
    # As the layer does: a [G, out, in] parameter passed as its transposed view.
    w_GMK = _leaf((torch.randn(num_groups, m, k, device=DEVICE) / math.sqrt(k)).to(dtype))
    y_NM = kernels.grouped_mm(x_NK, w_GMK.transpose(1, 2), sizes_G.to(DEVICE))
    dy_NM = torch.randn_like(y_NM)
    y_NM.backward(dy_NM)

    x_ref, w_ref = _leaf(x_NK.detach().float().cpu()), _leaf(w_GMK.detach().float().cpu())
    y_ref = REF_GROUPED_MM(x_ref, w_ref.transpose(1, 2), sizes_G)
    y_ref.backward(dy_NM.float().cpu())

    tol = TOL[dtype]
    assert _rel_err(y_NM.float().cpu(), y_ref) < tol
    assert _rel_err(x_NK.grad.float().cpu(), x_ref.grad) < tol
    assert _rel_err(w_GMK.grad.float().cpu(), w_ref.grad) < tol
    assert (w_GMK.grad[sizes_G.to(DEVICE) == 0] == 0).all(), "empty groups need an exact zero gradient"
    assert w_GMK.grad.is_contiguous(), "dW of a transposed view should land contiguous in the parameter"
    expected = {"_grouped_mm_dw_kernel": 1}  # launched even with no rows: it writes the zeros
    if num_rows:
        expected["_grouped_mm_kernel"] = 2  # forward and dX; with no rows there is nothing to launch
    assert launches == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_grouped_swiglu_matches_reference(shape, dtype, launches):
    spec, d, f = SHAPES[shape]
    sizes_G = _sizes(spec)
    num_groups, num_rows = sizes_G.numel(), int(sizes_G.sum())
    x_ND = _leaf(torch.randn(num_rows, d, device=DEVICE).to(dtype))
    w1_GFD = _leaf((torch.randn(num_groups, f, d, device=DEVICE) / math.sqrt(d)).to(dtype))
    w3_GFD = _leaf((torch.randn(num_groups, f, d, device=DEVICE) / math.sqrt(d)).to(dtype))
    w2_GDF = _leaf((torch.randn(num_groups, d, f, device=DEVICE) / math.sqrt(f)).to(dtype))
    params = (x_ND, w1_GFD, w3_GFD, w2_GDF)
    y_ND = kernels.grouped_swiglu(*params, sizes_G.to(DEVICE))
    dy_ND = torch.randn_like(y_ND)
    y_ND.backward(dy_ND)

    refs = [_leaf(p.detach().float().cpu()) for p in params]
    y_ref = REF_GROUPED_SWIGLU(*refs, sizes_G)
    y_ref.backward(dy_ND.float().cpu())

    tol = TOL[dtype]
    assert _rel_err(y_ND.float().cpu(), y_ref) < tol
    for name, p, r in zip(("x", "w1", "w3", "w2"), params, refs):
        assert _rel_err(p.grad.float().cpu(), r.grad) < tol, f"d{name}"
        assert p.grad.is_contiguous(), f"d{name} layout"
    expected = {"_grouped_mm_dw_kernel": 2}  # dW2, then dW1 and dW3 together
    if num_rows:
        # forward: gate/up + down; backward: dH, recompute (dH -> dGate, dUp), dX (one launch)
        expected.update({"_swiglu_gate_up_kernel": 2, "_grouped_mm_kernel": 3})
    assert launches == expected


def test_grouped_swiglu_frozen_experts_skip_weight_grads(launches):
    """model.freeze_moe: no weight gradient is requested, so no dW kernel runs."""
    sizes_G = torch.tensor([3, 0, 9])
    x_ND = _leaf(torch.randn(12, 16, device=DEVICE))
    w1, w3 = torch.randn(3, 24, 16, device=DEVICE), torch.randn(3, 24, 16, device=DEVICE)
    w2 = torch.randn(3, 16, 24, device=DEVICE)
    kernels.grouped_swiglu(x_ND, w1, w3, w2, sizes_G.to(DEVICE)).sum().backward()
    x_ref = _leaf(x_ND.detach().cpu())
    REF_GROUPED_SWIGLU(x_ref, w1.cpu(), w3.cpu(), w2.cpu(), sizes_G).sum().backward()
    assert _rel_err(x_ND.grad.cpu(), x_ref.grad) < 1e-5
    assert launches["_grouped_mm_dw_kernel"] == 0
    assert launches["_swiglu_gate_up_kernel"] == 2


def test_contiguous_weights_and_strided_input(launches):
    """w [G, K, M] stored contiguous (not a view) and x a column slice of a wider tensor."""
    sizes_G = torch.tensor([5, 0, 12])
    x_wide = torch.randn(17, 40, device=DEVICE)
    x_NK = x_wide[:, 3:35]  # row stride 40, not 32
    w_GKM = torch.randn(3, 32, 24, device=DEVICE)
    y_NM = kernels.grouped_mm(x_NK, w_GKM, sizes_G.to(DEVICE))
    assert _rel_err(y_NM.cpu(), REF_GROUPED_MM(x_NK.cpu(), w_GKM.cpu(), sizes_G)) < 1e-5
    assert launches["_grouped_mm_kernel"] == 1


@pytest.mark.parametrize("programs", [1, 2, 5, 1000])
def test_persistent_schedule_any_program_count(programs, monkeypatch, launches):
    """The persistent kernels give each program tiles p, p + P, ...: with one program (it walks
    every group), a few, or more programs than tiles (the rest find no tile), every row and
    column of every group is computed once and right, empty groups included."""
    monkeypatch.setattr(tgm, "INTERPRETER_PROGRAMS", programs)
    sizes_G = torch.tensor([0, 1, 16, 17, 0, 0, 40, 3])
    num_rows = int(sizes_G.sum())
    x_ND = torch.randn(num_rows, 40, device=DEVICE)
    w1, w3 = torch.randn(8, 72, 40, device=DEVICE), torch.randn(8, 72, 40, device=DEVICE)
    w2 = torch.randn(8, 40, 72, device=DEVICE)
    y_ND = kernels.grouped_swiglu(x_ND, w1, w3, w2, sizes_G.to(DEVICE))
    y_ref = REF_GROUPED_SWIGLU(x_ND.cpu(), w1.cpu(), w3.cpu(), w2.cpu(), sizes_G)
    assert _rel_err(y_ND.cpu(), y_ref) < 1e-5
    assert launches == {"_swiglu_gate_up_kernel": 1, "_grouped_mm_kernel": 1}


def _naive_dw(a_NK, b_NM, sizes_G):
    """dW_g = A_g^T B_g by a loop over groups (zeros for an empty group), in float64."""
    out, start = [], 0
    for s in sizes_G.tolist():
        out.append(a_NK[start:start + s].double().t() @ b_NM[start:start + s].double())
        start += s
    return torch.stack(out)


@pytest.mark.parametrize("programs", [1, 2, 5, 1000])
def test_dw_persistent_any_program_count(programs, monkeypatch, launches):
    """The persistent dW kernel: with one program (every tile of every group), a few, or more
    programs than tiles, each group's [K, M] gradient is computed once and right; K and M
    span several tiles (3 x 3 per group under the interpreter's 32 x 32 blocks, so the
    GROUP_K swizzle has a partial band), groups smaller than one BLOCK_R (16) row step, and
    empty groups get exact zeros; with A2 both outputs share the loads of B."""
    monkeypatch.setattr(tgm, "INTERPRETER_PROGRAMS", programs)
    sizes_G = torch.tensor([0, 1, 15, 16, 0, 40, 3, 0])
    num_rows, k, m = int(sizes_G.sum()), 72, 70
    a_NK, a2_NK = torch.randn(num_rows, k, device=DEVICE), torch.randn(num_rows, k, device=DEVICE)
    b_NM = torch.randn(num_rows, m, device=DEVICE)
    like_GKM = torch.empty(8, m, k, device=DEVICE).transpose(1, 2)  # a [G, out, in] parameter's view
    bounds_G1 = tgm.group_bounds(sizes_G.to(DEVICE))
    dw_GKM, dw2_GKM = tgm.grouped_mm_dw(a_NK, b_NM, like_GKM, bounds_G1, a2_NK, like_GKM)
    for got, a in ((dw_GKM, a_NK), (dw2_GKM, a2_NK)):
        assert _rel_err(got.cpu(), _naive_dw(a.cpu(), b_NM.cpu(), sizes_G)) < 1e-5
        assert (got[sizes_G.to(DEVICE) == 0] == 0).all()
        assert got.transpose(1, 2).is_contiguous()
    assert launches == {"_grouped_mm_dw_kernel": 1}


def test_dw_persistent_128_groups(launches):
    """128 groups (a sixth empty, the rest 1-20 rows, below and above BLOCK_R) on a few programs."""
    gen = torch.Generator().manual_seed(3)
    sizes_G = torch.randint(1, 21, (128,), generator=gen)
    sizes_G[torch.randperm(128, generator=gen)[:21]] = 0
    num_rows = int(sizes_G.sum())
    a_NK, b_NM = torch.randn(num_rows, 40, device=DEVICE), torch.randn(num_rows, 24, device=DEVICE)
    dw_GKM, none = tgm.grouped_mm_dw(a_NK, b_NM, torch.empty(128, 40, 24, device=DEVICE),
                                     tgm.group_bounds(sizes_G.to(DEVICE)))
    assert none is None
    assert _rel_err(dw_GKM.cpu(), _naive_dw(a_NK.cpu(), b_NM.cpu(), sizes_G)) < 1e-5
    assert launches == {"_grouped_mm_dw_kernel": 1}


@pytest.mark.parametrize(
    "shape, dtype",  # 128 groups once: the interpreter walks them slowly
    [("empty_groups", torch.float32), ("empty_groups", torch.float16), ("odd_sizes", torch.float32),
     ("g128_random", torch.float16)],
    ids=["empty_groups-fp32", "empty_groups-fp16", "odd_sizes-fp32", "g128_random-fp16"],
)
def test_tma_weights_match_reference(shape, dtype, monkeypatch, launches):
    """The Hopper path (weights through TMA descriptors, 3-D [G, K, M] boxes that clip at
    each group's K and M) run by the interpreter: forward and every gradient of both ops
    against the reference, and every row-tiled launch really took the descriptor path."""
    monkeypatch.setattr(triton_host, "FORCE_TMA", True)
    spec, d, f = SHAPES[shape]
    sizes_G = _sizes(spec)
    num_groups, num_rows = sizes_G.numel(), int(sizes_G.sum())
    x_ND = _leaf(torch.randn(num_rows, d, device=DEVICE).to(dtype))
    w1_GFD = _leaf((torch.randn(num_groups, f, d, device=DEVICE) / math.sqrt(d)).to(dtype))
    w3_GFD = _leaf((torch.randn(num_groups, f, d, device=DEVICE) / math.sqrt(d)).to(dtype))
    w2_GDF = _leaf((torch.randn(num_groups, d, f, device=DEVICE) / math.sqrt(f)).to(dtype))
    params = (x_ND, w1_GFD, w3_GFD, w2_GDF)
    y_NF = kernels.grouped_mm(x_ND, w1_GFD.transpose(1, 2), sizes_G.to(DEVICE))  # K-major weights
    y_NF.backward(torch.ones_like(y_NF))
    y_ND = kernels.grouped_swiglu(*params, sizes_G.to(DEVICE))
    dy_ND = torch.randn_like(y_ND)
    y_ND.backward(dy_ND)

    refs = [_leaf(p.detach().float().cpu()) for p in params]
    y_ref_NF = REF_GROUPED_MM(refs[0], refs[1].transpose(1, 2), sizes_G)
    y_ref_NF.backward(torch.ones_like(y_ref_NF))
    y_ref = REF_GROUPED_SWIGLU(*refs, sizes_G)
    y_ref.backward(dy_ND.float().cpu())
    tol = TOL[dtype]
    assert _rel_err(y_NF.float().cpu(), y_ref_NF) < tol
    assert _rel_err(y_ND.float().cpu(), y_ref) < tol
    for name, p, r in zip(("x", "w1", "w3", "w2"), params, refs):
        assert _rel_err(p.grad.float().cpu(), r.grad) < tol, f"d{name}"
    row_tiled = [tma for name, tma in launches.b_tma if name != "_grouped_mm_dw_kernel"]
    assert row_tiled and all(row_tiled), launches.b_tma


def test_weight_operand_chooses_descriptor_or_pointers(monkeypatch, launches):
    """A descriptor over the weight's memory when its layout allows one (N- or K-contiguous,
    16-byte aligned), pointers otherwise, and pointers for every weight of a kernel when one
    of them cannot take a descriptor; the pointer fallback still computes the right result."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    monkeypatch.setattr(triton_host, "FORCE_TMA", True)
    w_GKM = torch.randn(3, 32, 24, device=DEVICE)
    op, k_major = triton_host.weight_operand(w_GKM)
    assert isinstance(op, TensorDescriptor) and not k_major and list(op.shape) == [3, 32, 24]
    op, k_major = triton_host.weight_operand(w_GKM.transpose(1, 2))  # a [G, out, in] parameter's view
    assert isinstance(op, TensorDescriptor) and k_major and list(op.shape) == [3, 32, 24]
    strided = torch.randn(3, 32, 48, device=DEVICE)[:, :, ::2]  # no unit stride
    misaligned = torch.randn(3 * 32 * 24 + 1, device=DEVICE)[1:].view(3, 32, 24)  # base 4 bytes off
    odd_rows = torch.randn(3, 32, 27, device=DEVICE)[:, :, :24]  # row stride 108 bytes
    for w in (strided, misaligned, odd_rows):
        op, k_major = triton_host.weight_operand(w)
        assert op is w and not k_major
    ops_, tma, _ = triton_host.weight_operands(w_GKM, strided)
    assert not tma and ops_[0] is w_GKM
    monkeypatch.setattr(triton_host, "FORCE_TMA", False)
    assert triton_host.weight_operand(w_GKM)[0] is w_GKM

    monkeypatch.setattr(triton_host, "FORCE_TMA", True)
    sizes_G = torch.tensor([5, 0, 12])
    x_NK = torch.randn(17, 32, device=DEVICE)
    y_NM = kernels.grouped_mm(x_NK, strided, sizes_G.to(DEVICE))
    assert _rel_err(y_NM.cpu(), REF_GROUPED_MM(x_NK.cpu(), strided.cpu(), sizes_G)) < 1e-5
    assert launches.b_tma == [("_grouped_mm_kernel", False)]


@pytest.mark.parametrize("k, m, sizes", [
    (256, 8, [5, 0, 6, 7]),          # narrow output (LoRA's A product), an empty group
    (8, 40, [4, 4, 4, 0]),           # narrow input (LoRA's B product)
    (48, 40, [12, 1, 1, 1, 0, 1]),
    (8, 8, [0, 0, 0]),               # no rows at all
])
def test_reference_grouped_mm_matches_a_plain_loop(k, m, sizes):
    """The reference (the oracle of the Triton kernels) against autograd through a slice-per-group
    loop: output, dX and dW (through the transposed view the layers pass; zero for an empty group)."""
    torch.manual_seed(0)
    x = torch.randn(sum(sizes), k, requires_grad=True)
    w = torch.randn(len(sizes), m, k, requires_grad=True)
    y = reference.grouped_mm(x, w.transpose(1, 2), torch.tensor(sizes))
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    y2 = torch.cat([x2[lo:hi] @ w2[g].t() for g, (lo, hi) in enumerate(itertools.pairwise(bounds))])
    (y2 * dy).sum().backward()
    assert torch.allclose(y, y2, atol=1e-5)
    assert x.grad is not None and torch.allclose(x.grad, x2.grad, atol=1e-5) if sum(sizes) else True
    expected_dw = w2.grad if w2.grad is not None else torch.zeros_like(w)
    assert torch.allclose(w.grad, expected_dw, atol=1e-5)
    assert all(w.grad[g].abs().sum() == 0 for g, s in enumerate(sizes) if s == 0)


def test_group_bounds():
    sizes_G = torch.tensor([0, 1, 16, 0, 40])
    assert tgm.group_bounds(sizes_G).tolist() == [0, 0, 1, 17, 17, 57]
    assert tgm.group_bounds(sizes_G).dtype == torch.int32


def test_bad_group_sizes_raise():
    x_NK, w_GKM = torch.randn(5, 16, device=DEVICE), torch.randn(2, 16, 16, device=DEVICE)
    with pytest.raises(ValueError, match="sum to x.shape"):
        ops.grouped_mm(x_NK, w_GKM, torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="expected x"):
        ops.grouped_mm(x_NK, w_GKM, torch.tensor([5]))


@pytest.mark.skipif(ON_GPU, reason="checks the CPU error message")
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ops.grouped_mm(torch.randn(4, 16), torch.randn(1, 16, 16), torch.tensor([4]))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(tgm, "INTERPRETED", False)  # decorated without the interpreter
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ops.grouped_mm(torch.randn(4, 16), torch.randn(1, 16, 16), torch.tensor([4]))


def test_backend_switch(monkeypatch, launches):
    x_NK, w_GKM, sizes_G = torch.randn(6, 16, device=DEVICE), torch.randn(2, 16, 16, device=DEVICE), torch.tensor([2, 4])
    monkeypatch.setattr(kernels, "reference", reference)  # this test wants both paths

    monkeypatch.setenv("FLOE_KERNELS", "triton")
    assert kernels.resolve_backend(x_NK, "reference") == "reference"  # the argument wins over the environment
    kernels.grouped_mm(x_NK, w_GKM, sizes_G.to(DEVICE), backend="reference")
    assert sum(launches.values()) == 0

    assert kernels.resolve_backend(x_NK) == "triton"  # backend="auto": the environment decides
    kernels.grouped_mm(x_NK, w_GKM, sizes_G.to(DEVICE))
    assert launches["_grouped_mm_kernel"] == 1

    monkeypatch.setenv("FLOE_KERNELS", "reference")
    assert kernels.resolve_backend(x_NK) == "reference"
    monkeypatch.setenv("FLOE_KERNELS", "auto")
    assert kernels.resolve_backend(x_NK) == ("triton" if ON_GPU else "reference")
    monkeypatch.delenv("FLOE_KERNELS")
    assert kernels.resolve_backend(torch.randn(1, 1)) == "reference"  # auto: CPU -> reference

    monkeypatch.setenv("FLOE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="FLOE_KERNELS"):
        kernels.resolve_backend(x_NK)
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.grouped_mm(x_NK, w_GKM, sizes_G.to(DEVICE), backend="cutlass")


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="bf16 needs a GPU (the Triton interpreter has no bf16 dot)")
@pytest.mark.parametrize("shape", ["empty_groups", "odd_sizes", "g128_random"])
def test_bf16_on_gpu(shape, launches):
    spec, d, f = SHAPES[shape]
    sizes_G = _sizes(spec)
    num_groups, num_rows = sizes_G.numel(), int(sizes_G.sum())
    x_ND = _leaf(torch.randn(num_rows, d, device="cuda", dtype=torch.bfloat16))
    ws = [
        _leaf((torch.randn(num_groups, *s, device="cuda") / math.sqrt(s[1])).to(torch.bfloat16))
        for s in ((f, d), (f, d), (d, f))
    ]
    y_ND = kernels.grouped_swiglu(x_ND, *ws, sizes_G.cuda())
    dy_ND = torch.randn_like(y_ND)
    y_ND.backward(dy_ND)
    refs = [_leaf(p.detach().float().cpu()) for p in (x_ND, *ws)]
    y_ref = REF_GROUPED_SWIGLU(*refs, sizes_G)
    y_ref.backward(dy_ND.float().cpu())
    assert _rel_err(y_ND.float().cpu(), y_ref) < TOL[torch.bfloat16]
    for p, r in zip((x_ND, *ws), refs):
        assert _rel_err(p.grad.float().cpu(), r.grad) < TOL[torch.bfloat16]
    assert launches["_swiglu_gate_up_kernel"] == 2


@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_moe_layer_through_triton_matches_naive_loop(capacity_factor, launches):
    """MoELayer on the Triton path computes what an independent per-token loop computes."""
    from floe.config import ModelConfig
    from floe.layer import MoELayer
    from floe.testing.naive_moe import naive_moe

    torch.manual_seed(7)
    cfg = ModelConfig(vocab_size=32, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, dense_ffn=32,
                      expert_ffn=48, num_experts=8, top_k=2, capacity_factor=capacity_factor, init_std=0.2)
    layer = MoELayer(cfg).to(DEVICE)
    x = _leaf(torch.randn(37, cfg.hidden_size, device=DEVICE))
    y, stats = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)

    experts = layer.experts
    params = [_leaf(p.detach().cpu()) for p in (layer.gate.weight, experts.w1, experts.w3, experts.w2)]
    x_ref = _leaf(x.detach().cpu())
    y_ref, _, _ = naive_moe(x_ref, *params, cfg.top_k, capacity_factor, cfg.drop_policy)
    y_ref.backward(dy.cpu())
    assert _rel_err(y.cpu(), y_ref) < 1e-5
    for name, got, ref in zip(("x", "gate", "w1", "w3", "w2"),
                              (x, layer.gate.weight, experts.w1, experts.w3, experts.w2), (x_ref, *params)):
        assert _rel_err(got.grad.cpu(), ref.grad) < 1e-5, f"d{name}"
    assert launches["_swiglu_gate_up_kernel"] == 2  # the experts really ran on the Triton path
    if capacity_factor is not None:
        assert stats.dropped > 0


def test_backend_travels_with_the_model(monkeypatch, launches):
    """train.kernels reaches the experts through floe.model.apply_kernel_backend, not a module global:
    two models in one process keep their own backend, and the argument beats FLOE_KERNELS."""
    from floe.config import PRESETS
    from floe.model import ArcticForCausalLM, apply_kernel_backend

    monkeypatch.setattr(kernels, "reference", reference)  # this test wants both paths
    monkeypatch.delenv("FLOE_KERNELS")
    torch.manual_seed(0)
    cfg = PRESETS["tiny"].replace(num_layers=1)
    on_triton, on_reference = (ArcticForCausalLM(cfg).to(DEVICE) for _ in range(2))
    on_reference.load_state_dict(on_triton.state_dict())
    apply_kernel_backend(on_triton, "triton")
    apply_kernel_backend(on_reference, "reference")
    ids = torch.randint(0, cfg.vocab_size, (1, 12), device=DEVICE)

    ref_logits = on_reference(ids).logits
    assert sum(launches.values()) == 0
    monkeypatch.setenv("FLOE_KERNELS", "reference")  # the model's own choice wins over the environment
    tri_logits = on_triton(ids).logits
    assert launches["_swiglu_gate_up_kernel"] == 1
    assert _rel_err(tri_logits.float().cpu(), ref_logits.float().cpu()) < 1e-5
    with pytest.raises(ValueError, match="train.kernels must be one of"):
        apply_kernel_backend(on_triton, "cutlass")


def _model_step(backend: str, num_layers: int, dtype: torch.dtype, monkeypatch):
    """Loss and every gradient of one forward+backward of a packed batch through the tiny model, with the
    experts on `backend`; the weights come from one seed, so both backends start from the same model."""
    from floe.config import PRESETS
    from floe.model import ArcticForCausalLM, apply_kernel_backend

    counts = collections.Counter()
    counts.b_tma = []
    monkeypatch.setattr(tgm, "_swiglu_gate_up_kernel", _CountingKernel(tgm._swiglu_gate_up_kernel, "swiglu", counts))
    model = ArcticForCausalLM(PRESETS["tiny"].replace(num_layers=num_layers))
    model.reset_parameters(seed=3)
    model.to(device=DEVICE, dtype=dtype).train()
    gen = torch.Generator().manual_seed(5)
    ids_BS = torch.randint(0, model.config.vocab_size, (2, 48), generator=gen).to(DEVICE)
    pos_BS = torch.cat([torch.arange(20), torch.arange(28), torch.arange(48)]).view(2, 48).to(DEVICE)  # packed
    apply_kernel_backend(model, backend)
    out = model(ids_BS, position_ids=pos_BS, labels=ids_BS)
    out.loss.backward()
    assert counts["swiglu"] == (2 * num_layers if backend == "triton" else 0)  # fwd + bwd per layer, or none
    return out.loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}


def _assert_model_steps_match(num_layers, dtype, tol, monkeypatch):
    loss_ref, grads_ref = _model_step("reference", num_layers, dtype, monkeypatch)
    loss, grads = _model_step("triton", num_layers, dtype, monkeypatch)
    assert abs(loss.item() - loss_ref.item()) <= tol * abs(loss_ref.item())
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        assert _rel_err(grad.cpu(), grads_ref[name].cpu()) < tol, name


def test_model_step_through_triton_matches_reference(monkeypatch):
    """A training step (loss and every gradient) with the Triton experts equals the reference kernels' step
    (fp32; the interpreter on a CPU); its bf16 twin on a GPU is below."""
    _assert_model_steps_match(2, torch.float32, 1e-5, monkeypatch)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="bf16 needs a GPU (the Triton interpreter has no bf16 dot)")
def test_model_step_through_triton_matches_reference_bf16_on_gpu(monkeypatch):
    """One layer, so routing (which reads the embeddings) is identical under both backends and a bf16
    rounding cannot flip a token's experts."""
    _assert_model_steps_match(1, torch.bfloat16, TOL[torch.bfloat16], monkeypatch)
