"""tools/bench_step.py at a toy shape: it runs on 1 and 2 processes, several configurations in one
call, and its phase timers are exclusive (nested phases are not counted twice)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = ["--vocab", "1024", "--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--expert-ffn", "64",
       "--seq-len", "32", "--batch", "4", "--micro-batch", "2", "--steps", "2", "--warmup", "1", "--threads", "1",
       "--cpu"]


def bench(tmp_path, *args, ok: bool = True) -> list[dict]:
    out_json, temp = tmp_path / "bench.json", tmp_path / "tmp"
    temp.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DS_ACCELERATOR")}
    out = subprocess.run([sys.executable, "tools/bench_step.py", *TOY, "--json", str(out_json), *args], cwd=REPO,
                         capture_output=True, text=True, timeout=400, env={**env, "TMPDIR": str(temp)})
    assert list(temp.glob("bench_step_*")) == []  # its run directories are gone, after a failure too
    if not ok:
        assert out.returncode != 0
        return []
    assert out.returncode == 0, out.stderr[-3000:]
    with open(out_json) as f:
        return json.load(f)["results"]


def check_phases(r: dict) -> None:
    phases = r["phases_s"]
    assert all(v >= 0 for k, v in phases.items() if k != "other"), phases
    assert phases["forward"] > 0 and phases["backward"] > 0 and phases["optimizer"] > 0, phases
    # "other" is the step minus the timed phases: negative would mean a nested phase counted twice
    assert phases["other"] > -0.01 * r["step_s"], phases
    assert sum(phases.values()) <= 1.5 * r["step_s"]  # medians per phase: close to the median step


def test_one_process_against_the_naive_reference(tmp_path):
    results = bench(tmp_path, "--experts", "8", "--zero", "0", "2")
    assert [(r["experts"], r["zero_stage"], r["procs"]) for r in results] == [(8, 0, 1), (8, 2, 1)]
    for r in results:
        check_phases(r)
        assert r["naive_allocator"] == "system" and r["naive_s"] > 0
        assert r["speedup_vs_naive"] == pytest.approx(r["naive_s"] / r["step_s"])
        assert set(r["page_faults"]) == {"naive", "floor", "step"}
    bench(tmp_path, "--experts", "8", "--vocab", "256", ok=False)  # smaller than the tokenizer: a config error


@pytest.mark.slow  # spawns 2 ranks per configuration
def test_two_processes_run_every_configuration(tmp_path):
    """Two configurations in one call (the second used to hang: a process group is not rebuilt in
    the same ranks, so every configuration gets fresh ones)."""
    results = bench(tmp_path, "--procs", "2", "--experts", "8", "4", "--zero", "2")
    assert [(r["experts"], r["zero_stage"], r["procs"]) for r in results] == [(8, 2, 2), (4, 2, 2)]
    for r in results:
        check_phases(r)
        assert "naive_s" not in r


def test_lora_option_trains_adapters_only(tmp_path):
    """--lora R: the same step with lora=default at rank R; one configuration per process for the peaks."""
    [full] = bench(tmp_path, "--experts", "8", "--zero", "0", "--no-naive", "--no-floor")
    [lora] = bench(tmp_path, "--experts", "8", "--zero", "0", "--no-naive", "--no-floor", "--lora", "4")
    check_phases(lora)
    assert (full["lora_rank"], lora["lora_rank"]) == (0, 4) and set(lora["page_faults"]) == {"step"}
    assert lora["trainable_params"] < full["trainable_params"] / 5
    assert lora["state_gb"] < full["state_gb"] / 2 and lora["checkpoint_mb"] < full["checkpoint_mb"] / 3
    assert lora["step_cpu_s"] > 0 and lora["peak_gb"] > 0
    for r in (full, lora):  # the process before the run: the interpreter and imported libraries
        assert 0 < r["peak_above_start_gb"] < r["peak_gb"] - 0.1


def test_bench_lora_parts_times_each_part(capsys):
    """tools/bench_lora_parts.py (BENCHMARKS.md, LoRA on the CPU): a line per product and group count and
    one for the two dropout masks, at a toy size."""
    from tools.bench_lora_parts import main

    assert main(["--rows", "256", "--hidden", "32", "--expert-ffn", "48", "--rank", "4", "--repeats", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    products = [ln for ln in lines if " groups " in ln]
    assert len(products) == 6 and all(float(ln.split()[-2]) > 0 for ln in products)
    assert lines[-1].startswith("dropout p=0.05 over [256, 32]: F.dropout") and "floe.lora.Dropout" in lines[-1]
