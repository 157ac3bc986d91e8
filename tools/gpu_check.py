"""One command that proves floe on one CUDA GPU within a time budget; rehearsed on the CPU.

    timeout 540 python tools/gpu_check.py                   # on the GPU: every step that fits 420 s
    python tools/gpu_check.py --budget-s 300 --only kernels bench
    python tools/gpu_check.py --rehearse                     # the same script on the CPU, with stand-ins

Steps, in order of value (tools/gpu_check_steps.py), each in a process of its own, timed and guarded:
a failure, a crash or a hang (killed when the budget runs out) is recorded and the next step runs;
a step whose estimate does not fit the remaining budget is recorded as skipped-for-budget.

  kernels        grouped_mm forward/dX/dW and grouped_swiglu forward+backward in bf16 through the
                 Triton kernels against the fp32 reference and torch._grouped_mm, at the Arctic EP=8
                 shape, uniform and ragged skewed routing (empty experts, a one-row expert)
  bench          tools/bench_grouped_gemm.py's Arctic EP=8 rows: TFLOP/s of ours, torch._grouped_mm,
                 the dense ceiling, and the ratios
  pytest_gpu     pytest -m gpu
  small_step     a model=small bf16 training step at data.seq_len=4096 (Triton experts, FlexAttention):
                 step time, MFU, peak memory, and tools/estimate.py's plan for the same config
  default_train  the default `python launch/train.py` to its end
  resume         checkpoint save, load and bit-exact resume (bf16)
  lora, qlora, dpo   a few steps of each, when the feature exists ("not available" otherwise)

--rehearse runs the same steps on the CPU with stand-ins: the Triton interpreter (TRITON_INTERPRET=1)
at toy shapes in fp32, the dense-mask attention, model=tiny, a 20-step default run. The report has the
same format; tests/test_gpu_check.py runs it in CI, so the script cannot rot between GPU days.

Writes report.json and summary.md under $OUT if set, else runs/gpu_check/ (--out overrides both), prints
the summary, and exits 1 iff a correctness check failed (a failed check, or a correctness step that
crashed or ran out of time); a step skipped for budget or not available is not a failure.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BUDGET_S = 420.0
TERM_GRACE_S = 10.0  # a step past the budget gets SIGTERM, then this long to write its partial result


@dataclass(frozen=True)
class Plan:
    """One step: its function in tools/gpu_check_steps.py, whether its checks are about correctness,
    and the seconds it is expected to need on the GPU and in the rehearsal (skip when they do not fit)."""

    name: str
    fn: str
    correctness: bool
    gpu_s: float
    rehearse_s: float


# GPU seconds are guesses until a GPU has run them (Triton autotuning, FlexAttention's compile in every
# new process): replace them with a report's figures.
STEPS = [
    Plan("kernels", "step_kernels", True, 60, 10),
    Plan("bench", "step_bench", False, 60, 10),
    Plan("pytest_gpu", "step_pytest_gpu", True, 150, 10),
    Plan("small_step", "step_small", False, 90, 15),
    Plan("default_train", "step_default_train", True, 60, 30),
    Plan("resume", "step_resume", True, 90, 30),
    Plan("lora", "step_lora", True, 45, 15),
    Plan("qlora", "step_qlora", True, 45, 15),
    Plan("dpo", "step_dpo", True, 45, 15),
]
NAMES = [p.name for p in STEPS]


def out_dir(arg: str | None) -> str:
    return arg or os.environ.get("OUT") or os.path.join(REPO, "runs", "gpu_check")


def child_env(rehearse: bool) -> dict:
    """The environment of a step's process: the interpreter decided at Triton's first import."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    if rehearse:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def run_step(plan: Plan, rehearse: bool, remaining_s: float, work: str, out: str) -> dict:
    """Run one step in its own process, killed after `remaining_s`; its record for the report."""
    result_path = os.path.join(work, f"{plan.name}.json")
    log_path = os.path.join(out, f"{plan.name}.log")
    cmd = [sys.executable, os.path.abspath(__file__), "--step", plan.name, "--result", result_path,
           "--work", os.path.join(work, plan.name), *(["--rehearse"] if rehearse else [])]
    record = {"name": plan.name, "correctness": plan.correctness, "estimate_s": plan.rehearse_s if rehearse else plan.gpu_s}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(rehearse), stdout=log, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=max(remaining_s, 1.0))
        except subprocess.TimeoutExpired:  # SIGTERM first: the step then writes what it has measured so far
            rc = None
            proc.terminate()
            try:
                proc.wait(timeout=TERM_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    record["seconds"] = round(time.perf_counter() - t0, 1)
    if os.path.exists(result_path):
        with open(result_path) as f:
            record.update(json.load(f))
    record.setdefault("checks", [])
    if rc is None:
        record.update(status="timeout", error=f"stopped after {remaining_s:.0f} s (the budget ran out)")
    elif "error" in record or rc != 0:
        record["status"] = "error"
        record.setdefault("error", f"exit {rc} without a result")
    elif "not_available" in record.get("figures", {}):
        record["status"] = "not available"
    else:
        record["status"] = "passed" if all(c["ok"] for c in record["checks"]) else "failed"
    if record["status"] in ("error", "timeout"):
        with open(log_path, errors="replace") as f:
            record["log_tail"] = f.read()[-3000:]
    return record


def step_main(name: str, result_path: str, work: str, rehearse: bool) -> int:
    """Inside a step's process: run it, write its result (or its error) as JSON."""
    from tools import gpu_check_steps as steps

    plan = STEPS[NAMES.index(name)]
    os.makedirs(work, exist_ok=True)
    step = steps.Step(name, rehearse, work)
    result = {}

    def out_of_time(signum, frame):
        raise TimeoutError("stopped by gpu_check: the budget ran out")

    signal.signal(signal.SIGTERM, out_of_time)
    try:
        if not rehearse:
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError("no CUDA device is visible (use --rehearse on a CPU)")
        getattr(steps, plan.fn)(step)
    except BaseException as e:  # noqa: BLE001  (recorded, with what was measured; the parent goes on)
        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {e}"[:2000]
    result.update(step.to_json())
    with open(result_path, "w") as f:
        json.dump(result, f, default=str)
    return 0


def environment(rehearse: bool) -> dict:
    """Device, versions and commit, asked in a process of its own (this one never touches CUDA)."""
    code = ("import json, torch, triton; c = torch.cuda.is_available(); p = torch.cuda.get_device_properties(0) "
            "if c else None; print(json.dumps({'device': f'{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} "
            "GiB)' if c else 'cpu', 'torch': torch.__version__, 'triton': triton.__version__, 'cuda': torch.version.cuda}))")
    proc = subprocess.run([sys.executable, "-c", code], env=child_env(rehearse), capture_output=True, text=True,
                          check=False)
    env = json.loads(proc.stdout) if proc.returncode == 0 else {"device": f"unknown ({proc.stderr[-300:]})"}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=False).stdout.strip()
    return {**env, "host": platform.node(), "cpus": os.cpu_count(), "commit": commit or None}


def run_all(args) -> dict:
    """Every selected step in order, within the budget; the report."""
    start = time.perf_counter()
    out = out_dir(args.out)
    os.makedirs(out, exist_ok=True)
    report = {"tool": "tools/gpu_check.py", "mode": "rehearse" if args.rehearse else "gpu",
              "budget_s": args.budget_s, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "environment": environment(args.rehearse), "steps": []}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        for plan in STEPS:
            if args.only and plan.name not in args.only:
                continue
            remaining = args.budget_s - (time.perf_counter() - start)
            estimate = plan.rehearse_s if args.rehearse else plan.gpu_s
            if remaining < estimate:
                report["steps"].append({"name": plan.name, "correctness": plan.correctness, "status": "skipped-for-budget",
                                        "estimate_s": estimate, "seconds": 0.0, "checks": [],
                                        "error": f"{remaining:.0f} s left, {estimate:.0f} s expected"})
                continue
            print(f"gpu_check: {plan.name} ({remaining:.0f} s of budget left)", flush=True)
            report["steps"].append(run_step(plan, args.rehearse, remaining, work, out))
    report["wall_s"] = round(time.perf_counter() - start, 1)
    report["correctness_failed"] = correctness_failed(report)
    return report


def correctness_failed(report: dict) -> bool:
    """A failed check anywhere, or a correctness step that did not finish (crash, timeout)."""
    return any(not c["ok"] for s in report["steps"] for c in s["checks"]) or any(
        s["correctness"] and s["status"] in ("error", "timeout") for s in report["steps"])


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(map(_fmt, v)) + "]"
    return str(v)


FIGURE_KEYS = {  # the figures the summary shows per step (all are in report.json)
    "kernels": ("dtype", "shape"),
    "pytest_gpu": ("passed", "failed", "skipped", "errors"),
    "small_step": ("dtype", "attention", "step_s", "warmup_step_s", "tokens_per_s", "mfu", "peak_gib", "plan_gib",
                   "plan_over_measured"),
    "default_train": ("wall_s", "first_loss", "last_loss", "tokens_per_s", "mfu", "mem_peak_gb"),
    "resume": ("wall_s", "tensors_compared"),
    **{name: ("losses",) for name in ("lora", "qlora", "dpo")},
}


def summary_markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# gpu_check ({report['mode']}): {env.get('device')}", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, commit {env.get('commit')}, "
             f"{report['started']}; {report['wall_s']:.0f} s of a {report['budget_s']:.0f} s budget. "
             f"Correctness: **{'FAILED' if report['correctness_failed'] else 'ok'}**.", "",
             "| step | status | seconds | checks passed | figures |", "|---|---|---:|---:|---|"]
    for s in report["steps"]:
        checks = s["checks"]
        figs = s.get("figures", {})
        shown = ", ".join(f"{k} {_fmt(figs[k])}" for k in FIGURE_KEYS.get(s["name"], ()) if figs.get(k) is not None)
        if "not_available" in figs:
            shown = figs["not_available"]
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {sum(c['ok'] for c in checks)}/{len(checks)} "
                     f"| {shown} |")
    for s in report["steps"]:
        for row in s.get("figures", {}).get("summary", []):
            shown = ", ".join(f"{k} {_fmt(row[k])}" for k in ("ours", "torch", "dense", "ours/torch", "ours/dense")
                              if row.get(k) is not None)
            lines.append(f"- bench {row['op']} {row['routing']} (fwd+bwd TFLOP/s): {shown}")
    for s in report["steps"]:
        for c in s["checks"]:
            if not c["ok"]:
                lines.append(f"- FAILED {s['name']}: {c['name']}: {c['detail']}")
        if s.get("error"):
            lines.append(f"- {s['status']} {s['name']}: {s['error'].splitlines()[0][:300]}")
        lines += [f"- note {s['name']}: {n.splitlines()[0][:300]}" for n in s.get("notes", [])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="seconds for all steps (default 420)")
    p.add_argument("--rehearse", action="store_true", help="on the CPU with stand-ins (interpreter, model=tiny)")
    p.add_argument("--only", nargs="+", choices=NAMES, help="run only these steps")
    p.add_argument("--out", help="report directory (default $OUT, else runs/gpu_check)")
    p.add_argument("--step", choices=NAMES, help=argparse.SUPPRESS)  # inside a step's own process
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.step:
        return step_main(args.step, args.result, args.work, args.rehearse)
    report = run_all(args)
    out = out_dir(args.out)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    text = summary_markdown(report)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    print(text + f"\nreport: {os.path.join(out, 'report.json')}")
    return 1 if report["correctness_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
