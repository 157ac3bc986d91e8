"""MoELayer against DeepSpeed's top-2 MoE (the gating that trained Arctic) on identical weights."""

import pytest
import torch
import torch.distributed as dist

from floe.parallel import teardown
from tools.bench_moe import build_pair


@pytest.fixture
def single_process_group():
    import deepspeed

    from floe.parallel.lifecycle import patched_environ, single_process_env, skip_shm_comm_build

    with patched_environ(single_process_env()):
        dist.init_process_group("gloo")
        skip_shm_comm_build()
        deepspeed.init_distributed(dist_backend="gloo")
        yield
        teardown()


@pytest.mark.parametrize("capacity_factor", [8.0, 1.0, 0.5])
def test_matches_deepspeed_top2(single_process_group, capacity_factor):
    torch.manual_seed(int(capacity_factor * 10))
    ours, theirs = build_pair(d=32, f=48, num_experts=16, top_k=2, capacity_factor=capacity_factor)
    with torch.no_grad():
        ours.gate.weight.mul_(20)  # confident, skewed routing so capacity binds
        theirs.deepspeed_moe.gate.wg.weight.copy_(ours.gate.weight)
    x = torch.randn(203, 32)
    with torch.no_grad():
        y_ours, stats = ours(x)
        y_ds, l_aux, _ = theirs(x)
        plan, _ = ours.route(x)
    torch.testing.assert_close(stats.balance_loss, l_aux.float(), rtol=1e-5, atol=1e-6)
    # DeepSpeed renormalises after dropping: a token that lost one choice gives the survivor
    # weight 1. Undo our pre-drop renormalisation for those tokens, then the outputs agree exactly.
    one_dropped = plan.kept.sum(1) == 1
    survivor_weight = (plan.weights * plan.kept).sum(1)
    expected = torch.where(one_dropped[:, None], y_ours / survivor_weight[:, None], y_ours)
    torch.testing.assert_close(y_ds, expected, rtol=1e-4, atol=1e-5)
    if capacity_factor == 8.0:
        assert plan.kept.all()
    else:
        assert one_dropped.any() and stats.dropped > 0
