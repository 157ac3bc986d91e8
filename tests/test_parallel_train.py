"""End-to-end: launch/train.py on N real processes (gloo) against the same run on 1 process.

Each distributed run trains a few optimizer steps and writes a checkpoint after every
step. The parameters are read back from the checkpoints' safetensors files (dense by name,
experts by global expert id), so the check also proves that a checkpoint holds every
tensor exactly once, whatever ep_size wrote it.
"""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from floe.testing.distributed import run_distributed

pytestmark = pytest.mark.slow

STEPS = 3
COMMON = [
    "model=tiny", "model.capacity_factor=null",  # dropless: the loss does not depend on the split
    "train.global_batch_size=8", "train.micro_batch_size=2", f"train.max_steps={STEPS}",
    "train.save_every=1", "train.keep_last=0", "data.num_examples=400", "data.seq_len=64",
    "log.wandb=disabled", "run.name=test",
]


def _compose(run_dir, overrides):
    from hydra import compose, initialize_config_dir

    from launch.train import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose("config", overrides=[f"run.dir={run_dir}", *COMMON, *overrides])


def _train_worker(rank, world_size, run_dir, overrides):
    from launch.train import train

    return train(_compose(run_dir, overrides))


def _bad_launch_worker(rank, world_size, run_dir, overrides):
    from launch.train import train

    try:
        train(_compose(run_dir, overrides))
    except ValueError as e:
        import torch.distributed as dist

        return {"error": str(e), "group_created": dist.is_initialized()}
    return {"error": None}


def checkpoint_params(run_dir, step, kind="model"):
    """Every parameter of the model at `step` (kind="model"), or every optimizer tensor by
    "<name>.<key>" (kind="optim"), experts stacked by global id, read from a checkpoint's files."""
    from safetensors.torch import load_file

    directory = os.path.join(run_dir, "checkpoints", f"step_{step:08d}", kind)
    state = {}
    for f in sorted(os.listdir(directory)):
        if f.startswith("dense_rank_"):
            part = load_file(os.path.join(directory, f))
            assert not set(part) & set(state), f  # each dense tensor written once
            state.update(part)
    files = sorted(f for f in os.listdir(directory) if f.startswith("expert_"))
    assert files == [f"expert_{e:05d}.safetensors" for e in range(len(files))]  # each expert once, by global id
    if files:
        experts = [load_file(os.path.join(directory, f)) for f in files]
        for key in experts[0]:
            state[key] = torch.stack([e[key] for e in experts])
    return state


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    # In a child process too: train() would leave torchrun-style variables in this
    # process's environment, where later tests' subprocesses would inherit them.
    run_dir = str(tmp_path_factory.mktemp("one") / "run")
    run_distributed(_train_worker, 1, args=(run_dir, []), timeout=90)
    return run_dir


CASES = [(2, 1, 0), (2, 2, 0), (2, 2, 2), (4, 2, 2)]


@pytest.mark.parametrize("procs,ep_size,zero_stage", CASES, ids=[f"p{p}-ep{e}-zero{z}" for p, e, z in CASES])
def test_training_matches_one_process(tmp_path, one_process, procs, ep_size, zero_stage):
    run_dir = str(tmp_path / "run")
    run_distributed(_train_worker, procs, args=(run_dir, [f"parallel.ep_size={ep_size}",
                                                          f"parallel.zero_stage={zero_stage}"]),
                    timeout=150 if procs == 4 else 90)
    ref_init = None
    for step in range(1, STEPS + 1):
        got, ref = checkpoint_params(run_dir, step), checkpoint_params(one_process, step)
        assert set(got) == set(ref)
        if ref_init is None:
            # After one optimizer step: dense, router and every expert equal within fp32 rounding.
            for name in ref:
                assert got[name].shape == ref[name].shape, name
                torch.testing.assert_close(got[name], ref[name], rtol=0, atol=2e-5, msg=lambda m: f"step 1: {name}: {m}")
            ref_init = ref
        else:
            for name in ref:
                torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-4, msg=f"step {step}: {name}")
    if ep_size > 1:  # an expert-parallel checkpoint loads into a 1-process model (experts by global id)
        from floe.config import PRESETS
        from floe.model import ArcticForCausalLM
        from floe.run.checkpoint import load_weights

        model = ArcticForCausalLM(PRESETS["tiny"].replace(capacity_factor=None))
        load_weights(model, os.path.join(run_dir, "checkpoints", f"step_{STEPS:08d}"))
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, got[name]), name
    # The loss curve (and the global gradient norm that clipping uses) is the 1-process one.
    a, b = metrics(run_dir), metrics(one_process)
    assert [m["step"] for m in a] == list(range(1, STEPS + 1))
    for ma, mb in zip(a, b):
        assert ma["loss_tokens"] == mb["loss_tokens"]
        assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-5, abs=1e-6)
        assert ma["balance_loss"] == pytest.approx(mb["balance_loss"], rel=1e-5)
        assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=1e-4)


def test_bad_launch_through_train_fails_fast_on_every_rank(tmp_path):
    """parallel.ep_size=3 on 2 processes and 8 experts: both keys named, on every rank,
    before any process group exists (so nothing can hang)."""
    results = run_distributed(_bad_launch_worker, 2, args=(str(tmp_path / "run"), ["parallel.ep_size=3"]),
                              timeout=60)
    for res in results:
        assert res["error"] is not None and "parallel.ep_size (3)" in res["error"], res
        assert "world size (2 processes)" in res["error"] and "model.num_experts (8)" in res["error"]
        assert not res["group_created"]


BF16_CASES = [(1, 1, 0), (1, 1, 1), (1, 1, 2), (2, 2, 0), (2, 2, 2)]


@pytest.mark.parametrize("procs,ep_size,zero_stage", BF16_CASES,
                         ids=[f"p{p}-ep{e}-zero{z}" for p, e, z in BF16_CASES])
def test_bf16_tracks_the_fp32_run(tmp_path, one_process, procs, ep_size, zero_stage):
    """train.precision=bf16 on the CPU (reference kernels) builds and steps DeepSpeed's bf16 path at
    every ZeRO stage, with and without expert parallelism (the GPU default; ZeRO-0 used to fail in
    deepspeed.initialize). Its loss curve tracks the 1-process fp32 run within 1% (bf16 keeps 8
    mantissa bits; fp32 master weights keep the updates) and its gradient norm within 10% (ZeRO-0
    accumulates micro-batch gradients in bf16; at ZeRO-1 DeepSpeed's BF16_Optimizer counted each
    micro-batch again at every later one, 2.5x the norm, until floe cleared its bf16 grads), and
    the losses are not the fp32 ones bit for bit (it really ran in bf16)."""
    run_dir = str(tmp_path / "run")
    run_distributed(_train_worker, procs, args=(run_dir, ["train.precision=bf16", f"parallel.ep_size={ep_size}",
                                                          f"parallel.zero_stage={zero_stage}"]), timeout=120)
    got, ref = metrics(run_dir), metrics(one_process)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for mg, mr in zip(got, ref):
        assert mg["loss"] == pytest.approx(mr["loss"], rel=1e-2), (mg, mr)
        assert mg["balance_loss"] == pytest.approx(mr["balance_loss"], rel=2e-2)
        assert math.isfinite(mg["grad_norm"]) and mg["grad_norm"] == pytest.approx(mr["grad_norm"], rel=0.1)
    assert any(mg["loss"] != mr["loss"] for mg, mr in zip(got, ref)), "bf16 gave the fp32 losses bit for bit"


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_non_finite_steps_are_skipped_alike_on_two_ranks(tmp_path, zero_stage):
    """model.init_std=1e30 on 2 processes at ep_size 2: the gradient norm is global, so both ranks
    skip the same steps (no rank enters a collective the other skips: the run ends, no hang), and
    rank 0 logs them."""
    run_dir = str(tmp_path / "run")
    results = run_distributed(_train_worker, 2, args=(run_dir, [
        "model.init_std=1e30", "train.max_steps=2", "train.max_skipped_steps=5", "parallel.ep_size=2",
        f"parallel.zero_stage={zero_stage}"]), timeout=120)
    assert [(r["skipped"], r["skipped_steps"]) for r in results] == [(True, 2), (True, 2)]
    assert [(m["skipped"], m["skipped_steps"]) for m in metrics(run_dir)] == [(True, 1), (True, 2)]


# ---- the aux-loss-free balancing bias across processes and layouts ------------------------------------

def _bias(state):
    return {k: v for k, v in state.items() if k.endswith(".moe.expert_bias")}


def test_balancing_bias_two_processes_ep2_zero2_equal_one_and_resume_at_another_layout(tmp_path):
    # Dropless, so the routed counts of the global batch are the same whatever the split; the bias
    # moves after every step (rate 0.01, large next to tiny's near-uniform router probabilities, so
    # it changes which experts are chosen) and is part of every checkpoint.
    bias = ["model.balance_bias_rate=0.01", "train.max_steps=4", "log.expert_load_every=1"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_distributed(_train_worker, 1, args=(one, bias), timeout=90)
    run_distributed(_train_worker, 2, args=(two, [*bias, "parallel.ep_size=2", "parallel.zero_stage=2"]), timeout=120)
    for step in range(1, 5):
        got, ref = checkpoint_params(two, step), checkpoint_params(one, step)
        assert set(got) == set(ref) and len(_bias(ref)) == 2
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-4, msg=f"step {step}: {name}")
        for name, b in _bias(ref).items():  # moved by +-0.01 per step: exact multiples on every rank
            assert torch.equal(got[name], b), name
            steps_taken = (b / 0.01).round()
            torch.testing.assert_close(b, steps_taken * 0.01, rtol=0, atol=1e-6)
    assert any(b.abs().sum() > 0 for b in _bias(checkpoint_params(one, 4)).values())
    # Each step's move by hand from that step's logged global routed counts: rate * sign(mean - load).
    with open(os.path.join(two, "expert_load.jsonl")) as f:
        routed = {r["step"]: r["routed_per_expert"] for r in map(json.loads, f)}
    for step in range(1, 5):
        before = _bias(checkpoint_params(two, step - 1)) if step > 1 else None
        for layer, (name, after) in enumerate(sorted(_bias(checkpoint_params(two, step)).items())):
            load = torch.tensor(routed[step][layer], dtype=torch.float64)
            start = before[name] if before else torch.zeros_like(after)
            torch.testing.assert_close(after, start + (0.01 * torch.sign(load.mean() - load)).float(), rtol=0, atol=0)
    for ma, mb in zip(metrics(two), metrics(one)):
        assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-5, abs=1e-6)
    # Resume the 2-process run's step-2 checkpoint on 1 process at ZeRO-0: the bias comes back, so
    # steps 3 and 4 (and the bias they leave) are the uninterrupted run's.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(two, resumed)
    for step in (3, 4):
        shutil.rmtree(os.path.join(resumed, "checkpoints", f"step_{step:08d}"))
    with open(os.path.join(resumed, "checkpoints", "latest"), "w") as f:
        f.write(f"step_{2:08d}")
    run_distributed(_train_worker, 1, args=(resumed, [*bias, "parallel.zero_stage=0"]), timeout=90)
    got, ref = checkpoint_params(resumed, 4), checkpoint_params(two, 4)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-4, msg=name)
    assert _bias(got).keys() == _bias(ref).keys() and all(torch.equal(got[k], ref[k]) for k in _bias(ref))
