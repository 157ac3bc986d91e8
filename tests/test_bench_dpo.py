"""tools/bench_dpo.py runs the way BENCHMARKS.md says (at a toy size): both objectives, a ratio."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_dpo_runs_both_steps_on_the_same_rows():
    cmd = [sys.executable, "tools/bench_dpo.py", "--steps", "2", "--rows", "2", "--seq-len", "128", "--repeats", "1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout[proc.stdout.index("{\n"):])
    for objective in ("sft", "dpo"):
        assert out[objective]["step_s"] > 0 and out[objective]["mem_peak_gb"] > 0
    assert out["dpo_over_sft_time"] == pytest.approx(out["dpo"]["step_s"] / out["sft"]["step_s"], abs=1e-3)
