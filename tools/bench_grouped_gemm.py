"""Benchmark floe's Triton grouped GEMM against torch._grouped_mm, a per-expert loop and a dense GEMM.

    python tools/bench_grouped_gemm.py                      # both shapes, uniform and skewed routing
    python tools/bench_grouped_gemm.py --shapes arctic_ep8 --routings skewed --json out.jsonl

bf16 on one CUDA GPU; medians of triton.testing.do_bench (CUDA events). For each shape and
routing it times one expert projection y = x W_g (weights stored [G, out, in] and read as
transposed views, as the MoE layer does), forward and forward+backward (dX and dW), for:
  ours     kernels.ops.grouped_mm (Triton)
  torch    torch._grouped_mm (CUTLASS grouped GEMM; int32 cumulative offsets)
  loop     kernels.reference.grouped_mm (one torch.mm per expert)
  dense    one torch.mm with the same FLOPs: the ceiling
then each op alone (fwd, dX, dW: ours through the raw launchers, torch through _grouped_mm),
each checked against the per-expert reference (relative error < 2e-2, else the row is an
error), and then the whole expert SwiGLU MLP: ours (kernels.ops.grouped_swiglu, fused gate/up,
recompute in backward: 11 GEMMs of work) against three torch._grouped_mm calls with
silu * up between them (9 GEMMs, activations kept), with the peak memory of forward+backward.
TFLOP/s use the FLOPs each variant executes; `useful` TFLOP/s the 9 GEMMs of the math.
The config the autotuner chose at each Triton call site (kernels.ops.CALL_SITES: mm.fwd,
mm.dX, mm.dW, swiglu.fwd.gate_up ... swiglu.bwd.dW13), with whether its weights went through
TMA descriptors, is printed and kept in --json.
Without a GPU it says so and measures nothing (exit 0). tools/gpu_check.py imports the bench_*
functions; its CPU rehearsal runs them at a toy shape with DEVICE = "cpu" (a host timer and the
op-level memory tracker then stand in for CUDA events and the allocator's peak).

Shape legend: N routed rows, K input width, M output width, G local experts, D hidden, F expert ffn.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEVICE = "cuda"
DTYPE = torch.bfloat16

# name: (G local experts, K in, M out, N routed rows)
SHAPES = {
    # Arctic experts as one rank sees them under 8-way expert parallelism: 128 / 8 = 16 local
    # experts, hidden 7168 -> expert ffn 4864, 512 rows per expert on average.
    "arctic_ep8": (16, 7168, 4864, 16 * 512),
    # all 128 Arctic experts on one device, 512 rows each on average.
    "arctic": (128, 7168, 4864, 128 * 512),
    # fine-grained MoE: many small experts.
    "fine": (128, 2048, 768, 32768),
}


def group_sizes_for(routing: str, num_groups: int, num_rows: int, seed: int = 0) -> torch.Tensor:
    """Rows per expert: exactly even, or skewed (Zipf-like popularity, multinomial draws)."""
    if routing == "uniform":
        sizes = torch.full((num_groups,), num_rows // num_groups, dtype=torch.long)
        sizes[: num_rows - int(sizes.sum())] += 1
        return sizes
    gen = torch.Generator().manual_seed(seed)
    popularity = 1.0 / torch.arange(1, num_groups + 1, dtype=torch.float64) ** 1.2
    popularity = popularity[torch.randperm(num_groups, generator=gen)]
    picks = torch.multinomial(popularity, num_rows, replacement=True, generator=gen)
    return torch.bincount(picks, minlength=num_groups)


TOL = 2e-2  # bf16 relative error against the reference


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


@contextlib.contextmanager
def recording_configs():
    """Yields a list that receives (kernel, config) for every Triton kernel launch inside: the
    config its autotuner chose for that launch (tuned, or from its cache), with the TMA flag."""
    from floe.kernels import triton_grouped_mm as tgm

    seen: list[tuple[str, str]] = []

    class _Recorder:
        def __init__(self, name, tuner):
            self.name, self.tuner = name, tuner

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                out = self.tuner[grid](*args, **kwargs)
                best = self.tuner.best_config  # set by this launch
                meta = " ".join(f"{k}={v}" for k, v in best.kwargs.items())
                tma = f" tma={kwargs['B_TMA']}" if "B_TMA" in kwargs else ""
                seen.append((self.name, f"{meta} w={best.num_warps} s={best.num_stages}{tma}"))
                return out

            return launch

    with contextlib.ExitStack() as stack:
        for name in tgm.KERNELS:
            stack.enter_context(mock.patch.object(tgm, name, _Recorder(name, getattr(tgm, name))))
        yield seen


def configs_per_site(op: str, run) -> dict[str, str]:
    """{call site: chosen config} for one forward and backward of `op` ("grouped_mm",
    "grouped_swiglu"), the call sites named as in kernels.ops.CALL_SITES."""
    from floe.kernels import ops

    with recording_configs() as seen:
        run()
    sites = ops.CALL_SITES[op]
    if len(seen) != len(sites):
        raise AssertionError(f"{op}: {len(seen)} launches {[k for k, _ in seen]}, expected {sites}")
    return {site: config for site, (_, config) in zip(sites, seen)}


def bench_ops(shape: str, routing: str) -> list[dict]:
    """fwd, dX and dW of one projection alone: ours (raw launchers) and torch._grouped_mm, each
    checked against the per-expert reference before it is timed."""
    from floe.kernels import reference
    from floe.kernels import triton_grouped_mm as tgm

    num_groups, k, m, num_rows = SHAPES[shape]
    dev, dt = DEVICE, DTYPE
    sizes_G = group_sizes_for(routing, num_groups, num_rows)
    sizes_dev_G = sizes_G.to(dev)
    offs_G = torch.cumsum(sizes_dev_G, 0).to(torch.int32)
    bounds_G1 = tgm.group_bounds(sizes_dev_G)
    x_NK = torch.randn(num_rows, k, device=dev, dtype=dt)
    w_GMK = torch.randn(num_groups, m, k, device=dev, dtype=dt) / k**0.5  # [G, out, in]
    dy_NM = torch.randn(num_rows, m, device=dev, dtype=dt)
    w_GKM = w_GMK.transpose(1, 2)
    # The reference: one torch.mm per expert (forward, and its hand-written backward).
    x_ref, w_ref = x_NK.clone().requires_grad_(True), w_GKM.detach().clone().requires_grad_(True)
    y_ref = reference.grouped_mm(x_ref, w_ref, sizes_G)
    y_ref.backward(dy_NM)
    refs = {"fwd": y_ref, "dX": x_ref.grad, "dW": w_ref.grad}
    impls = {
        "ours": {
            "fwd": lambda: tgm.grouped_mm_fwd(x_NK, w_GKM, bounds_G1),
            "dX": lambda: tgm.grouped_mm_fwd(dy_NM, w_GMK, bounds_G1),
            "dW": lambda: tgm.grouped_mm_dw(x_NK, dy_NM, w_GKM, bounds_G1)[0],
        },
        "torch": {
            "fwd": lambda: torch._grouped_mm(x_NK, w_GKM, offs=offs_G),
            "dX": lambda: torch._grouped_mm(dy_NM, w_GMK, offs=offs_G),
            "dW": lambda: torch._grouped_mm(x_NK.t(), dy_NM, offs=offs_G),
        },
    }
    flops = 2.0 * num_rows * k * m  # each of fwd, dX, dW
    rows = []
    for impl, fns in impls.items():
        for op, fn in fns.items():
            row = {"impl": impl, "op": f"mm.{op}", "shape": shape, "routing": routing}
            try:
                with recording_configs() as seen:
                    err = _rel_err(fn(), refs[op])
                row["rel_err_vs_ref"] = err
                if not err < TOL:
                    raise AssertionError(f"relative error {err:.2e} >= {TOL} against the reference")
                ms = _median_ms(fn)
                row.update(ms=ms, tflops=flops / ms / 1e9)
                if impl == "ours":
                    row["config"] = seen[-1][1]  # one launch: this call site's config
            except Exception as e:  # noqa: BLE001  (one failure must not hide the other numbers)
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            rows.append(row)
    return rows


def _peak_bytes(fn) -> int:
    """Peak memory allocated above the starting point while `fn` runs (on a CPU, for
    tools/gpu_check.py's rehearsal, the op-level tracker of floe.plan.tensor_memory)."""
    if DEVICE == "cpu":
        from floe.plan.tensor_memory import PeakMemoryTracker

        with PeakMemoryTracker() as mem:
            fn()
        return mem.peak_bytes
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def _median_ms(fn, grad_to_none=None) -> float:
    if DEVICE == "cpu":  # tools/gpu_check.py's rehearsal: no CUDA events; a host timer, a few runs
        return _host_median_ms(fn, grad_to_none)
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, return_mode="median")


def _host_median_ms(fn, grad_to_none=None, runs: int = 1) -> float:
    """Host wall time of fn (one run by default: on a CPU this only rehearses the GPU benchmark)."""
    times = []
    for _ in range(runs):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _measure(name, forward, leaves, dy, flops_fwd, rows, ref_out):
    """Time forward and forward+backward of `forward()`; append a result row (or its error)."""
    row = {"impl": name}
    out = None
    try:
        with torch.no_grad():
            out = forward()
        row["rel_err_vs_torch"] = (
            ((out.float() - ref_out.float()).norm() / ref_out.float().norm()).item() if ref_out is not None else None
        )

        def fwd_bwd():
            forward().backward(dy)

        fwd_bwd()  # autotuning and allocator warm-up outside the timed region
        with torch.no_grad():
            ms_fwd = _median_ms(forward)
        ms_fb = _median_ms(fwd_bwd, grad_to_none=leaves)
        row.update(
            fwd_ms=ms_fwd, fwd_tflops=flops_fwd / ms_fwd / 1e9,
            fwd_bwd_ms=ms_fb, fwd_bwd_tflops=3 * flops_fwd / ms_fb / 1e9,
        )
    except Exception as e:  # noqa: BLE001  (one failing implementation must not hide the others' numbers)
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    rows.append(row)
    return None if "error" in row else out


def bench_grouped_mm(shape: str, routing: str) -> list[dict]:
    from floe.kernels import ops, reference

    num_groups, k, m, num_rows = SHAPES[shape]
    dev, dt = DEVICE, DTYPE
    sizes_G = group_sizes_for(routing, num_groups, num_rows)
    sizes_dev_G = sizes_G.to(dev)
    offs_G = torch.cumsum(sizes_dev_G, 0).to(torch.int32)  # torch._grouped_mm: int32 cumulative ends
    x_NK = torch.randn(num_rows, k, device=dev, dtype=dt, requires_grad=True)
    w_GMK = (torch.randn(num_groups, m, k, device=dev, dtype=dt) / k**0.5).requires_grad_(True)  # [G, out, in]
    w_dense_MK = (torch.randn(m, k, device=dev, dtype=dt) / k**0.5).requires_grad_(True)
    dy_NM = torch.randn(num_rows, m, device=dev, dtype=dt)
    flops = 2.0 * num_rows * k * m
    leaves = [x_NK, w_GMK]

    rows: list[dict] = []
    ref = _measure("torch", lambda: torch._grouped_mm(x_NK, w_GMK.transpose(1, 2), offs=offs_G),
                   leaves, dy_NM, flops, rows, None)
    ours = _measure("ours", lambda: ops.grouped_mm(x_NK, w_GMK.transpose(1, 2), sizes_dev_G),
                    leaves, dy_NM, flops, rows, ref)
    if ours is not None:
        rows[-1]["config"] = configs_per_site(
            "grouped_mm", lambda: ops.grouped_mm(x_NK, w_GMK.transpose(1, 2), sizes_dev_G).backward(dy_NM))
    # The loop gets its sizes on the host, so it pays no device-to-host sync per call.
    _measure("loop", lambda: reference.grouped_mm(x_NK, w_GMK.transpose(1, 2), sizes_G),
             leaves, dy_NM, flops, rows, ref)
    _measure("dense", lambda: x_NK @ w_dense_MK.t(), [x_NK, w_dense_MK], dy_NM, flops, rows, None)
    for r in rows:
        r.update(shape=shape, routing=routing, op="grouped_mm", G=num_groups, K=k, M=m, N=num_rows,
                 max_rows=int(sizes_G.max()), empty_groups=int((sizes_G == 0).sum()))
    return rows


def bench_swiglu(shape: str, routing: str) -> list[dict]:
    from floe.kernels import ops

    num_groups, d, f, num_rows = SHAPES[shape]
    dev, dt = DEVICE, DTYPE
    sizes_G = group_sizes_for(routing, num_groups, num_rows)
    sizes_dev_G = sizes_G.to(dev)
    offs_G = torch.cumsum(sizes_dev_G, 0).to(torch.int32)
    x_ND = torch.randn(num_rows, d, device=dev, dtype=dt, requires_grad=True)
    w1_GFD = (torch.randn(num_groups, f, d, device=dev, dtype=dt) / d**0.5).requires_grad_(True)
    w3_GFD = (torch.randn(num_groups, f, d, device=dev, dtype=dt) / d**0.5).requires_grad_(True)
    w2_GDF = (torch.randn(num_groups, d, f, device=dev, dtype=dt) / f**0.5).requires_grad_(True)
    dy_ND = torch.randn(num_rows, d, device=dev, dtype=dt)
    flops = 3 * 2.0 * num_rows * d * f
    leaves = [x_ND, w1_GFD, w3_GFD, w2_GDF]

    def torch_swiglu():
        gate = torch._grouped_mm(x_ND, w1_GFD.transpose(1, 2), offs=offs_G)
        up = torch._grouped_mm(x_ND, w3_GFD.transpose(1, 2), offs=offs_G)
        return torch._grouped_mm(torch.nn.functional.silu(gate) * up, w2_GDF.transpose(1, 2), offs=offs_G)

    def ours_swiglu():
        return ops.grouped_swiglu(x_ND, w1_GFD, w3_GFD, w2_GDF, sizes_dev_G)

    rows: list[dict] = []
    ref = _measure("torch", torch_swiglu, leaves, dy_ND, flops, rows, None)
    _measure("ours", ours_swiglu, leaves, dy_ND, flops, rows, ref)
    grads = {}
    for r, fn in zip(rows, (torch_swiglu, ours_swiglu)):
        if "error" in r:
            continue
        for p in leaves:
            p.grad = None
        r["peak_fwd_bwd_bytes"] = _peak_bytes(lambda: fn().backward(dy_ND))
        grads[r["impl"]] = [p.grad.clone() for p in leaves]
        # Executed GEMMs: 3 forward; backward 6 (torch) or 8 (ours: dH and the gate/up recompute).
        r["fwd_bwd_tflops_executed"] = r["fwd_bwd_tflops"] * (11 / 9 if r["impl"] == "ours" else 1.0)
        if r["impl"] == "ours":
            r["config"] = configs_per_site("grouped_swiglu", lambda: fn().backward(dy_ND))
    if "ours" in grads and "torch" in grads:
        errs = [_rel_err(a, b) for a, b in zip(grads["ours"], grads["torch"])]
        rows[-1]["grad_rel_err_vs_torch"] = max(errs)
        if not max(errs) < TOL:
            rows[-1]["error"] = f"gradients differ from torch: relative errors {errs}"
    for r in rows:
        r.update(shape=shape, routing=routing, op="swiglu", G=num_groups, K=d, M=f, N=num_rows,
                 max_rows=int(sizes_G.max()), empty_groups=int((sizes_G == 0).sum()))
    return rows


def _print_table(rows: list[dict]) -> None:
    dense = {(r["shape"], r["routing"]): r for r in rows if r["impl"] == "dense" and "error" not in r}
    print(f"{'op':10} {'shape':10} {'routing':8} {'impl':6} {'fwd ms':>8} {'TFLOP/s':>8} "
          f"{'f+b ms':>8} {'TFLOP/s':>8} {'%dense':>7} {'err':>8}")
    for r in rows:
        head = f"{r['op']:10} {r['shape']:10} {r['routing']:8} {r['impl']:6}"
        if "error" in r:
            print(f"{head} error: {r['error']}")
            continue
        d = dense.get((r["shape"], r["routing"]))
        pct = f"{100 * r['fwd_bwd_tflops'] / d['fwd_bwd_tflops']:6.0f}%" if d and r["op"] == "grouped_mm" else "      -"
        err = f"{r['rel_err_vs_torch']:.1e}" if r.get("rel_err_vs_torch") is not None else "-"
        extra = ""
        if "peak_fwd_bwd_bytes" in r:
            extra = (f"  peak {r['peak_fwd_bwd_bytes'] / 2**30:.2f} GiB, executed "
                     f"{r['fwd_bwd_tflops_executed']:.1f} TFLOP/s")
        print(f"{head} {r['fwd_ms']:8.3f} {r['fwd_tflops']:8.1f} {r['fwd_bwd_ms']:8.3f} "
              f"{r['fwd_bwd_tflops']:8.1f} {pct} {err:>8}{extra}")
        for site, config in r.get("config", {}).items():  # the chosen config per call site
            print(f"    {site:20} {config}")


def _print_ops(rows: list[dict]) -> None:
    print(f"\n{'op':8} {'shape':10} {'routing':8} {'impl':6} {'ms':>8} {'TFLOP/s':>8} {'err':>8}  config")
    for r in rows:
        head = f"{r['op']:8} {r['shape']:10} {r['routing']:8} {r['impl']:6}"
        if "error" in r:
            print(f"{head} error: {r['error']}")
            continue
        print(f"{head} {r['ms']:8.3f} {r['tflops']:8.1f} {r['rel_err_vs_ref']:8.1e}  {r.get('config', '')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--routings", nargs="+", choices=["uniform", "skewed"], default=["uniform", "skewed"])
    parser.add_argument("--no-swiglu", action="store_true", help="only the single grouped GEMM")
    parser.add_argument("--json", help="append one JSON object per result row to this file")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_grouped_gemm: needs a CUDA GPU and none is visible; measuring nothing.")
        return 0
    from floe.kernels import interpreter_enabled

    if interpreter_enabled():
        print("bench_grouped_gemm: unset TRITON_INTERPRET; the interpreter would be timed, not the kernels.")
        return 1
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name} (sm_{props.major}{props.minor}), torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}, bf16")

    rows: list[dict] = []
    op_rows: list[dict] = []
    for shape in args.shapes:
        for routing in args.routings:
            sizes = group_sizes_for(routing, SHAPES[shape][0], SHAPES[shape][3])
            print(f"[{shape} {routing}] G={SHAPES[shape][0]} K={SHAPES[shape][1]} M={SHAPES[shape][2]} "
                  f"N={SHAPES[shape][3]}; rows per expert min {int(sizes.min())} max {int(sizes.max())}", flush=True)
            rows += bench_grouped_mm(shape, routing)
            op_rows += bench_ops(shape, routing)
            if not args.no_swiglu:
                rows += bench_swiglu(shape, routing)
            torch.cuda.empty_cache()
    _print_table(rows)
    _print_ops(op_rows)
    rows += op_rows
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps({"device": props.name, **r}) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
