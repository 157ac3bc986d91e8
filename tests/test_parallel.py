"""Expert parallelism on real processes (gloo) against the same computation on one process.

Every distributed case runs inside one spawn of N processes (process start-up dominates
on a CPU), and the parent computes the single-process reference with plain MoELayer /
ArcticForCausalLM and compares: outputs, input gradients, router gradients and every
expert's gradient by global expert id.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from floe.config import ModelConfig
from floe.layer import EXPERT_WEIGHTS, MoELayer
from floe.model import ArcticForCausalLM
from floe.parallel import expected_layout, validate_parallel
from floe.testing.distributed import DistributedError, run_distributed

D = 16


def layer_config(num_experts=8, top_k=2, capacity_factor=None, **kw):
    return ModelConfig(vocab_size=64, hidden_size=D, num_layers=1, num_heads=2, num_kv_heads=1, dense_ffn=16,
                       expert_ffn=12, num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor, **kw)


# name -> (config kwargs, tokens on each rank, skew). skew: None, or {expert: gate row scale}
# that makes every token prefer those experts (inputs are shifted positive).
LAYER_CASES = {
    "dropless_uneven": (dict(), [13, 7], None),
    "capacity_drops": (dict(capacity_factor=1.0), [16, 9], None),
    "rank1_receives_nothing": (dict(), [11, 6], {0: 1.0, 1: 0.5}),  # experts 2..7 empty too
    "all_to_one_expert": (dict(top_k=1), [9, 12], {7: 1.0}),  # rank 0 receives nothing
    "rank_sends_nothing": (dict(capacity_factor=1.25), [10, 0], None),
    "one_expert_per_rank": (dict(num_experts=2, top_k=1), [5, 8], None),
    "four_ranks": (dict(num_experts=8), [6, 9, 0, 7], None),
}


def make_layer_inputs(case):
    kw, tokens, skew = LAYER_CASES[case]
    cfg = layer_config(**kw)
    torch.manual_seed(1234)
    moe = MoELayer(cfg)
    x = torch.randn(sum(tokens), D)
    g = torch.randn(sum(tokens), D)  # upstream gradient of the output
    if skew is not None:
        x = x.abs() + 1.0
        with torch.no_grad():
            moe.gate.weight.zero_()
            for e, scale in skew.items():
                moe.gate.weight[e] = scale
    chunks = torch.tensor(tokens).cumsum(0).tolist()
    bounds = list(zip([0] + chunks[:-1], chunks))
    return cfg, moe, x, g, bounds


def layer_loss(y, stats, g):
    return (y * g).sum() + 0.1 * stats.balance_loss  # the balance loss reaches the router too


def _layer_worker(rank, world_size, cases, ep_size):
    from floe.parallel import AllToAllDispatcher, apply_expert_parallel, build_parallel_groups, init_distributed

    init_distributed(torch.device("cpu"), timeout_s=60)
    groups = build_parallel_groups(ep_size)
    out = {"ep_ranks": groups.ep_ranks, "edp_ranks": groups.edp_ranks}
    for case in cases:
        cfg, moe, x, g, bounds = make_layer_inputs(case)
        lo, hi = bounds[rank]
        per_mode = {}
        for async_dispatch in (True, False):
            holder = nn.ModuleDict({"moe": copy.deepcopy(moe)})
            apply_expert_parallel(holder, groups, async_dispatch=async_dispatch)
            ep = holder["moe"]
            assert isinstance(ep.dispatcher, AllToAllDispatcher)
            assert ep.experts.w1.shape[0] == cfg.num_experts // ep_size
            x_r = x[lo:hi].clone().requires_grad_(True)
            y, stats = ep(x_r)
            layer_loss(y, stats, g[lo:hi]).backward()
            per_mode[async_dispatch] = {
                "y": y.detach(), "dx": x_r.grad, "gate": ep.gate.weight.grad,
                "first_expert": ep.experts.first_expert,
                "experts": {w: getattr(ep.experts, w).grad for w in EXPERT_WEIGHTS},
                "tokens_per_expert": stats.tokens_per_expert, "dropped": stats.dropped,
                "balance": stats.balance_loss.detach(),
            }
        out[case] = per_mode
    return out


def reference_layer(case, ranks):
    """One process: MoELayer on each rank's tokens separately (capacity is per rank), gradients summed."""
    cfg, moe, x, g, bounds = make_layer_inputs(case)
    moe.zero_grad()
    per_rank = []
    for r in ranks:
        lo, hi = bounds[r]
        x_r = x[lo:hi].clone().requires_grad_(True)
        y, stats = moe(x_r)
        layer_loss(y, stats, g[lo:hi]).backward()
        per_rank.append({"y": y.detach(), "dx": x_r.grad, "tokens_per_expert": stats.tokens_per_expert,
                         "dropped": stats.dropped, "balance": stats.balance_loss.detach()})
    grads = {w: getattr(moe.experts, w).grad.clone() for w in EXPERT_WEIGHTS}
    return per_rank, grads, moe.gate.weight.grad.clone(), cfg


def check_layer_results(results, cases, ep_size):
    world = len(results)
    for rank, res in enumerate(results):
        assert (res["ep_ranks"], res["edp_ranks"]) == expected_layout(world, ep_size, rank)
    for case in cases:
        for rank, res in enumerate(results):
            a, s = res[case][True], res[case][False]
            for key in ("y", "dx", "gate"):  # async and blocking dispatch: the same arithmetic
                assert torch.equal(a[key], s[key]), (case, rank, key)
        for group_start in range(0, world, ep_size):
            ranks = list(range(group_start, group_start + ep_size))
            ref_rank, ref_grads, ref_gate, cfg = reference_layer(case, ranks)
            gate_sum = sum(results[r][case][True]["gate"] for r in ranks)
            torch.testing.assert_close(gate_sum, ref_gate, rtol=1e-5, atol=1e-6, msg=f"{case}: router grad")
            for i, r in enumerate(ranks):
                got, ref = results[r][case][True], ref_rank[i]
                torch.testing.assert_close(got["y"], ref["y"], rtol=1e-5, atol=1e-6, msg=f"{case} rank {r}: output")
                torch.testing.assert_close(got["dx"], ref["dx"], rtol=1e-5, atol=1e-6, msg=f"{case} rank {r}: dx")
                assert torch.equal(got["tokens_per_expert"], ref["tokens_per_expert"]), (case, r)
                assert torch.equal(got["dropped"], ref["dropped"]), (case, r)
                torch.testing.assert_close(got["balance"], ref["balance"])
                lo = got["first_expert"]
                assert lo == i * cfg.num_experts // ep_size
                for w, grad in got["experts"].items():  # every expert, by global id
                    n = grad.shape[0]
                    torch.testing.assert_close(grad, ref_grads[w][lo:lo + n], rtol=1e-5, atol=1e-6,
                                               msg=f"{case} rank {r}: {w} experts {lo}..{lo + n - 1}")


TWO_RANK_CASES = [c for c in LAYER_CASES if len(LAYER_CASES[c][1]) == 2]


@pytest.mark.slow  # spawns processes
def test_expert_parallel_layer_matches_one_process():
    """ep_size=2 on 2 ranks: dropless, dropping, skewed routing, empty ranks, empty experts."""
    results = run_distributed(_layer_worker, 2, args=(TWO_RANK_CASES, 2), timeout=90)
    check_layer_results(results, TWO_RANK_CASES, ep_size=2)


@pytest.mark.slow  # spawns processes
def test_expert_parallel_layer_four_ranks_two_groups():
    """4 ranks, ep_size=2: two independent expert-parallel groups, strided expert-data groups."""
    results = run_distributed(_layer_worker, 4, args=(["four_ranks"], 2), timeout=120)
    check_layer_results(results, ["four_ranks"], ep_size=2)


# ---------------------------------------------------------------- model level (no DeepSpeed)

def model_config(**kw):
    return ModelConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, dense_ffn=48,
                       expert_ffn=24, num_experts=4, top_k=2, capacity_factor=None, max_seq_len=64, **kw)


def make_batch(rows=4, seq=12, vocab=96):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # prompt tokens carry no loss
    pos = torch.cat([torch.arange(5), torch.arange(seq - 5)]).expand(rows, seq)  # two packed examples per row
    return ids, pos, labels


def model_loss(out, num_global_tokens, num_ranks):
    # Sum over ranks of this = (global lm mean) + mean over ranks of aux: what 1 process computes
    # when it averages the per-rank-batch aux losses.
    return out.lm_loss_sum / num_global_tokens + out.aux_loss / num_ranks


def _model_worker(rank, world_size):
    import torch.distributed as dist

    from floe.parallel import apply_expert_parallel, build_parallel_groups, full_state_dict, init_distributed

    init_distributed(torch.device("cpu"), timeout_s=60)
    groups = build_parallel_groups(world_size)
    torch.manual_seed(0)
    model = ArcticForCausalLM(model_config())
    apply_expert_parallel(model, groups)
    ids, pos, labels = make_batch()
    rows = ids.shape[0] // world_size
    sl = slice(rank * rows, (rank + 1) * rows)
    num_global = (labels[:, 1:] != -100).logical_and(pos[:, 1:] != 0).sum()
    out = model(ids[sl], position_ids=pos[sl], labels=labels[sl])
    model_loss(out, num_global, world_size).backward()
    grads = {}
    for name, p in model.named_parameters():
        if ".experts." not in name:  # dense: sum the ranks' contributions
            dist.all_reduce(p.grad)
        grads[name] = p.grad
    # Gather expert grads by global id through the same path as the weights.
    for name, p in model.named_parameters():
        p.data = p.grad
    return {"grads": full_state_dict(model), "loss": out.lm_loss_sum.detach(),
            "counts": [s.tokens_per_expert for s in out.router_stats]}


@pytest.mark.slow  # spawns processes
def test_expert_parallel_model_gradients_match_one_process():
    results = run_distributed(_model_worker, 2, timeout=90)
    torch.manual_seed(0)
    model = ArcticForCausalLM(model_config())
    ids, pos, labels = make_batch()
    num_global = (labels[:, 1:] != -100).logical_and(pos[:, 1:] != 0).sum()
    rows = ids.shape[0] // 2
    for r in range(2):
        sl = slice(r * rows, (r + 1) * rows)
        out = model(ids[sl], position_ids=pos[sl], labels=labels[sl])
        model_loss(out, num_global, 2).backward()
        torch.testing.assert_close(results[r]["loss"], out.lm_loss_sum.detach())
        for got, ref in zip(results[r]["counts"], out.router_stats):
            assert torch.equal(got, ref.tokens_per_expert)
    ref = {n: p.grad for n, p in model.named_parameters()}
    for r in range(2):
        got = results[r]["grads"]
        assert set(got) == set(ref)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=f"rank {r}: {name}")


# ---------------------------------------------------------------- bad launches

BAD_LAUNCHES = [
    # (ep_size, num_experts, zero_stage, keys the message must name) on 2 processes
    (3, 6, 0, ["parallel.ep_size (3)", "world size (2 processes)"]),
    (2, 5, 2, ["parallel.ep_size (2)", "model.num_experts (5)"]),
    (2, 4, 3, ["parallel.zero_stage=3"]),
]


def _bad_launch_worker(rank, world_size):
    from floe.parallel import init_distributed, read_launch_env, validate_parallel

    env = read_launch_env()
    messages = []
    for ep_size, num_experts, zero_stage, _ in BAD_LAUNCHES:
        try:
            validate_parallel(model_config().replace(num_experts=num_experts), env.world_size, ep_size, zero_stage)
        except ValueError as e:
            messages.append(str(e))
            continue
        init_distributed(torch.device("cpu"), timeout_s=30)  # a valid config would get here: it must not
        messages.append("no error")
    return messages


@pytest.mark.slow  # spawns processes
def test_bad_launch_fails_fast_on_every_rank():
    """Each rank raises before any process group exists, so none can wait for another."""
    results = run_distributed(_bad_launch_worker, 2, timeout=40)
    for messages in results:
        for msg, (*_, keys) in zip(messages, BAD_LAUNCHES):
            for key in keys:
                assert key in msg, msg


def _raise_on_rank1(rank, world_size):
    from floe.testing.distributed import init_process_group_from_env

    init_process_group_from_env(timeout_s=30)
    if rank == 1:
        raise ValueError("parallel.ep_size: broken on purpose")
    import torch.distributed as dist

    dist.barrier()  # rank 0 waits for a rank that is gone: the harness must not hang here


@pytest.mark.slow  # spawns processes
def test_harness_reports_failing_rank_without_hanging():
    with pytest.raises(DistributedError, match=r"first to fail: rank 1(.|\n)*parallel.ep_size: broken on purpose"):
        run_distributed(_raise_on_rank1, 2, timeout=40)


def _sleep_on_rank0(rank, world_size):
    import time

    if rank == 0:
        time.sleep(600)  # killed at the harness deadline
    return rank


@pytest.mark.slow  # spawns processes
def test_harness_timeout_names_stuck_rank():
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[0\]") as info:
        # 25 s: rank 1 must have imported torch and returned by then, even on a loaded machine
        run_distributed(_sleep_on_rank0, 2, timeout=25)
    assert "_sleep_on_rank0" in str(info.value)  # the stack dump shows where rank 0 was


def test_validate_parallel_collects_every_problem():
    with pytest.raises(ValueError) as info:
        validate_parallel(model_config().replace(num_experts=5), 4, 3, 3, global_batch_size=10, micro_batch_size=2)
    msg = str(info.value)
    assert "world size (4 processes)" in msg and "model.num_experts (5)" in msg and "parallel.zero_stage=3" in msg
    with pytest.raises(ValueError, match="train.global_batch_size"):
        validate_parallel(model_config(), 4, 2, 2, global_batch_size=12, micro_batch_size=2)
    validate_parallel(model_config(), 4, 2, 2, global_batch_size=16, micro_batch_size=2)


def test_deepspeed_pin_is_the_tested_range():
    """setup.py pins exactly the range check_deepspeed_version accepts, which holds the installed one."""
    import os
    import re

    from floe.parallel import TESTED_DEEPSPEED, check_deepspeed_version

    low, high = TESTED_DEEPSPEED
    setup = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")).read()
    assert re.search(rf'"deepspeed>={re.escape(low)},<{re.escape(high)}"', setup)
    check_deepspeed_version()  # the installed one
    check_deepspeed_version(low)
    for outside in ("0.15.4", "0.19.7", high):
        with pytest.raises(ImportError, match=f"deepspeed>={low},<{high}"):
            check_deepspeed_version(outside)


def test_layout_matches_deepspeed_docstring():
    # deepspeed.utils.groups: world 16, ep 2 -> ep groups [0,1],[2,3]..; expert-data groups [0,2,..,14],[1,3,..,15]
    assert expected_layout(16, 2, 5) == ((4, 5), tuple(range(1, 16, 2)))
    assert expected_layout(4, 4, 2) == ((0, 1, 2, 3), (2,))


# ---------------------------------------------------------------- DeepSpeed engine (no launcher)

ENGINE_GB, ENGINE_MB, ENGINE_CLIP, ENGINE_STEPS, ENGINE_SEED = 8, 2, 0.05, 2, 0


def _engine_micro_batches(step):
    ids, pos, labels = make_batch(rows=ENGINE_GB)
    ids = (ids + 13 * step) % 96  # a different global batch each step
    return ids, pos, labels


def _num_loss_tokens(pos, labels):
    return int(((labels[:, 1:] != -100) & (pos[:, 1:] != 0)).sum())


def _sgd(groups):
    # SGD, not AdamW: Adam's first step is invariant to the gradient's scale, so it would
    # hide a wrong clipping coefficient.
    return torch.optim.SGD(groups, lr=0.5)


def _engine_worker(rank, world_size, ep_size, zero_stages):
    import deepspeed

    from floe.optim import OptimConfig, param_groups
    from floe.parallel import (ParallelConfig, apply_expert_parallel, build_deepspeed_config, build_engine,
                              build_parallel_groups, check_engine, full_state_dict, init_distributed,
                              split_moe_param_groups)

    init_distributed(torch.device("cpu"), timeout_s=60)
    # A constant learning rate (no warmup, no decay): the reference is plain SGD.
    optim = OptimConfig(warmup_ratio=0.0, min_lr_ratio=1.0, weight_decay=0.1, grad_clip=ENGINE_CLIP)
    out = {}
    for zero_stage in zero_stages:
        with torch.device("meta"):
            model = ArcticForCausalLM(model_config())
        engine = build_engine(model, ParallelConfig(ep_size=ep_size, zero_stage=zero_stage), optim, seed=ENGINE_SEED,
                              device=torch.device("cpu"), global_batch_size=ENGINE_GB, micro_batch_size=ENGINE_MB,
                              total_steps=ENGINE_STEPS, make_optimizer=_sgd)
        gas = engine.grad_accum
        rows = ENGINE_GB // world_size
        states = []
        for step in range(ENGINE_STEPS):
            ids, pos, labels = _engine_micro_batches(step)
            scale = gas * world_size / _num_loss_tokens(pos, labels)  # undo DeepSpeed's 1/gas and dp mean
            for m in range(gas):
                sl = slice(rank * rows + m * ENGINE_MB, rank * rows + (m + 1) * ENGINE_MB)
                o = engine(ids[sl], position_ids=pos[sl], labels=labels[sl])
                engine.backward(o.lm_loss_sum * scale + o.aux_loss)
                if m < gas - 1:
                    engine.micro_step()
            engine.step()
            states.append(full_state_dict(engine.model))
        out[zero_stage] = states
    # The trap: without apply_deepspeed_moe the engine would reduce expert shards as dense.
    groups = build_parallel_groups(ep_size)
    model = apply_expert_parallel(ArcticForCausalLM(model_config()), groups)
    config = build_deepspeed_config(ParallelConfig(ep_size=ep_size, zero_stage=2), global_batch_size=ENGINE_GB,
                                    micro_batch_size=ENGINE_MB, dp_size=world_size, grad_clip=ENGINE_CLIP)
    ds, *_ = deepspeed.initialize(model=model, config=config,
                                  optimizer=_sgd(split_moe_param_groups(param_groups(model, 0.1))))
    try:
        check_engine(ds, model)
        out["unmarked"] = "no error"
    except RuntimeError as e:
        out["unmarked"] = str(e)
    return out


@pytest.mark.slow  # spawns processes
def test_deepspeed_engine_with_expert_parallel_matches_one_process():
    """2 ranks, ep_size=2, ZeRO 0 and 2, two SGD steps with active clipping: every parameter
    (dense, router, every expert by global id) moves exactly as on one process."""
    from floe.optim import param_groups

    results = run_distributed(_engine_worker, 2, args=(2, (0, 2)), timeout=120)
    model = ArcticForCausalLM(model_config())
    model.reset_parameters(seed=ENGINE_SEED)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = _sgd(param_groups(model, 0.1))
    ref_states, clipped = [], []
    num_micro = ENGINE_GB // ENGINE_MB
    for step in range(ENGINE_STEPS):
        ids, pos, labels = _engine_micro_batches(step)
        n = _num_loss_tokens(pos, labels)
        for m in range(num_micro):
            sl = slice(m * ENGINE_MB, (m + 1) * ENGINE_MB)
            o = model(ids[sl], position_ids=pos[sl], labels=labels[sl])
            (o.lm_loss_sum / n + o.aux_loss / num_micro).backward()
        clipped.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), ENGINE_CLIP)) > ENGINE_CLIP)
        opt.step()
        opt.zero_grad()
        ref_states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(clipped)  # so the test checks the clipping norm too
    for rank, res in enumerate(results):
        for zero_stage in (0, 2):
            for step, (got, ref) in enumerate(zip(res[zero_stage], ref_states)):
                for name in ref:  # compare updates: a wrong clip coefficient scales them
                    torch.testing.assert_close(got[name] - init[name], ref[name] - init[name], rtol=1e-3,
                                               atol=1e-8, msg=f"rank {rank} zero {zero_stage} step {step}: {name}")
        assert "apply_deepspeed_moe" in res["unmarked"]


def _fake_groups(ep_size, ep_rank):
    """A rank's view of the layout, without process groups (construction needs none)."""
    from floe.parallel import ParallelGroups

    return ParallelGroups(ep_size=ep_size, ep_rank=ep_rank, ep_group=None, edp_group=None,
                          group_name=f"ep_size_{ep_size}", ep_ranks=tuple(range(ep_size)), edp_ranks=(ep_rank,))


@pytest.mark.parametrize("ep_rank", [0, 1])
def test_meta_built_shard_initialises_the_full_models_rows(ep_rank):
    """The launcher builds on the meta device, shards, materialises, then initialises: each
    rank's dense weights and expert rows equal the 1-process model's, by global expert id."""
    from floe.config import PRESETS
    from floe.model import ArcticForCausalLM
    from floe.parallel import apply_expert_parallel

    cfg = PRESETS["tiny"]
    full = ArcticForCausalLM(cfg)
    full.reset_parameters(seed=3)
    with torch.device("meta"):
        shard = ArcticForCausalLM(cfg)
    apply_expert_parallel(shard, _fake_groups(2, ep_rank))
    shard.to_empty(device="cpu")
    shard.reset_parameters(seed=3)
    rows = slice(4 * ep_rank, 4 * ep_rank + 4)
    reference = full.state_dict()
    for name, tensor in shard.state_dict().items():
        expected = reference[name][rows] if ".moe.experts." in name else reference[name]
        assert torch.equal(tensor, expected), name


def test_arctic_rank_materialises_only_its_experts():
    from floe.config import PRESETS
    from floe.model import ArcticForCausalLM
    from floe.parallel import apply_expert_parallel

    cfg = PRESETS["arctic_480b"]
    with torch.device("meta"):
        model = ArcticForCausalLM(cfg)
    apply_expert_parallel(model, _fake_groups(128, 5))
    held = sum(p.numel() for p in model.parameters())
    total, active = cfg.num_params()
    expert = 3 * cfg.hidden_size * cfg.expert_ffn
    assert held == total - cfg.num_layers * expert * (cfg.num_experts - 1)  # one expert per layer
    assert held < 14e9  # 13.7B on a rank (10.0B dense + 35 x 1 expert), not 478.6B


def test_fix_engine_refuses_experts_without_deepspeed_markers():
    """Module.to_empty replaces Parameter objects and so drops the markers: DeepSpeed would then
    broadcast rank 0's experts to every rank. check_engine must stop the run."""
    import types

    from floe.config import PRESETS
    from floe.model import ArcticForCausalLM
    from floe.parallel import apply_deepspeed_moe, apply_expert_parallel, check_engine

    with torch.device("meta"):
        model = ArcticForCausalLM(PRESETS["tiny"])
    apply_expert_parallel(model, _fake_groups(2, 0))
    model.to_empty(device="cpu")  # markers gone with the old Parameter objects
    with pytest.raises(RuntimeError, match="lost DeepSpeed's MoE markers"):
        check_engine(types.SimpleNamespace(has_moe_layers=True), model)
    apply_deepspeed_moe(model)  # marks them again
    check_engine(types.SimpleNamespace(has_moe_layers=True), model)


_STALE_LOCK_SCRIPT = """
import torch
from floe.parallel.lifecycle import fake_process_group, init_distributed, teardown
with fake_process_group(4, 1):
    pass
init_distributed(torch.device("cpu"))
teardown()
print("up")
"""


def test_a_stale_extension_build_lock_does_not_hang_the_comm_layer(tmp_path):
    """A process killed while DeepSpeed JIT-built its CPU shared-memory op left torch's build
    lock behind, and every later process waited on it forever (CI timed out this way). floe
    never builds that op: with a stale lock planted, bringing up a fake group and a real group of
    one returns at once and builds nothing."""
    import os
    import subprocess
    import sys

    build_dir = tmp_path / "ext" / "deepspeed_shm_comm"
    build_dir.mkdir(parents=True)
    (build_dir / "lock").write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "ext")
    try:
        out = subprocess.run([sys.executable, "-c", _STALE_LOCK_SCRIPT], env=env, capture_output=True, text=True,
                             timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the comm layer waited on a stale extension build lock")
    assert out.returncode == 0 and out.stdout.strip().endswith("up"), out.stderr[-2000:]
    assert sorted(p.name for p in build_dir.iterdir()) == ["lock"], "DeepSpeed built its shm op"
