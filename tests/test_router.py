import math

import pytest
import torch

from floe import router
from tests.naive_moe import naive_balance_loss, naive_route


def plan_for(logits, k, cap, policy="position", normalize=True):
    return router.route(torch.tensor(logits, dtype=torch.float32).log(), k, cap, policy, normalize)


def test_capacity_formula():
    assert router.capacity(100, 8, 2, 1.25) == math.ceil(1.25 * 2 * 100 / 8) == 32
    assert router.capacity(7, 4, 2, 1.0) == 4
    assert router.capacity(100, 8, 2, None) is None


def test_first_choices_outrank_second_choices():
    # Probabilities (logits = log p): tokens 0 and 1 pick expert 0 first; token 2 picks expert 1
    # first and expert 0 second. With capacity 2, expert 0 keeps both first choices, so token 2's
    # second choice is dropped: a second choice never displaces a first choice.
    probs = [[0.6, 0.4, 0.0001], [0.55, 0.0001, 0.45], [0.45, 0.55, 0.0001]]
    plan = plan_for(probs, 2, 2)
    assert plan.expert_ids.tolist() == [[0, 1], [0, 2], [1, 0]]
    assert plan.kept.tolist() == [[True, True], [True, True], [True, False]]


def test_position_vs_probs_policy():
    # Three tokens all pick expert 0 first; capacity 2. Token 2 is the most confident.
    probs = [[0.5, 0.3, 0.2], [0.6, 0.2, 0.2], [0.9, 0.05, 0.05]]
    by_position = plan_for(probs, 1, 2, "position")
    by_probs = plan_for(probs, 1, 2, "probs")
    assert by_position.kept[:, 0].tolist() == [True, True, False]  # earlier tokens win
    assert by_probs.kept[:, 0].tolist() == [False, True, True]  # higher probability wins


def test_dropless_keeps_everything():
    logits = torch.randn(50, 4)
    logits[:, 0] += 10  # everything wants expert 0
    plan = router.route(logits, 2, None)
    assert plan.kept.all()


def test_renormalisation_flag():
    logits = torch.randn(9, 6)
    probs = torch.softmax(logits, -1)
    top = probs.topk(2, dim=-1).values
    renorm = router.route(logits, 2, None, normalize_weights=True)
    raw = router.route(logits, 2, None, normalize_weights=False)
    torch.testing.assert_close(renorm.weights, top / top.sum(-1, keepdim=True))
    torch.testing.assert_close(raw.weights, top)
    torch.testing.assert_close(renorm.weights.sum(-1), torch.ones(9))


@pytest.mark.parametrize("num_experts", [1, 2, 8, 128])
def test_balance_loss_is_one_when_uniform(num_experts):
    tokens = num_experts * 3
    probs = torch.full((tokens, num_experts), 1.0 / num_experts)
    expert_ids = torch.stack([torch.arange(tokens) % num_experts, (torch.arange(tokens) + 1) % num_experts], 1)
    expert_ids = expert_ids[:, : min(2, num_experts)]
    assert router.balance_loss(probs, expert_ids).item() == pytest.approx(1.0, abs=1e-6)
    assert router.balance_loss(probs, expert_ids, count="all").item() == pytest.approx(1.0, abs=1e-6)


def test_balance_loss_collapsed_routing_is_num_experts():
    # All tokens to expert 0 with probability 1: E * (1 * 1) = E.
    probs = torch.zeros(10, 4)
    probs[:, 0] = 1
    assert router.balance_loss(probs, torch.zeros(10, 2, dtype=torch.long)).item() == pytest.approx(4.0)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("policy", ["position", "probs"])
def test_route_matches_naive_double_loop(seed, policy):
    g = torch.Generator().manual_seed(seed)
    num_tokens, num_experts = [(37, 8), (64, 4), (5, 16)][seed % 3]
    top_k = [1, 2, 4][seed % 3]
    cf = [0.5, 1.0, 1.25, None][seed % 4]
    logits = torch.randn(num_tokens, num_experts, generator=g) * 2
    logits[:, seed % num_experts] += 1.5  # skew so capacity actually binds
    plan = router.route(logits, top_k, router.capacity(num_tokens, num_experts, top_k, cf), policy)
    ids, weights, kept = naive_route(logits, top_k, cf, policy)
    assert plan.expert_ids.tolist() == ids
    assert plan.kept.tolist() == kept
    torch.testing.assert_close(plan.weights, weights)
    expected = naive_balance_loss(plan.probs, [row[0] for row in ids])
    torch.testing.assert_close(router.balance_loss(plan.probs, plan.expert_ids), torch.as_tensor(expected).float())


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert router.z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_unknown_drop_policy_rejected():
    with pytest.raises(ValueError, match="drop_policy"):
        router.route(torch.randn(3, 4), 2, 2, "random")
