"""tools/gpu_check.py: the CPU rehearsal end to end (so the GPU script cannot rot between GPU days),
and how a failing, crashing, hanging or unaffordable step is reported."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tools import gpu_check
from tools.gpu_check_steps import pytest_counts, ragged_sizes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """One `python tools/gpu_check.py --rehearse` run: (exit code, stdout, report, out dir). The budget
    is raised so a loaded CI machine still runs every step (about 1-2 minutes on a quiet 2-core one)."""
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--rehearse", "--budget-s", "1500", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1700, check=False)
    with open(out / "report.json") as f:
        report = json.load(f)
    return proc, report, out


def _step(report, name):
    return next(s for s in report["steps"] if s["name"] == name)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_rehearsal_runs_every_step_and_reports_it(rehearsal):
    proc, report, out = rehearsal
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert report["mode"] == "rehearse" and report["environment"]["device"] == "cpu"
    assert [s["name"] for s in report["steps"]] == gpu_check.NAMES
    for s in report["steps"]:
        assert s["status"] in ("passed", "not available"), (s["name"], s.get("error"), s.get("log_tail"))
        assert s["seconds"] > 0 and os.path.exists(out / f"{s['name']}.log")
    assert not report["correctness_failed"]
    summary = (out / "summary.md").read_text()
    assert summary in proc.stdout  # printed as written
    for name in gpu_check.NAMES:
        assert f"| {name} | " in summary


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_rehearsal_figures(rehearsal):
    _, report, _ = rehearsal
    kernels = _step(report, "kernels")
    names = [c["name"] for c in kernels["checks"]]
    for routing in ("uniform", "ragged"):  # forward and every gradient, against both oracles
        for op, parts in (("grouped_mm", ("fwd", "dX", "dW")), ("grouped_swiglu", ("fwd", "dX", "dW1", "dW3", "dW2"))):
            for oracle in ("reference", "torch._grouped_mm"):
                assert [n for n in names if n.startswith(f"{op} {routing} vs {oracle}:")] == \
                    [f"{op} {routing} vs {oracle}: {p}" for p in parts]
    assert 0 in kernels["figures"]["rows_per_expert_ragged"] and 1 in kernels["figures"]["rows_per_expert_ragged"]
    assert any("empty experts is zero" in n for n in names)
    assert set(kernels["figures"]["configs"]["grouped_swiglu ragged"]) == {
        "swiglu.fwd.gate_up", "swiglu.fwd.down", "swiglu.bwd.dH", "swiglu.bwd.gate_up", "swiglu.bwd.dX",
        "swiglu.bwd.dW2", "swiglu.bwd.dW13"}

    bench = _step(report, "bench")["figures"]
    impls = {(r["op"], r["impl"]) for r in bench["rows"] if "error" not in r}
    assert {("grouped_mm", "ours"), ("grouped_mm", "torch"), ("grouped_mm", "dense"), ("swiglu", "ours")} <= impls
    assert all(row["ours/torch"] > 0 for row in bench["summary"])

    pytest_gpu = _step(report, "pytest_gpu")["figures"]  # on a CPU every gpu-marked test is collected, and skips
    assert pytest_gpu["skipped"] >= 4 and pytest_gpu["passed"] == pytest_gpu["failed"] == 0
    assert len(pytest_gpu["outcomes"]) == pytest_gpu["skipped"] and set(pytest_gpu["outcomes"].values()) == {"SKIPPED"}
    assert "tests/test_train.py::test_resume_is_bit_exact[bf16-zero2-cuda]" in pytest_gpu["outcomes"]

    small = _step(report, "small_step")["figures"]
    assert small["attention"] == "dense" and small["dtype"] == "float32" and len(small["losses"]) == 2
    assert small["step_s"] > 0 and small["peak_gib"] > 0 and small["plan_gib"] > 0
    # the plan against the op-level tracker (within 15% is tests/test_estimate.py's check, at another shape)
    assert 0.5 <= small["plan_over_measured"] <= 2.0

    default = _step(report, "default_train")["figures"]
    assert default["steps"] == 20 and default["last_loss"] < default["first_loss"] - 1.5
    assert _step(report, "resume")["figures"]["tensors_compared"] > 0


def test_a_crashing_step_is_an_error_and_fails_correctness(tmp_path):
    """Without a GPU the real (not rehearsed) kernels step stops with its reason; the report says so."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    plan = gpu_check.STEPS[gpu_check.NAMES.index("kernels")]
    record = gpu_check.run_step(plan, rehearse=False, remaining_s=300, work=str(tmp_path), out=str(tmp_path))
    assert record["status"] == "error" and "no CUDA device" in record["error"]
    assert gpu_check.correctness_failed({"steps": [record]})
    assert "error kernels: RuntimeError: no CUDA device" in gpu_check.summary_markdown(
        {"mode": "gpu", "environment": {}, "started": "t", "wall_s": 1.0, "budget_s": 420.0, "steps": [record],
         "correctness_failed": True})


def test_a_step_past_the_budget_is_killed_and_recorded(tmp_path):
    plan = gpu_check.STEPS[gpu_check.NAMES.index("default_train")]
    record = gpu_check.run_step(plan, rehearse=True, remaining_s=0.5, work=str(tmp_path), out=str(tmp_path))
    assert record["status"] == "timeout" and "budget" in record["error"] and record["seconds"] < 60
    assert gpu_check.correctness_failed({"steps": [record]})


def test_no_budget_skips_every_step_without_failing(tmp_path):
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--rehearse", "--budget-s", "0", "--out",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["status"] for s in report["steps"]] == ["skipped-for-budget"] * len(gpu_check.NAMES)
    assert not report["correctness_failed"]


def test_a_failed_check_fails_only_through_its_check():
    passed = {"name": "bench", "correctness": False, "status": "passed", "checks": [{"name": "a", "ok": True}]}
    crashed_measurement = {"name": "small_step", "correctness": False, "status": "error", "checks": []}
    assert not gpu_check.correctness_failed({"steps": [passed, crashed_measurement]})
    failed = {**passed, "status": "failed", "checks": [{"name": "b", "ok": False, "detail": "relative error 1"}]}
    assert gpu_check.correctness_failed({"steps": [passed, failed]})


def test_pytest_counts_reads_the_summary_line():
    out = "....s\nSKIPPED [2] tests/x.py:3: needs a CUDA device\n3 passed, 2 skipped, 1 deselected in 4.0s\n"
    assert pytest_counts(out) == {"passed": 3, "failed": 0, "skipped": 2, "errors": 0, "deselected": 1}
    assert pytest_counts("1 failed, 45 passed, 1 error in 9s") == {"passed": 45, "failed": 1, "skipped": 0,
                                                                   "errors": 1, "deselected": 0}
    assert pytest_counts("no tests ran in 0.1s")["passed"] == 0


@pytest.mark.parametrize("num_groups,num_rows", [(16, 16 * 512), (6, 96), (128, 4096)])
def test_ragged_routing_has_empty_and_one_row_experts(num_groups, num_rows):
    sizes = ragged_sizes(num_groups, num_rows)
    assert sizes.numel() == num_groups and int(sizes.sum()) == num_rows
    assert int((sizes == 0).sum()) >= max(1, num_groups // 4) and int((sizes == 1).sum()) >= 1
    assert int(sizes.max()) > 2 * num_rows // num_groups  # skewed: the most popular expert is well over the mean
