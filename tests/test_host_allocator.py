"""train.host_allocator: on a CPU run glibc keeps freed memory for the next step (moe/run/host_allocator.py).
Each check runs in a fresh process: the setting is process-wide and permanent."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from floe.run.host_allocator import resolve
from floe.run.config import TrainConfig
from tests.test_console import SMALL, launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "DS_ACCELERATOR")}

# A training step whose expert weights are over glibc's largest mmap threshold (32 MiB): 3 steps to
# warm up, then the minor page faults of 3 more.
STEPS = """
import resource, sys, torch
from floe.config import ModelConfig
from floe.run.host_allocator import retain_freed_memory
from floe.model import ArcticForCausalLM
if sys.argv[1] == "retain":
    assert retain_freed_memory()
c = ModelConfig(vocab_size=256, hidden_size=256, num_layers=1, num_heads=4, num_kv_heads=2, dense_ffn=256,
                expert_ffn=2048, num_experts=32, top_k=2, capacity_factor=None, max_seq_len=128)
model = ArcticForCausalLM(c)
model.reset_parameters(seed=0)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
ids = torch.randint(0, 256, (4, 128), generator=torch.Generator().manual_seed(0))
def step():
    out = model(input_ids=ids, labels=ids)
    (out.lm_loss_sum / ids.numel() + out.aux_loss).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
EXPERT_GRAD_PAGES = 3 * 3 * 32 * 2048 * 256 * 4 // 4096  # 3 steps of fresh w1, w2, w3 gradients (64 MiB each)


def faults(allocator: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEPS, allocator], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={**CLEAN_ENV, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt (Linux)")
def test_retain_reuses_a_steps_memory_instead_of_faulting_it_in_again():
    system, retain = faults("system"), faults("retain")
    assert system > 0.9 * EXPERT_GRAD_PAGES, system  # the reference: glibc maps and unmaps them every step
    assert retain < 0.01 * EXPERT_GRAD_PAGES, retain


def test_the_choice_and_its_errors():
    assert resolve("auto", "cpu") == "retain" and resolve("auto", "cuda") == "system"
    assert resolve("system", "cpu") == "system" and resolve("retain", "cuda") == "retain"
    with pytest.raises(ValueError, match="train.host_allocator"):
        TrainConfig(host_allocator="jemalloc")


def _losses(tmp_path, allocator: str) -> list[tuple[float, float]]:
    run_dir = tmp_path / allocator
    out = launch(*SMALL, f"run.dir={run_dir}", "train.max_steps=4", f"train.host_allocator={allocator}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"host allocator {allocator}" in out.stderr  # the log says what the run runs with
    with open(run_dir / "metrics.jsonl") as f:
        return [(m["loss"], m["grad_norm"]) for m in map(json.loads, f)]


def test_reused_memory_does_not_change_a_run(tmp_path):
    """Memory handed back dirty (not fresh zero pages) must not leak into any result."""
    assert _losses(tmp_path, "retain") == _losses(tmp_path, "system")
