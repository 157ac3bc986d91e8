"""The steps of tools/gpu_check.py. Each runs in a process of its own (`python tools/gpu_check.py
--step NAME`), so a crash, a hang or a CUDA error in one is recorded and the next still runs.

A step gets a `Step` context: `rehearse` (the CPU stand-ins: Triton interpreter at toy shapes, fp32,
dense-mask attention, model=tiny), a scratch directory, and `check(name, ok, detail)` (a correctness
check: any failed one makes gpu_check exit non-zero) and `figures` (measurements, never a verdict).

Shape legend: N routed rows, K input width, M output width, G local experts, D hidden, F expert ffn.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The rehearsal's stand-in for bench_grouped_gemm's Arctic EP=8 shape: (G, K, M, N), tiles of the
# interpreter config (16 x 32 x 32) cut unevenly.
REHEARSAL_SHAPE = (6, 48, 40, 96)
KERNEL_SHAPE = "arctic_ep8"  # tools/bench_grouped_gemm.py SHAPES: 16 experts, 7168 -> 4864, 8192 rows
FP32_TOL = 1e-4  # the rehearsal's fp32 interpreter against the fp32 reference


class Step:
    """What a step function gets, and what it hands back (`to_json`)."""

    def __init__(self, name: str, rehearse: bool, work_dir: str):
        self.name, self.rehearse, self.work_dir = name, rehearse, work_dir
        self.checks: list[dict] = []
        self.figures: dict = {}
        self.notes: list[str] = []
        self.device = "cpu" if rehearse else "cuda"

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append({"name": name, "ok": bool(ok), "detail": detail})
        return bool(ok)

    def not_available(self, why: str) -> None:
        self.figures["not_available"] = why

    def to_json(self) -> dict:
        return {"checks": self.checks, "figures": self.figures, "notes": self.notes}


# ----------------------------------------------------------------------------- kernels


def ragged_sizes(num_groups: int, num_rows: int, seed: int = 0) -> torch.Tensor:
    """bench_grouped_gemm's skewed (Zipf-like) routing made ragged: the quarter least popular experts
    get no rows and the next one a single row; their rows go to the most popular expert."""
    from tools.bench_grouped_gemm import group_sizes_for

    sizes_G = group_sizes_for("skewed", num_groups, num_rows, seed).clone()
    order = torch.argsort(sizes_G, stable=True)  # least popular first
    num_empty = max(1, num_groups // 4)
    freed = int(sizes_G[order[:num_empty]].sum()) + int(sizes_G[order[num_empty]]) - 1
    sizes_G[order[:num_empty]] = 0
    sizes_G[order[num_empty]] = 1
    sizes_G[order[-1]] += freed
    return sizes_G


def _kernel_setup(step: Step):
    from tools import bench_grouped_gemm as bench

    if step.rehearse:
        return REHEARSAL_SHAPE, torch.float32, FP32_TOL
    num_groups, k, m, num_rows = bench.SHAPES[KERNEL_SHAPE]
    return (num_groups, k, m, num_rows), torch.bfloat16, bench.TOL


def _grad_leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _forward_backward(fn, leaves, dy):
    """(output, [grad of each leaf]) of fn(*leaves) with upstream gradient dy."""
    for t in leaves:
        t.grad = None
    out = fn(*leaves)
    out.backward(dy)
    return out.detach(), [t.grad for t in leaves]


def _compare(step: Step, label: str, names, got, refs, tol: float) -> None:
    from tools.bench_grouped_gemm import _rel_err

    for name, a, b in zip(names, got, refs):
        err = _rel_err(a, b)
        step.check(f"{label} {name}", err < tol and bool(torch.isfinite(a).all()), f"relative error {err:.2e} (< {tol:g})")


def _torch_grouped_mm_works(x, w, offs) -> str | None:
    """None if torch._grouped_mm runs here, else why not (it needs sm_90+ and bf16 on CUDA)."""
    if not hasattr(torch, "_grouped_mm"):
        return "torch._grouped_mm is not in this torch"
    try:
        torch._grouped_mm(x[:1].detach(), w.detach(), offs=torch.ones_like(offs))
    except Exception as e:  # noqa: BLE001  (its absence is a figure, not a failure of floe)
        return f"torch._grouped_mm: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def _check_grouped_mm(step: Step, routing: str, sizes_G, dims, dtype, tol) -> None:
    from floe import kernels
    from floe.kernels import reference
    from tools.bench_grouped_gemm import configs_per_site

    num_groups, k, m, num_rows = dims
    dev = step.device
    x_NK = torch.randn(num_rows, k, device=dev).to(dtype)
    w_GMK = (torch.randn(num_groups, m, k, device=dev) / k**0.5).to(dtype)  # [G, out, in], read transposed
    dy_NM = torch.randn(num_rows, m, device=dev).to(dtype)
    sizes_dev_G, offs_G = sizes_G.to(dev), torch.cumsum(sizes_G, 0).to(device=dev, dtype=torch.int32)
    leaves = _grad_leaves(x_NK, w_GMK)
    ours: dict = {}

    def run():
        ours["out"] = _forward_backward(
            lambda x, w: kernels.grouped_mm(x, w.transpose(1, 2), sizes_dev_G, backend="triton"), leaves, dy_NM)

    step.figures.setdefault("configs", {})[f"grouped_mm {routing}"] = configs_per_site("grouped_mm", run)
    y, (dx, dw) = ours["out"]
    names = ("fwd", "dX", "dW")
    ref_leaves = _grad_leaves(x_NK.float(), w_GMK.float())
    ref = _forward_backward(lambda x, w: reference.grouped_mm(x, w.transpose(1, 2), sizes_G), ref_leaves, dy_NM.float())
    _compare(step, f"grouped_mm {routing} vs reference:", names, (y, dx, dw), (ref[0], *ref[1]), tol)
    empty = sizes_G == 0
    if empty.any():
        step.check(f"grouped_mm {routing}: dW of the {int(empty.sum())} empty experts is zero",
                   bool((dw[empty.to(dev)] == 0).all()), "no rows, no gradient")
    why = _torch_grouped_mm_works(x_NK, w_GMK.transpose(1, 2), offs_G)
    if why:
        step.notes.append(why)
        return
    tg = _forward_backward(lambda x, w: torch._grouped_mm(x, w.transpose(1, 2), offs=offs_G), _grad_leaves(x_NK, w_GMK),
                           dy_NM)
    _compare(step, f"grouped_mm {routing} vs torch._grouped_mm:", names, (y, dx, dw), (tg[0], *tg[1]), tol)


def _torch_swiglu(offs_G):
    def fn(x_ND, w1_GFD, w3_GFD, w2_GDF):
        gate = torch._grouped_mm(x_ND, w1_GFD.transpose(1, 2), offs=offs_G)
        up = torch._grouped_mm(x_ND, w3_GFD.transpose(1, 2), offs=offs_G)
        return torch._grouped_mm(torch.nn.functional.silu(gate) * up, w2_GDF.transpose(1, 2), offs=offs_G)

    return fn


def _check_swiglu(step: Step, routing: str, sizes_G, dims, dtype, tol) -> None:
    from floe import kernels
    from floe.kernels import reference
    from tools.bench_grouped_gemm import configs_per_site

    num_groups, d, f, num_rows = dims
    dev = step.device
    x_ND = torch.randn(num_rows, d, device=dev).to(dtype)
    w1_GFD, w3_GFD = ((torch.randn(num_groups, f, d, device=dev) / d**0.5).to(dtype) for _ in range(2))
    w2_GDF = (torch.randn(num_groups, d, f, device=dev) / f**0.5).to(dtype)
    dy_ND = torch.randn(num_rows, d, device=dev).to(dtype)
    sizes_dev_G, offs_G = sizes_G.to(dev), torch.cumsum(sizes_G, 0).to(device=dev, dtype=torch.int32)
    inputs = (x_ND, w1_GFD, w3_GFD, w2_GDF)
    leaves = _grad_leaves(*inputs)
    ours: dict = {}

    def run():
        ours["out"] = _forward_backward(lambda *a: kernels.grouped_swiglu(*a, sizes_dev_G, backend="triton"), leaves,
                                        dy_ND)

    step.figures.setdefault("configs", {})[f"grouped_swiglu {routing}"] = configs_per_site("grouped_swiglu", run)
    y, grads = ours["out"]
    names = ("fwd", "dX", "dW1", "dW3", "dW2")
    ref = _forward_backward(lambda *a: reference.grouped_swiglu(*a, sizes_G), _grad_leaves(*(t.float() for t in inputs)),
                            dy_ND.float())
    _compare(step, f"grouped_swiglu {routing} vs reference:", names, (y, *grads), (ref[0], *ref[1]), tol)
    why = _torch_grouped_mm_works(x_ND, w1_GFD.transpose(1, 2), offs_G)
    if why:
        step.notes.append(why)
        return
    tg = _forward_backward(_torch_swiglu(offs_G), _grad_leaves(*inputs), dy_ND)
    _compare(step, f"grouped_swiglu {routing} vs torch._grouped_mm:", names, (y, *grads), (tg[0], *tg[1]), tol)


def step_kernels(step: Step) -> None:
    """grouped_mm forward/dX/dW and grouped_swiglu forward and backward through the Triton kernels, against
    the fp32 reference and torch._grouped_mm, at the Arctic EP=8 shape: uniform and ragged skewed routing."""
    from tools.bench_grouped_gemm import group_sizes_for

    dims, dtype, tol = _kernel_setup(step)
    num_groups, _, _, num_rows = dims
    torch.manual_seed(0)
    step.figures.update(shape=dict(zip("GKMN", dims)), dtype=str(dtype).removeprefix("torch."))
    for routing, sizes_G in (("uniform", group_sizes_for("uniform", num_groups, num_rows)),
                             ("ragged", ragged_sizes(num_groups, num_rows))):
        step.figures[f"rows_per_expert_{routing}"] = sizes_G.tolist()
        _check_grouped_mm(step, routing, sizes_G, dims, dtype, tol)
        _check_swiglu(step, routing, sizes_G, dims, dtype, tol)


# ----------------------------------------------------------------------------- the kernel benchmark


def step_bench(step: Step) -> None:
    """tools/bench_grouped_gemm.py's Arctic EP=8 rows (grouped_mm: ours, torch._grouped_mm, the loop, the
    dense ceiling; SwiGLU: ours vs torch; each op alone), uniform and skewed routing."""
    from unittest import mock

    from tools import bench_grouped_gemm as bench

    shape = KERNEL_SHAPE
    patches = [mock.patch.object(bench, "DEVICE", "cpu"), mock.patch.object(bench, "DTYPE", torch.float32),
               mock.patch.object(bench, "TOL", FP32_TOL),
               mock.patch.dict(bench.SHAPES, {shape: REHEARSAL_SHAPE})] if step.rehearse else []
    for p in patches:
        p.start()
    try:
        rows = []
        for routing in ("skewed",) if step.rehearse else ("uniform", "skewed"):  # the interpreter is slow
            rows += bench.bench_grouped_mm(shape, routing) + bench.bench_swiglu(shape, routing) \
                + bench.bench_ops(shape, routing)
    finally:
        for p in patches:
            p.stop()
    step.figures["rows"] = rows
    step.figures["summary"] = bench_summary(rows)
    for r in rows:  # a tolerance failure is a correctness failure; any other error is a figure
        err = r.get("error", "")
        if "relative error" in err or "gradients differ" in err:
            step.check(f"bench {r['op']} {r['routing']} {r['impl']} matches the reference", False, err)
        elif err:
            step.notes.append(f"{r['op']} {r['routing']} {r['impl']}: {err}")


def bench_summary(rows: list[dict]) -> list[dict]:
    """Per (op, routing): forward+backward TFLOP/s of ours, torch, dense, and ours' ratios to them."""
    out = []
    for op in ("grouped_mm", "swiglu"):
        for routing in dict.fromkeys(r["routing"] for r in rows):
            got = {r["impl"]: r.get("fwd_bwd_tflops") for r in rows if r.get("op") == op and r["routing"] == routing}
            if not got:
                continue
            ours, ref, dense = got.get("ours"), got.get("torch"), got.get("dense")
            out.append({"op": op, "routing": routing, "ours": ours, "torch": ref, "dense": dense,
                        "ours/torch": ours / ref if ours and ref else None,
                        "ours/dense": ours / dense if ours and dense else None})
    return out


# ----------------------------------------------------------------------------- pytest -m gpu


def gpu_test_files() -> list[str]:
    """The test files that hold a `gpu`-marked test."""
    return sorted(f for f in glob.glob(os.path.join(REPO, "tests", "test_*.py"))
                  if "pytest.mark.gpu" in open(f, encoding="utf-8").read())


def pytest_counts(output: str) -> dict[str, int]:
    """{"passed": n, "failed": n, "skipped": n, "errors": n, "deselected": n} from pytest's summary line."""
    counts = dict.fromkeys(("passed", "failed", "skipped", "errors", "deselected"), 0)
    lines = [ln for ln in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?|deselected)", ln)]
    for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", lines[-1] if lines else ""):
        counts["errors" if word.startswith("error") else word] = int(n)
    return counts


def step_pytest_gpu(step: Step) -> None:
    """`pytest -m gpu -v` over the files that hold gpu-marked tests (on the CPU they all skip). Its output
    goes to this step's log as it comes, and each test's outcome is kept, so a run stopped by the budget
    still reports the tests that finished."""
    files = gpu_test_files()
    cmd = [sys.executable, "-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider", "-rs", *files]
    step.figures.update(command=" ".join(["python", *cmd[1:8]]) + " <files>",
                        files=[os.path.relpath(f, REPO) for f in files])
    outcomes = step.figures["outcomes"] = {}  # test id -> PASSED | FAILED | SKIPPED | ERROR, as they finish
    lines: list[str] = []
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line)
            if m := re.match(r"(tests/\S+) (PASSED|FAILED|SKIPPED|ERROR)", line):
                outcomes[m.group(1)] = m.group(2)
        returncode = proc.wait()
    finally:
        if proc.poll() is None:  # stopped by the budget: the tests that finished are in `outcomes`
            proc.kill()
    counts = pytest_counts("".join(lines))
    step.figures.update(returncode=returncode, output_tail="".join(lines)[-3000:], **counts)
    selected = counts["passed"] + counts["failed"] + counts["skipped"] + counts["errors"]
    step.check("gpu-marked tests were collected", selected > 0, f"{selected} selected")
    step.check("no gpu test failed", counts["failed"] == 0 and counts["errors"] == 0 and returncode == 0,
               f"{counts['failed']} failed, {counts['errors']} errors, exit {returncode}: "
               f"{[t for t, o in outcomes.items() if o in ('FAILED', 'ERROR')]}")
    if not step.rehearse:
        step.check("every gpu test ran on the GPU (none skipped)", counts["skipped"] == 0 and counts["passed"] > 0,
                   f"{counts['passed']} passed, {counts['skipped']} skipped")


# ----------------------------------------------------------------------------- model=small step


def small_step_overrides(rehearse: bool) -> list[str]:
    """launch/train.py overrides of the measured step: model=small at 4096 tokens (Triton experts,
    FlexAttention, bf16) on the GPU; model=tiny, fp32, the interpreter kernels and dense-mask attention
    in the rehearsal."""
    common = ["train.kernels=triton", "train.max_steps=100", "log.wandb=disabled", "train.global_batch_size=1",
              "train.micro_batch_size=1"]
    if rehearse:  # one layer: the interpreter runs every kernel program in Python
        return [*common, "model=tiny", "model.num_layers=1", "data.seq_len=128", "data.num_examples=100",
                "train.device=cpu", "train.precision=fp32"]
    return [*common, "model=small", "data.seq_len=4096", "train.device=cuda", "train.precision=bf16"]


def memory_plan(overrides: list[str]):
    """tools/estimate.py's plan for the same launch overrides (routing balanced, as bench_estimate)."""
    from floe.plan.memory_plan import estimate
    from tools.estimate import build_spec, compose

    return estimate(build_spec(compose([*overrides, "+routing=balanced"])))


def measure_steps(overrides: list[str], run_dir: str, steps: int) -> dict:
    """Build the launcher's Trainer for `overrides`, run 1 warm-up step and `steps` timed ones: losses,
    step seconds, tokens/s, mfu and the peak tensor memory (CUDA allocator above what was allocated
    before; on a CPU the op-level tracker, entered before the model is built). The process group it
    makes is torn down again, as launch/train.py's train() does."""
    import contextlib

    import torch.distributed as dist

    from floe.parallel import teardown
    from floe.plan.tensor_memory import PeakMemoryTracker
    from tools.bench_step import trainer_from_overrides

    on_cpu = "train.device=cpu" in overrides
    if not on_cpu:
        torch.cuda.reset_peak_memory_stats()
    base = 0 if on_cpu else torch.cuda.memory_allocated()
    tracker = PeakMemoryTracker() if on_cpu else contextlib.nullcontext()
    created, env_before = not dist.is_initialized(), dict(os.environ)
    try:
        with tracker:
            trainer, c, device = trainer_from_overrides(overrides, run_dir)
            records, seconds = _timed_steps(trainer, device, 1 + steps)
    finally:
        if created and dist.is_initialized():
            teardown()
            for key in set(os.environ) - set(env_before):  # the 1-process rendezvous init_distributed made up
                del os.environ[key]
    step_s = statistics.median(seconds[1:])
    tokens = c.train.global_batch_size * c.data.seq_len
    peak = tracker.peak_bytes if on_cpu else torch.cuda.max_memory_allocated(device) - base
    model = trainer.engine.model
    return {
        "losses": [r["loss"] for r in records], "warmup_step_s": seconds[0], "step_s": step_s,
        "tokens_per_step": tokens, "tokens_per_s": tokens / step_s,
        "mfu": trainer.flops_per_token * tokens / step_s / trainer.peak_flops if trainer.peak_flops else None,
        "peak_flops": trainer.peak_flops, "peak_gib": peak / 2**30,
        "attention": model.packed_attention if model.packed_attention != "auto" else (
            "flex" if device.type == "cuda" else "dense"),  # as ArcticForCausalLM.forward resolves it
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def _timed_steps(trainer, device, num_steps: int) -> tuple[list[dict], list[float]]:
    """`num_steps` Trainer.train_step calls: their records and wall seconds (device synchronised)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    records, seconds = [], []
    for _ in range(num_steps):
        sync()
        t0 = time.perf_counter()
        records.append(trainer.train_step())
        sync()
        seconds.append(time.perf_counter() - t0)
    return records, seconds


def step_small(step: Step) -> None:
    """One model=small bf16 training step at data.seq_len=4096 (after a warm-up step), timed, with MFU,
    peak memory and the memory plan for the same config."""
    overrides = small_step_overrides(step.rehearse)
    step.figures["overrides"] = overrides
    measured = measure_steps(overrides, os.path.join(step.work_dir, "small"), steps=1 if step.rehearse else 3)
    step.figures.update(measured)
    step.check("every step's loss is finite", all(v == v and abs(v) != float("inf") for v in measured["losses"]),
               f"losses {measured['losses']}")
    plan = memory_plan(overrides)
    step.figures.update(plan_gib=plan.total_gb, plan_activations_gib=plan.activations_gb,
                        plan_states_gib=plan.weights_gb + plan.grads_gb + plan.master_gb + plan.adam_gb,
                        plan_over_measured=plan.total_gb / measured["peak_gib"])


# ----------------------------------------------------------------------------- launch/train.py, resume


def launch(step: Step, run_dir: str, *overrides: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    """`python launch/train.py run.dir=<run_dir> <overrides>` from the repository root; its output is
    kept in <run_dir>.log."""
    cmd = [sys.executable, "launch/train.py", f"run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    with open(f"{run_dir}.log", "w") as f:
        f.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        step.notes.append(f"{' '.join(cmd[1:])}: exit {proc.returncode}: {proc.stderr[-1500:]}")
    return proc


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def checkpoint_tensors(run_dir: str, step_num: int) -> dict[str, torch.Tensor]:
    """Every tensor of checkpoint step_num (model and optimizer files), keyed by file and name."""
    from safetensors.torch import load_file

    root = os.path.join(run_dir, "checkpoints", f"step_{step_num:08d}")
    out = {}
    for path in sorted(glob.glob(os.path.join(root, "*", "*.safetensors"))):
        for name, t in load_file(path).items():
            out[f"{os.path.relpath(path, root)}:{name}"] = t
    return out


def step_default_train(step: Step) -> None:
    """The default `python launch/train.py` (tiny, embedded data, 60 steps) on this machine, to its end
    (the rehearsal stops it at 20 steps: a loaded 2-core machine takes minutes for 60)."""
    run_dir = os.path.join(step.work_dir, "default")
    num_steps = 20 if step.rehearse else 60
    t0 = time.perf_counter()
    proc = launch(step, run_dir, *([f"train.max_steps={num_steps}"] if step.rehearse else []))
    step.figures["wall_s"] = time.perf_counter() - t0
    metrics = read_metrics(run_dir)
    step.check("python launch/train.py exits 0", proc.returncode == 0, f"exit {proc.returncode}")
    steps = [m["step"] for m in metrics]
    step.check(f"it trains every step to its end ({num_steps})", steps == list(range(1, num_steps + 1)),
               f"{len(steps)} lines")
    if not metrics:
        return
    first, last = metrics[0]["loss"], statistics.mean(m["loss"] for m in metrics[-5:])
    step.check("the loss falls by more than 1.5", last < first - 1.5, f"{first:.3f} -> {last:.3f}")
    tail = metrics[len(metrics) // 2:]
    step.figures.update(first_loss=first, last_loss=last, steps=len(metrics),
                        tokens_per_s=statistics.median(m["tokens_per_s"] for m in tail),
                        mfu=statistics.median(m["mfu"] for m in tail) if all(m.get("mfu") for m in tail) else None,
                        mem_peak_gb=max(m["mem_peak_gb"] for m in metrics))
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        step.check(f"the final checkpoint is step {num_steps}", f.read().strip() == f"step_{num_steps:08d}")


def step_resume(step: Step) -> None:
    """Checkpoint save, load and bit-exact resume: 6 steps straight, saving at 3 and 6, against the same
    run resumed from step 3 after the step-6 checkpoint was left half-written. Default precision: bf16
    on the GPU, fp32 in the rehearsal (bf16 on a CPU is slow; CI checks it in tests/test_train.py), which
    also draws 200 synthetic examples instead of 4000."""
    overrides = ["train.max_steps=6", "train.save_every=3", "train.global_batch_size=8", "train.micro_batch_size=4",
                 "log.wandb=disabled", *(["data.num_examples=200"] if step.rehearse else [])]
    straight, resumed = (os.path.join(step.work_dir, n) for n in ("straight", "resumed"))
    t0 = time.perf_counter()
    ok = step.check("the 6-step run exits 0", launch(step, straight, *overrides).returncode == 0)
    if not ok:
        return
    shutil.copytree(straight, resumed)
    ckpt = os.path.join(resumed, "checkpoints")
    os.rename(os.path.join(ckpt, "step_00000006"), os.path.join(ckpt, ".tmp-step_00000006"))
    with open(os.path.join(ckpt, "latest"), "w") as f:
        f.write("step_00000003")
    proc = launch(step, resumed, *overrides)
    step.figures["wall_s"] = time.perf_counter() - t0
    if not step.check("the resumed run exits 0", proc.returncode == 0):
        return
    step.check("it says it resumed at step 3", "resumed from" in proc.stderr and "at step 3" in proc.stderr)
    a, b = read_metrics(straight), read_metrics(resumed)
    step.check("metrics.jsonl has steps 1..6 once", [m["step"] for m in b] == list(range(1, 7)))
    same = all(x[k] == y[k] for x, y in zip(a, b) for k in ("loss", "lr", "grad_norm")) and len(a) == len(b) == 6
    step.check("loss, lr and grad norm of steps 4-6 are bit-identical", same,
               f"straight {[m['loss'] for m in a[3:]]} resumed {[m['loss'] for m in b[3:]]}")
    ta, tb = checkpoint_tensors(straight, 6), checkpoint_tensors(resumed, 6)
    differ = [n for n in ta if n not in tb or not torch.equal(ta[n], tb[n])]
    step.check("the step-6 checkpoints are bit-identical (weights, Adam moments, fp32 masters)",
               len(ta) > 0 and set(ta) == set(tb) and not differ, f"{len(ta)} tensors, {len(differ)} differ {differ[:3]}")
    step.figures["tensors_compared"] = len(ta)


# ----------------------------------------------------------------------------- LoRA, QLoRA, DPO


FEATURE_STEPS = 4


def _feature_run(step: Step, overrides: list[str], prepare=None) -> None:
    """A few steps of `python launch/train.py <overrides>` (the tiny default otherwise), once the feature
    exists: overrides the config cannot take, or a launch refused as a config error (exit 2, e.g. a
    package the feature needs), are "not available", with the reason; anything else is checked."""
    from tools.estimate import compose

    try:
        if prepare is not None:
            overrides = [*overrides, *prepare(step)]
        compose([*overrides, f"run.dir={step.work_dir}"])
    except Exception as e:  # noqa: BLE001  (Hydra's errors for an unknown group or key; a missing tool)
        step.not_available(f"{' '.join(overrides)}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return
    run_dir = os.path.join(step.work_dir, "run")
    proc = launch(step, run_dir, *overrides, f"train.max_steps={FEATURE_STEPS}", "log.wandb=disabled")
    step.figures["overrides"] = overrides
    if proc.returncode == 2:
        step.not_available(f"config error: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
        return
    step.check(f"{' '.join(overrides)} exits 0", proc.returncode == 0, f"exit {proc.returncode}")
    losses = [m.get("loss") for m in read_metrics(run_dir)]
    step.figures["losses"] = losses
    step.check(f"{FEATURE_STEPS} steps with finite losses",
               len(losses) == FEATURE_STEPS and all(isinstance(v, float) and math.isfinite(v) for v in losses),
               f"losses {losses}")


def _fewer_examples(step: Step) -> list[str]:
    return ["data.num_examples=200"] if step.rehearse else []  # the rehearsal's stand-in: less data to build


def step_lora(step: Step) -> None:
    """LoRA (rank 8 on attention, the dense MLP and every expert) on the tiny model."""
    _feature_run(step, ["lora=default", *_fewer_examples(step)])


def step_qlora(step: Step) -> None:
    """QLoRA: LoRA over an NF4-quantized frozen base."""
    _feature_run(step, ["lora=default", "lora.quantize_base=nf4", *_fewer_examples(step)])


def _preference_pairs(step: Step) -> list[str]:
    """tools/synthetic_pairs.py's pairs (right vs wrong answers) as data=preference's files."""
    path = os.path.join(step.work_dir, "pairs.jsonl")
    if not os.path.exists(os.path.join(REPO, "tools", "synthetic_pairs.py")):
        raise FileNotFoundError("tools/synthetic_pairs.py is not in this checkout")
    num = "50" if step.rehearse else "200"  # pairs per source
    subprocess.run([sys.executable, "tools/synthetic_pairs.py", "--num", num, "--out", path], cwd=REPO, check=True,
                   capture_output=True, text=True)
    return [f"data.paths=[{path}]"]


def step_dpo(step: Step) -> None:
    """DPO on preference pairs (the reference policy the initial model)."""
    _feature_run(step, ["data=preference", "train.objective=dpo"], prepare=_preference_pairs)
