import pytest
import torch

from floe.config import ModelConfig
from floe.layer import MoELayer
from floe.testing.naive_moe import naive_moe


def tiny_moe_config(num_experts, top_k, capacity_factor, drop_policy="probs", **kw):
    return ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, dense_ffn=16,
                       expert_ffn=12, num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor,
                       drop_policy=drop_policy, **kw)


CASES = [
    # (num_experts, top_k, capacity_factor, num_tokens)
    (1, 1, None, 7),
    (4, 1, 0.5, 33),
    (4, 2, 1.25, 33),
    (4, 4, 0.5, 19),
    (4, 2, None, 1),
    (128, 2, 1.25, 61),
    (128, 4, 0.5, 45),
    (128, 1, None, 23),
]


@pytest.mark.parametrize("num_experts,top_k,capacity_factor,num_tokens", CASES)
@pytest.mark.parametrize("drop_policy", ["probs", "position"])
def test_layer_matches_naive_loop(num_experts, top_k, capacity_factor, num_tokens, drop_policy):
    torch.manual_seed(num_experts * 1000 + top_k * 10 + num_tokens)
    cfg = tiny_moe_config(num_experts, top_k, capacity_factor, drop_policy, init_std=0.3)
    layer = MoELayer(cfg)
    x = torch.randn(num_tokens, cfg.hidden_size, requires_grad=True)
    proj = torch.randn(num_tokens, cfg.hidden_size)  # a random linear loss sees every output element

    y, stats = layer(x)
    (y * proj).sum().backward()
    experts = layer.experts
    grads = [x.grad, layer.gate.weight.grad, experts.w1.grad, experts.w2.grad, experts.w3.grad]

    params = [p.detach().clone().requires_grad_() for p in (layer.gate.weight, experts.w1, experts.w3, experts.w2)]
    x_ref = x.detach().clone().requires_grad_()
    y_ref, ids, kept = naive_moe(x_ref, *params, top_k, capacity_factor, drop_policy)
    (y_ref * proj).sum().backward()
    gate_ref, w1_ref, w3_ref, w2_ref = params
    ref_grads = [x_ref.grad, gate_ref.grad, w1_ref.grad, w2_ref.grad, w3_ref.grad]

    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for name, got, want in zip(("x", "gate", "w1", "w2", "w3"), grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")

    num_dropped = sum(not k for row in kept for k in row)
    assert stats.dropped.item() == num_dropped
    assert stats.num_assignments == num_tokens * top_k
    counts = torch.zeros(num_experts, dtype=torch.long)
    for row_ids, row_kept in zip(ids, kept):
        for e, k in zip(row_ids, row_kept):
            counts[e] += int(k)
    assert torch.equal(stats.tokens_per_expert, counts)
    if capacity_factor == 0.5 and num_tokens > 10:
        assert num_dropped > 0  # the case really exercises dropping


def test_fully_dropped_token_passes_nothing():
    torch.manual_seed(0)
    cfg = tiny_moe_config(2, 1, 0.5, "position")
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[0] = 1.0  # every token prefers expert 0 (positive inputs)
    x = torch.rand(8, cfg.hidden_size) + 0.1
    y, stats = layer(x)
    # capacity = ceil(0.5 * 1 * 8 / 2) = 2: tokens 2..7 are dropped and output exactly zero
    assert stats.dropped.item() == 6
    assert torch.count_nonzero(y[2:]) == 0
    assert torch.count_nonzero(y[:2]) > 0


def test_empty_input():
    layer = MoELayer(tiny_moe_config(4, 2, 1.25))
    x = torch.zeros(0, 16, requires_grad=True)
    y, stats = layer(x)
    y.sum().backward()
    assert y.shape == (0, 16) and stats.dropped.item() == 0


def test_expert_weight_layout_is_linear_out_in():
    cfg = tiny_moe_config(4, 2, None)
    layer = MoELayer(cfg)
    assert layer.experts.w1.shape == (4, cfg.expert_ffn, cfg.hidden_size)
    assert layer.experts.w3.shape == (4, cfg.expert_ffn, cfg.hidden_size)
    assert layer.experts.w2.shape == (4, cfg.hidden_size, cfg.expert_ffn)
    assert layer.gate.weight.shape == (4, cfg.hidden_size)


def test_stacked_experts_enter_autograd_once():
    """The classic trap: slicing w[e] per expert in a Python loop gives autograd one
    full-size zero gradient per expert (O(E^2) traffic). Each stacked weight must reach the
    graph through a single node, whatever the number of experts."""
    layer = MoELayer(tiny_moe_config(128, 2, None))
    y, _ = layer(torch.randn(300, 16))
    stacked = {id(layer.experts.w1), id(layer.experts.w2), id(layer.experts.w3)}
    users, seen, stack = {}, set(), [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None and type(child).__name__ == "AccumulateGrad" and id(child.variable) in stacked:
                users[id(child.variable)] = users.get(id(child.variable), 0) + 1
            stack.append(child)
    assert users == {i: 1 for i in stacked}, users
    assert not any(type(n).__name__ in ("SelectBackward0", "UnbindBackward0") for n in seen)


def test_sharded_experts_hold_the_full_modules_rows_and_init():
    """shard_ keeps global experts [first, first + L); the keyed init of a shard draws the same
    rows as the full module's init (so sharding before or after init agrees), and w2 uses the
    residual-output std, as ArcticForCausalLM's init does."""
    cfg = tiny_moe_config(8, 2, None).replace(num_layers=4)
    full = MoELayer(cfg)
    full.init_weights(seed=5, key="layers.1.moe")
    shard = MoELayer(cfg)
    shard.experts.shard_(2, 3)
    shard.init_weights(seed=5, key="layers.1.moe")
    assert (shard.experts.first_expert, shard.experts.num_local_experts, shard.experts.num_experts) == (2, 3, 8)
    for w in ("w1", "w3", "w2"):
        assert torch.equal(getattr(shard.experts, w), getattr(full.experts, w)[2:5]), w
    assert torch.equal(shard.gate.weight, full.gate.weight)
    std_w1, std_w2 = full.experts.w1.std().item(), full.experts.w2.std().item()
    assert abs(std_w1 - 0.02) < 0.002 and abs(std_w2 - 0.02 / 8 ** 0.5) < 0.001, (std_w1, std_w2)
    with pytest.raises(ValueError, match="cannot shard"):
        shard.experts.shard_(0, 2)  # already a shard


def test_dropless_flag_ignores_capacity():
    torch.manual_seed(3)
    layer = MoELayer(tiny_moe_config(4, 2, 0.5, init_std=0.3))
    dropless = MoELayer(tiny_moe_config(4, 2, None, init_std=0.3))
    dropless.load_state_dict(layer.state_dict())
    x = torch.randn(40, 16)
    y_capped, capped = layer(x)
    y, stats = layer(x, dropless=True)
    y_ref, ref = dropless(x)
    assert capped.dropped > 0 and stats.dropped == 0
    assert torch.equal(y, y_ref) and torch.equal(stats.tokens_per_expert, ref.tokens_per_expert)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_unpermute_matches_index_add_of_weighted_rows(dtype):
    """MoELayer.unpermute's own backward against autograd through index_add of y * weight, with
    tokens that get 0, 1 and 2 rows (dropped assignments) and fp32 router weights."""
    from floe.layer import Permutation

    torch.manual_seed(0)
    token_idx = torch.tensor([0, 3, 3, 1, 0, 4, 2, 4])  # token 5 has no surviving row
    y = torch.randn(8, 5, dtype=dtype, requires_grad=True)
    w = torch.rand(8, requires_grad=True)
    g = torch.randn(6, 5, dtype=dtype)
    perm = Permutation(token_idx_A=token_idx, weight_A=w, tokens_per_expert_E=torch.zeros(1))
    out = MoELayer.unpermute(y, perm, 6)
    dy, dw = torch.autograd.grad(out, (y, w), g)
    ref = torch.zeros(6, 5, dtype=dtype).index_add(0, token_idx, y * w.to(dtype)[:, None])
    ref_dy, ref_dw = torch.autograd.grad(ref, (y, w), g)
    assert torch.equal(out, ref) and out[5].abs().sum() == 0
    tol = dict(rtol=0, atol=0) if dtype == torch.float64 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(dy, ref_dy, **tol)
    torch.testing.assert_close(dw, ref_dw, **tol)


@pytest.mark.parametrize("drop_policy", ["probs", "position"])
def test_zero_bias_is_todays_layer_exactly(drop_policy):
    # model.balance_bias_rate > 0 registers a zero bias: until it moves, outputs, gradients and stats
    # are bit for bit those of the default layer (same seed, same weights).
    cfgs = [tiny_moe_config(8, 2, 0.75, drop_policy, init_std=0.3, balance_bias_rate=r) for r in (0.0, 0.01)]
    x = torch.randn(40, 16)
    results = []
    for cfg in cfgs:
        torch.manual_seed(5)
        layer = MoELayer(cfg)
        xi = x.clone().requires_grad_()
        y, stats = layer(xi)
        y.square().sum().backward()
        results.append((y, xi.grad, layer.gate.weight.grad, layer.experts.w1.grad, stats))
    assert "expert_bias" not in dict(MoELayer(cfgs[0]).named_buffers())
    (y0, gx0, gg0, gw0, s0), (y1, gx1, gg1, gw1, s1) = results
    for a, b in ((y0, y1), (gx0, gx1), (gg0, gg1), (gw0, gw1), (s0.balance_loss, s1.balance_loss),
                 (s0.tokens_per_expert, s1.tokens_per_expert), (s0.routed_per_expert, s1.routed_per_expert)):
        assert torch.equal(a, b)
    assert s0.dropped.item() == s1.dropped.item() > 0


def _skewed_router_run(rate: float, balance_coef: float, steps: int = 60) -> list[float]:
    """Load CV per step of a layer whose router is initialised to prefer expert 0 (about half of
    every token's probability), trained by Adam on a regression target; the bias (if any) moves
    after each step from that step's counts, as the trainer does."""
    from floe.run.metrics import load_cv

    torch.manual_seed(0)
    cfg = tiny_moe_config(8, 2, None, init_std=0.3, balance_bias_rate=rate, balance_coef=balance_coef)
    layer = MoELayer(cfg)
    g = torch.Generator().manual_seed(1)
    u = torch.randn(16, generator=g)
    u = u / u.norm()
    x = torch.randn(256, 16, generator=g) + 2 * u  # every token shares the direction u ...
    with torch.no_grad():
        layer.gate.weight[0] += 1.5 * u  # ... that expert 0's router row points along
    target = torch.randn(256, 16, generator=g)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    cvs = []
    for _ in range(steps):
        y, stats = layer(x)
        loss = (y - target).square().mean() + balance_coef * stats.balance_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        layer.update_expert_bias(stats.routed_per_expert)
        cvs.append(load_cv([stats.routed_per_expert.tolist()]))
    return cvs


def test_bias_rebalances_a_collapsed_router_without_any_balance_loss():
    # Bound: from a load CV of ~1.0 (expert 0 chosen by every token), rate 0.01 brings the CV under
    # 0.4 at every step from step 40 on, 0.25 on average over steps 40..59. With neither the bias nor
    # the balance loss, the CV never falls below 0.7 in the same 60 steps.
    with_bias = _skewed_router_run(rate=0.01, balance_coef=0.0)
    assert with_bias[0] > 0.95
    assert max(with_bias[40:]) < 0.4 and sum(with_bias[40:]) / 20 < 0.25, with_bias
    neither = _skewed_router_run(rate=0.0, balance_coef=0.0)
    assert min(neither) > 0.7, neither
