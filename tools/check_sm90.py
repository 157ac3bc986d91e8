"""Compile every Triton expert kernel and autotune config for Hopper (sm_90a) without a GPU.

    python tools/check_sm90.py                        # all shapes, a table per call site
    python tools/check_sm90.py --shapes fine --json   # a JSON list of records
    python tools/check_sm90.py --only-may-pick        # just the configs the autotuner may choose
    python tools/check_sm90.py --no-tma               # the pointer path instead of TMA descriptors

How: the autograd ops of kernels/floe_kernels/ops.py run forward and backward on `meta` tensors (no data,
no device) with every kernel launch intercepted, so the call sites, their arguments and
strides are exactly those of a training step. Each launch is then compiled with
`triton.compile(..., target=GPUTarget("cuda", 90, 32))` for every config in its autotune list,
specialised as the Triton runtime would specialise it (divisibility by 16, strides of 1).
The PTX goes through the ptxas Triton ships (`-v`, with Triton's own flags) for registers,
spill stores/loads and stack; the cubin through nvdisasm to see whether spills (LDL/STL)
sit inside the main loop (a loop holding the tensor-core instructions) and whether wgmma
(HGMMA) and TMA (UTMALDG) are used.

A record per (kernel, call site, shape, config): `launchable` (shared memory within the
227 KiB an sm_90 block may opt into, registers * threads within the 64K register file),
`may_pick` (the config survives the kernel's `prune_configs_by`, so the autotuner may choose
it), `main_loop_spills` (LDL/STL instructions inside a main loop), `tma` (UTMALDG in the SASS).
Exit status 1 when a config the autotuner may pick spills anywhere (main loop or epilogue)
or cannot launch.

The launches are traced as on Hopper: weights through TMA descriptors
(kernels/floe_kernels/triton_grouped_mm.py `weight_operand`); `--no-tma` traces the pointer path, which
the kernels take when a weight's layout does not allow a descriptor (and before sm_90).

Shape legend: G experts, D hidden, F expert ffn, N routed rows.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("check_sm90: unset TRITON_INTERPRET; it compiles kernels, the interpreter only runs them")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from floe.kernels import ops  # noqa: E402
from floe.kernels import triton_grouped_mm as tgm  # noqa: E402
from floe.kernels import triton_host  # noqa: E402

# name: (G experts, D hidden, F expert ffn, N routed rows), bf16
SHAPES = {
    "arctic_ep8": (16, 7168, 4864, 8192),  # one rank of Arctic under 8-way expert parallelism
    "arctic": (128, 7168, 4864, 65536),  # all 128 Arctic experts on one device
    "fine": (128, 2048, 768, 32768),  # fine-grained MoE: many small experts
}
TARGET = GPUTarget("cuda", 90, 32)
# Triton runs ptxas with -v and prints its log when asked: compile_config captures it, so each
# binary goes through ptxas once, not twice.
triton.knobs.nvidia.dump_ptxas_log = True
MAX_SHARED_BYTES = triton_host.MAX_SHARED_BYTES  # per-block opt-in limit of sm_90
REGISTER_FILE = 64 * 1024  # 32-bit registers per SM
MMA_OPS = ("HGMMA", "HMMA")
TMA_OPS = ("UTMALDG", "UTMASTG")

CALL_SITES = ops.CALL_SITES


@dataclasses.dataclass
class Launch:
    site: str
    kernel: str
    autotuner: object
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for an autotuned kernel: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, name: str, autotuner, launches: list):
        self.name, self.autotuner, self.launches = name, autotuner, launches

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launches.append(Launch("", self.name, self.autotuner, args, kwargs))

        return record


def trace_launches(shape: str, tma: bool = True) -> list[Launch]:
    """Every kernel launch of a forward and backward of both ops at `shape`, on meta tensors,
    with the weights read through TMA descriptors as on Hopper (`tma`) or through pointers."""
    num_groups, d, f, num_rows = SHAPES[shape]
    sizes_G = torch.full((num_groups,), num_rows // num_groups, dtype=torch.long)
    sizes_G[: num_rows - int(sizes_G.sum())] += 1
    meta = dict(device="meta", dtype=torch.bfloat16)
    launches: list[Launch] = []
    patches = [mock.patch.object(tgm, name, _Recorder(name, getattr(tgm, name), launches)) for name in tgm.KERNELS]
    patches.append(mock.patch.object(tgm, "interpreting", lambda: True))  # meta tensors pass the device check
    patches.append(mock.patch.object(triton_host, "FORCE_TMA", tma))  # meta tensors have no compute capability
    for p in patches:
        p.start()
    try:
        traced = []
        x = torch.empty(num_rows, d, **meta, requires_grad=True)
        w_GFD = torch.empty(num_groups, f, d, **meta, requires_grad=True)  # [G, out, in] like the layer
        start = len(launches)
        ops.grouped_mm(x, w_GFD.transpose(1, 2), sizes_G).backward(torch.empty(num_rows, f, **meta))
        traced.append(("grouped_mm", start))
        w1, w3 = (torch.empty(num_groups, f, d, **meta, requires_grad=True) for _ in range(2))
        w2 = torch.empty(num_groups, d, f, **meta, requires_grad=True)
        start = len(launches)
        ops.grouped_swiglu(x, w1, w3, w2, sizes_G).backward(torch.empty(num_rows, d, **meta))
        traced.append(("grouped_swiglu", start))
    finally:
        for p in reversed(patches):
            p.stop()
    for (op, start), end in zip(traced, [s for _, s in traced[1:]] + [len(launches)]):
        names = CALL_SITES[op]
        assert end - start == len(names), f"{op}: {end - start} launches, expected {names}"
        for launch, site in zip(launches[start:end], names):
            launch.site = site
    return launches


# --------------------------------------------------------------------------- compile


def _tool(name: str) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(TARGET.arch).path
    return ptxas if name == "ptxas" else os.path.join(os.path.dirname(ptxas), name)


def compile_config(launch: Launch, config: triton.Config):
    """Compile `launch` with `config` for sm_90a as the runtime would; returns the CompiledKernel
    and the `ptxas -v` log of Triton's own ptxas run ("" when Triton's cache served the binary)."""
    jit = launch.autotuner.fn
    backend = make_backend(TARGET)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    kwargs = {**launch.kwargs, **config.all_kwargs()}
    if config.pre_hook is not None:  # sets the TMA block shapes, as the autotuner does before a launch
        config.pre_hook({**dict(zip(launch.autotuner.arg_names, launch.args)), **kwargs})
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound_args, specialization, options)
    src = ASTSource(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # the ptxas log Triton prints (dump_ptxas_log, set above)
        kernel = triton.compile(src, target=TARGET, options=options.__dict__)
    return kernel, log.getvalue()


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def parse_ptxas_log(log: str) -> dict | None:
    """Registers, stack and spill bytes from a `ptxas -v` log; None if it reports no registers."""
    if not _PTXAS_RE["regs"].search(log):
        return None
    return {key: int(m.group(1)) if (m := rx.search(log)) else 0 for key, rx in _PTXAS_RE.items()}


def ptxas_report(ptx: str) -> dict:
    """Registers, stack and spill bytes from `ptxas -v` with the flags Triton compiles with."""
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as fh:
            fh.write(ptx)
        proc = subprocess.run(
            [_tool("ptxas"), "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{TARGET.arch}a", src, "-o", out],
            capture_output=True, text=True, check=True,
        )
    return parse_ptxas_log(proc.stdout + proc.stderr)


_SASS_RE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_LABEL_RE = re.compile(r"^(\.L_x_\d+):")
_BRANCH_RE = re.compile(r"BRA\s+`\((\.L_x_\d+)\)")


def sass_report(cubin: bytes) -> dict:
    """Tensor-core and TMA use, and spill instructions inside the main loops of the SASS.

    A loop is the span from a label back to a branch that jumps up to it; a main loop is a
    loop that holds a tensor-core instruction and no smaller such loop."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
    instrs, labels, loops = [], {}, []
    for line in sass.splitlines():
        if m := _LABEL_RE.match(line.strip()):
            labels[m.group(1)] = len(instrs)
        elif m := _SASS_RE.search(line):
            instrs.append(m.group(2))
            if (b := _BRANCH_RE.search(m.group(2))) and b.group(1) in labels:
                loops.append((labels[b.group(1)], len(instrs) - 1))
    has_mma = [any(op in ins for op in MMA_OPS) for ins in instrs]
    mma_loops = [(lo, hi) for lo, hi in loops if any(has_mma[lo:hi + 1])]
    main = [(lo, hi) for lo, hi in mma_loops
            if not any((l2, h2) != (lo, hi) and lo <= l2 and h2 <= hi for l2, h2 in mma_loops)]
    is_spill = [re.match(r"(@!?U?P\w+\s+)?(LDL|STL)\b", ins) is not None for ins in instrs]
    return {
        "wgmma": any("HGMMA" in ins for ins in instrs),
        "tma": any(op in ins for ins in instrs for op in TMA_OPS),
        "spill_instrs": sum(is_spill),
        "main_loop_spills": sum(sum(is_spill[lo:hi + 1]) for lo, hi in main),
        "main_loops": len(main),
    }


def _config_str(config: triton.Config) -> str:
    meta = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{meta} w={config.num_warps} s={config.num_stages}"


def check_launch(launch: Launch, shape: str, cache: dict, only_may_pick: bool = False) -> list[dict]:
    """One record per autotune config of `launch` (per config that survives pruning)."""
    tuner = launch.autotuner
    named = dict(zip(tuner.arg_names, launch.args))
    named.update(launch.kwargs)
    picks = tgm.prune_for(launch.kernel)(tuner.configs, named)
    records = []
    for config in tuner.configs:
        may_pick = any(config is p for p in picks)
        if only_may_pick and not may_pick:
            continue
        kernel, log = compile_config(launch, config)
        key = kernel.hash  # the same binary at another call site or shape is reported, not re-analysed
        if key not in cache:
            ptxas = parse_ptxas_log(log) or ptxas_report(kernel.asm["ptx"])
            cache[key] = {**ptxas, **sass_report(kernel.asm["cubin"]), "smem_bytes": kernel.metadata.shared}
        rep = cache[key]
        threads = 32 * config.num_warps
        launchable = rep["smem_bytes"] <= MAX_SHARED_BYTES and rep["regs"] * threads <= REGISTER_FILE
        records.append({
            "kernel": launch.kernel, "site": launch.site, "shape": shape, "config": _config_str(config),
            "block_m": config.kwargs.get("BLOCK_M"), "regs": rep["regs"],
            "spill_bytes": {"stores": rep["spill_stores"], "loads": rep["spill_loads"]},
            "stack_bytes": rep["stack"], "smem_bytes": rep["smem_bytes"], "launchable": launchable,
            "may_pick": may_pick, "main_loop_spills": rep["main_loop_spills"],
            "spill_instrs": rep["spill_instrs"],
            "wgmma": rep["wgmma"], "tma": rep["tma"],
        })
    return records


def problem(record: dict) -> str | None:
    """Why a config the autotuner may pick is not acceptable: it cannot launch, or it spills
    anywhere (ptxas spill bytes or LDL/STL in the SASS, main loop or epilogue); else None."""
    if not record["may_pick"]:
        return None
    if not record["launchable"]:
        return "cannot launch"
    sp = record["spill_bytes"]
    if sp["stores"] or sp["loads"] or record["spill_instrs"]:
        return (f"spills {sp['stores']}/{sp['loads']} bytes ({record['spill_instrs']} LDL/STL, "
                f"{record['main_loop_spills']} in the main loop)")
    return None


def run(shapes: list[str], progress=None, only_may_pick: bool = False, tma: bool = True) -> list[dict]:
    cache: dict = {}
    records = []
    for shape in shapes:
        for launch in trace_launches(shape, tma):
            if progress:
                progress(f"{shape} {launch.site} ({launch.kernel}, {len(launch.autotuner.configs)} configs)")
            records += check_launch(launch, shape, cache, only_may_pick)
    return records


def print_table(records: list[dict]) -> None:
    print(f"{'shape':11} {'site':19} {'config':54} {'regs':>4} {'spill st/ld':>11} {'loop':>4} "
          f"{'smem KiB':>8} {'launch':>6} {'pick':>4} {'wgmma':>5} {'tma':>3}")
    for r in records:
        sp = r["spill_bytes"]
        print(f"{r['shape']:11} {r['site']:19} {r['config']:54} {r['regs']:4d} "
              f"{sp['stores']:5d}/{sp['loads']:<5d} {r['main_loop_spills']:4d} {r['smem_bytes'] / 1024:8.1f} "
              f"{'yes' if r['launchable'] else 'NO':>6} {'yes' if r['may_pick'] else '-':>4} "
              f"{'yes' if r['wgmma'] else '-':>5} {'yes' if r['tma'] else '-':>3}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--json", action="store_true", help="print a JSON list of records instead of a table")
    parser.add_argument("--only-may-pick", action="store_true",
                        help="compile and report only the configs that survive pruning")
    parser.add_argument("--no-tma", action="store_true",
                        help="the pointer path (weights not TMA-aligned, or before sm_90) instead of TMA descriptors")
    args = parser.parse_args(argv)
    progress = None if args.json else (lambda msg: print(f"compiling {msg}", file=sys.stderr, flush=True))
    records = run(args.shapes, progress, args.only_may_pick, tma=not args.no_tma)
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        print_table(records)
    failures = [(r, why) for r in records if (why := problem(r))]
    for r, why in failures:
        print(f"check_sm90: {r['shape']} {r['site']} {r['config']} may be picked but {why}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
