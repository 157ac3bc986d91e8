import math

import pytest
import torch

from floe import router
from floe.testing.naive_moe import naive_balance_loss, naive_route


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


# ---- aux-loss-free balancing bias, sequence-wise balance, loss-aware drops ------------------------------

def test_expert_bias_update_hand_computed():
    # Loads [10, 2, 4, 0]: mean 4, so expert 0 (over) moves down, 1 and 3 (under) up, 2 (even) stays.
    bias = torch.tensor([0.5, 0.0, -0.25, 0.0])
    router.update_expert_bias_(bias, torch.tensor([10, 2, 4, 0]), rate=0.125)
    assert bias.tolist() == [0.375, 0.125, -0.25, 0.125]


def test_bias_chooses_experts_and_the_probabilities_weigh_them():
    # Token 0's probabilities are [0.579, 0.213, 0.129, 0.078]; a bias of 0.6 on expert 3 puts it first.
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0], [0.0, 0.1, 0.2, 3.0]])
    probs = torch.softmax(logits, -1)
    bias = torch.tensor([0.0, 0.0, 0.0, 0.6])
    plan = router.route(logits, 2, None, "probs", normalize_weights=True, expert_bias=bias)
    assert plan.expert_ids.tolist() == [[3, 0], [3, 2]]
    chosen = probs.gather(1, plan.expert_ids)  # the unbiased probabilities of the chosen experts
    torch.testing.assert_close(plan.weights, chosen / chosen.sum(-1, keepdim=True))
    torch.testing.assert_close(plan.probs, probs)
    raw = router.route(logits, 2, None, "probs", normalize_weights=False, expert_bias=bias)
    torch.testing.assert_close(raw.weights, chosen)


@pytest.mark.parametrize("seed", range(4))
def test_zero_bias_routes_exactly_as_no_bias(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(41, 8, generator=g) * 2
    logits[:, seed] += 1.5
    for policy in ("probs", "position", "loss_aware"):
        a = router.route(logits, 2, router.capacity(41, 8, 2, 1.0), policy)
        b = router.route(logits, 2, router.capacity(41, 8, 2, 1.0), policy, expert_bias=torch.zeros(8))
        assert torch.equal(a.expert_ids, b.expert_ids) and torch.equal(a.kept, b.kept)
        assert torch.equal(a.weights, b.weights)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("policy", ["probs", "loss_aware"])
def test_biased_loss_aware_route_matches_naive_loop(seed, policy):
    g = torch.Generator().manual_seed(100 + seed)
    num_tokens, num_experts, top_k = [(37, 8, 2), (64, 4, 1), (29, 16, 4)][seed % 3]
    logits = torch.randn(num_tokens, num_experts, generator=g) * 2
    logits[:, seed % num_experts] += 1.5
    bias = torch.randn(num_experts, generator=g) * 0.2
    has_loss = torch.rand(num_tokens, generator=g) < 0.4
    cap = router.capacity(num_tokens, num_experts, top_k, 0.75)
    plan = router.route(logits, top_k, cap, policy, expert_bias=bias, has_loss=has_loss)
    ids, weights, kept = naive_route(logits, top_k, 0.75, policy, bias=bias.tolist(), has_loss=has_loss.tolist())
    assert plan.expert_ids.tolist() == ids
    assert plan.kept.tolist() == kept
    torch.testing.assert_close(plan.weights, weights)


@pytest.mark.parametrize("seed", range(6))
def test_loss_aware_never_drops_a_loss_token_for_a_token_without_loss(seed):
    g = torch.Generator().manual_seed(seed)
    num_tokens, num_experts, top_k = 64, 4, 2
    logits = torch.randn(num_tokens, num_experts, generator=g) * 2
    logits[:, 0] += 2.0  # expert 0 is wanted far beyond its capacity
    has_loss = torch.rand(num_tokens, generator=g) < 0.3
    plan = router.route(logits, top_k, router.capacity(num_tokens, num_experts, top_k, 0.5), "loss_aware",
                        has_loss=has_loss)
    assert (~plan.kept[has_loss]).any()  # the case binds: some loss tokens are dropped at all
    for e in range(num_experts):
        for j in range(top_k):
            to_e = plan.expert_ids[:, j] == e
            dropped_loss = (to_e & has_loss & ~plan.kept[:, j]).any()
            kept_without_loss = (to_e & ~has_loss & plan.kept[:, j]).any()
            assert not (dropped_loss and kept_without_loss), (e, j)
    probs_plan = router.route(logits, top_k, router.capacity(num_tokens, num_experts, top_k, 0.5), "probs")
    assert (~plan.kept[has_loss]).sum() < (~probs_plan.kept[has_loss]).sum()  # it spares loss tokens


def test_loss_aware_equals_probs_when_every_token_has_a_loss():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(50, 8, generator=g) * 2
    logits[:, 3] += 2.0
    cap = router.capacity(50, 8, 2, 0.75)
    a = router.route(logits, 2, cap, "loss_aware", has_loss=torch.ones(50, dtype=torch.bool))
    b = router.route(logits, 2, cap, "probs")
    assert torch.equal(a.expert_ids, b.expert_ids) and torch.equal(a.kept, b.kept)
    assert not b.kept.all()


@pytest.mark.parametrize("count", ["first", "all"])
def test_sequence_balance_is_the_batch_formula_per_example_averaged(count):
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(30, 6, generator=g) * 2, -1)
    expert_ids = probs.topk(2, dim=-1).indices
    example_ids = torch.tensor([7] * 5 + [2] * 11 + [9] * 14)  # three examples, ids in any order
    per_example = [naive_balance_loss(probs[m], expert_ids[m, 0].tolist()) if count == "first" else
                   router.balance_loss(probs[m], expert_ids[m], count="all")
                   for m in (example_ids == 7, example_ids == 2, example_ids == 9)]
    expected = sum(float(v) for v in per_example) / 3
    got = router.sequence_balance_loss(probs, expert_ids, example_ids, count=count)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert router.balance(probs, expert_ids, "batch", example_ids).item() == pytest.approx(
        router.balance_loss(probs, expert_ids).item())


def test_sequence_balance_is_one_under_uniform_routing():
    num_experts = 4
    probs = torch.full((24, num_experts), 1.0 / num_experts)
    # every example (of 8 tokens) spreads its first choices evenly over the experts
    first = torch.arange(24) % num_experts
    expert_ids = torch.stack([first, (first + 1) % num_experts], 1)
    example_ids = torch.arange(24) // 8
    assert router.sequence_balance_loss(probs, expert_ids, example_ids).item() == pytest.approx(1.0, abs=1e-6)
    # Each example sends all its tokens to its own expert (probability 0.7): the batch looks balanced
    # (1.0), each example alone is collapsed (E * 1 * 0.7 = 2.8).
    probs = torch.full((32, num_experts), 0.1)
    example_ids = torch.arange(32) // 8
    probs[torch.arange(32), example_ids] = 0.7
    own = torch.stack([example_ids, (example_ids + 1) % num_experts], 1)
    assert router.balance_loss(probs, own).item() == pytest.approx(1.0, abs=1e-6)
    assert router.sequence_balance_loss(probs, own, example_ids).item() == pytest.approx(2.8, rel=1e-6)
