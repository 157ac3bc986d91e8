import pytest
import torch

from floe.config import PRESETS
from floe.model import ArcticForCausalLM, packed_attention_mask, shift_targets


def tiny_model(seed=0, **changes):
    torch.manual_seed(seed)
    cfg = PRESETS["tiny"].replace(capacity_factor=None, **changes)  # dropless: routing per token only
    return ArcticForCausalLM(cfg).eval()


def test_packed_row_equals_examples_alone():
    model = tiny_model()
    a = torch.randint(0, 1024, (1, 11))
    b = torch.randint(0, 1024, (1, 6))
    packed = torch.cat([a, b], dim=1)
    position_ids = torch.cat([torch.arange(11), torch.arange(6)])[None]
    with torch.no_grad():
        logits_packed = model(packed, position_ids=position_ids).logits
        logits_a = model(a).logits
        logits_b = model(b).logits
    torch.testing.assert_close(logits_packed[:, :11], logits_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits_packed[:, 11:], logits_b, rtol=1e-5, atol=1e-5)
    # Sanity: without the restart, the second example would see the first and differ.
    with torch.no_grad():
        unpacked = model(packed).logits
    assert not torch.allclose(unpacked[:, 11:], logits_b, atol=1e-3)


def test_padding_stays_out_of_the_moe():
    model = tiny_model()
    ids = torch.randint(0, 1024, (1, 9))
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    position_ids = torch.cat([torch.arange(9), torch.arange(5)])[None]
    mask = torch.cat([torch.ones(9), torch.zeros(5)])[None].bool()
    with torch.no_grad():
        out = model(padded, position_ids=position_ids, attention_mask=mask)
        alone = model(ids)
    torch.testing.assert_close(out.logits[:, :9], alone.logits, rtol=1e-5, atol=1e-5)
    for st_pad, st_alone in zip(out.router_stats, alone.router_stats):
        assert torch.equal(st_pad.tokens_per_expert, st_alone.tokens_per_expert)
        assert st_pad.tokens_per_expert.sum() == 9 * 2
        torch.testing.assert_close(st_pad.balance_loss, st_alone.balance_loss)


def test_causality():
    model = tiny_model()
    ids = torch.randint(0, 1024, (2, 12))
    changed = ids.clone()
    changed[:, 8:] = torch.randint(0, 1024, (2, 4))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[:, :8], model(changed).logits[:, :8])


def test_moe_reads_block_input_not_attention_output():
    # Zeroing attention's output projection changes h but must not change what the MoE computes.
    model = tiny_model(num_layers=1)
    block = model.layers[0]
    x = torch.randn(2, 5, 64)
    seen = []
    block.moe.register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    rope = model.rotary(torch.arange(5).expand(2, 5), x.dtype)
    with torch.no_grad():
        pending = block.moe.start(block.norm_moe(x).reshape(10, 64))
        expected, _ = block.moe.finish(pending)
        out1, _ = block(x, rope, None, None)
        block.attn.o_proj.weight.zero_()
        out2, _ = block(x, rope, None, None)
        h_only = x + block.mlp(block.norm_res(x))  # attention now adds zero
    torch.testing.assert_close(out2, h_only + expected.view(2, 5, 64), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out1, out2)


def test_loss_is_completion_only_and_never_crosses_examples():
    model = tiny_model()
    ids = torch.randint(0, 1024, (1, 8))
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    labels = torch.tensor([[-100, -100, 5, 6, 7, -100, 9, 10]])
    targets = shift_targets(labels, position_ids)
    # label 7 sits on the first token of the 2nd example: never predicted from the 1st example
    assert targets.tolist() == [[-100, 5, 6, -100, -100, 9, 10]]
    with torch.no_grad():
        out = model(ids, position_ids=position_ids, labels=labels)
    logp = torch.log_softmax(out.logits[0, :-1].float(), -1)
    expected = -(logp[1, 5] + logp[2, 6] + logp[5, 9] + logp[6, 10]) / 4
    torch.testing.assert_close(out.lm_loss, expected)
    assert out.num_loss_tokens.item() == 4
    torch.testing.assert_close(out.loss, out.lm_loss + 0.01 * out.balance_loss)


def test_packed_mask_shape_and_blocks():
    mask = packed_attention_mask(torch.tensor([[0, 1, 2, 0, 1]]))
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]])
    assert torch.equal(mask[0, 0], expected.bool())


def test_freeze_moe_trains_dense_only():
    model = tiny_model(freeze_moe=True)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(".moe." in n for n in frozen)
    assert any(n.endswith("moe.gate.weight") for n in frozen)


def test_dropless_forward_matches_a_dropless_config():
    capped = ArcticForCausalLM(PRESETS["tiny"].replace(capacity_factor=0.5)).eval()
    dropless = ArcticForCausalLM(PRESETS["tiny"].replace(capacity_factor=None)).eval()  # weights loaded below
    dropless.load_state_dict(capped.state_dict())
    ids = torch.randint(0, 1024, (2, 16))
    with torch.no_grad():
        out, ref, dropped = capped(ids, dropless=True), dropless(ids), capped(ids)
    assert sum(int(st.dropped) for st in dropped.router_stats) > 0
    assert all(int(st.dropped) == 0 for st in out.router_stats)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)


def _naive_allowed(position_ids):
    """allowed[b, q, k]: key k is in query q's packed example and not after it, by a plain loop."""
    rows, s = position_ids.shape
    allowed = torch.zeros(rows, s, s, dtype=torch.bool)
    for b in range(rows):
        doc, docs = 0, []
        for t in range(s):
            doc += int(position_ids[b, t] == 0)
            docs.append(doc)
        for q in range(s):
            for k in range(q + 1):
                allowed[b, q, k] = docs[q] == docs[k]
    return allowed


def _packed_positions():
    # row 0: examples of 5, 40, 1 and 24 tokens; row 1 starts mid-example (no restart at 0) then
    # 3 examples; row 2: one example over the whole row
    rows = [[*range(5), *range(40), 0, *range(24)], [*range(7, 30), *range(20), *range(12), *range(15)],
            list(range(70))]
    return torch.tensor(rows)


def test_packed_masks_match_a_naive_loop():
    from torch.nn.attention.flex_attention import create_mask

    from floe.model import packed_block_mask

    pos = _packed_positions()
    allowed = _naive_allowed(pos)
    assert torch.equal(packed_attention_mask(pos)[:, 0], allowed)
    block = 16  # 70 tokens: 5 blocks, the last one partial
    bm = packed_block_mask(pos, block_size=block)
    assert torch.equal(create_mask(bm.mask_mod, 3, 1, 70, 70)[:, 0], allowed)
    # The block lists: a block is visited iff it holds an allowed pair (empty ones are skipped).
    nb = -(-70 // block)
    padded = torch.zeros(3, nb * block, nb * block, dtype=torch.bool)
    padded[:, :70, :70] = allowed
    any_allowed = padded.view(3, nb, block, nb, block).any(4).any(2)
    assert torch.equal(bm.to_dense()[:, 0].bool(), any_allowed)
    assert bm.to_dense().sum() < nb * (nb + 1) // 2 * 3  # fewer blocks than plain causal


def test_flex_attention_forward_equals_dense_mask_on_cpu():
    model = tiny_model()
    pos = _packed_positions()
    ids = torch.randint(0, 1024, pos.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids, position_ids=pos).logits
        model.packed_attention = "flex"
        flex = model(ids, position_ids=pos).logits
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_packed_attention_equals_dense_mask(dtype):
    """On CUDA packed rows take FlexAttention with a block mask (compiled): the loss and every
    gradient equal the dense-mask SDPA path."""
    pos = _packed_positions().cuda()
    ids = torch.randint(0, 1024, pos.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    results = {}
    for kind in ("dense", "auto"):
        model = tiny_model().train().to(device="cuda", dtype=dtype)
        model.packed_attention = kind
        out = model(ids, position_ids=pos, labels=ids)
        out.loss.backward()
        results[kind] = (out.logits.float(), {n: p.grad.float() for n, p in model.named_parameters()})
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(results["auto"][0], results["dense"][0], **tol)
    for name, grad in results["dense"][1].items():
        torch.testing.assert_close(results["auto"][1][name], grad, **tol, msg=name)


# ---- NEFTune (train.neftune_alpha) -----------------------------------------------------------------------

def _embedding_seen_by_block0(model, ids, pos):
    seen = []
    handle = model.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    model(ids, position_ids=pos)
    handle.remove()
    return seen[0]


def test_neftune_noise_per_packed_example_follows_the_formula():
    torch.manual_seed(0)
    model = ArcticForCausalLM(PRESETS["tiny"])  # hidden 64
    alpha, d = 5.0, 64
    lengths = [10, 30, 24]  # two examples and the padding tail, in every one of 16 rows
    pos = torch.cat([torch.arange(n) for n in lengths]).expand(16, -1)
    ids = torch.randint(0, 1024, pos.shape)
    clean = _embedding_seen_by_block0(model, ids, pos)
    model.neftune_alpha = alpha
    noise = _embedding_seen_by_block0(model, ids, pos) - clean
    start = 0
    for n in lengths:
        part = noise[:, start:start + n]
        start += n
        bound = alpha / (n * d) ** 0.5  # the example's own length, not the row's (64)
        assert part.abs().max() <= bound * (1 + 1e-5)
        assert part.abs().max() >= 0.99 * bound  # uniform: thousands of draws reach the edge
        assert abs(part.mean()) < 0.05 * bound
        assert part.var().item() == pytest.approx(bound ** 2 / 3, rel=0.08)  # Var U(-b, b) = b^2 / 3
    # one example per row (no position_ids): L is the row length, as transformers does
    plain = model.embed_tokens(ids)
    seen = []
    handle = model.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    model(ids)
    handle.remove()
    assert (seen[0] - plain).abs().max() <= alpha / (64 * d) ** 0.5 * (1 + 1e-5)


def test_neftune_is_off_in_eval_mode_and_without_grad():
    torch.manual_seed(0)
    model = ArcticForCausalLM(PRESETS["tiny"])
    ids = torch.randint(0, 1024, (2, 16))
    pos = torch.arange(16).expand(2, -1)
    clean = _embedding_seen_by_block0(model, ids, pos)
    model.neftune_alpha = 5.0
    with torch.no_grad():  # still in training mode
        assert torch.equal(_embedding_seen_by_block0(model, ids, pos), clean)
    model.eval()
    assert torch.equal(_embedding_seen_by_block0(model, ids, pos), clean)
    model.train()
    assert not torch.equal(_embedding_seen_by_block0(model, ids, pos), clean)


def test_freeze_router_trains_everything_but_the_gates():
    model = tiny_model(freeze_router=True)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"layers.{i}.moe.gate.weight" for i in range(model.config.num_layers)}


def test_token_info_marks_examples_and_trained_predictions():
    # Row 0 packs examples [0..2] and [3..5]; row 1 holds one example, its last token padding.
    model = tiny_model(balance_scope="sequence", drop_policy="loss_aware")
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    labels = torch.tensor([[-100, 5, 6, -100, -100, 7], [-100, -100, 8, 9, -100, -100]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    moe_tokens = attention_mask.reshape(-1).nonzero().squeeze(1)
    info = model.token_info(position_ids, labels, moe_tokens)
    # A token has a loss when the next token of its own example has a label.
    assert info.has_loss_T.tolist() == [True, True, False, False, True, False,
                                        False, True, True, False, False]
    ex = info.example_ids_T.tolist()
    assert ex[0] == ex[1] == ex[2] != ex[3] == ex[4] == ex[5] and len(set(ex[6:])) == 1 and ex[6] not in ex[:6]
    assert tiny_model().token_info(position_ids, None, moe_tokens) is None  # defaults: nothing to compute


def test_dropped_loss_counts_against_a_direct_count():
    # Capacity 0.5: many assignments drop; dropped_loss counts those of tokens whose prediction is trained.
    for policy in ("probs", "loss_aware"):
        torch.manual_seed(0)
        model = ArcticForCausalLM(PRESETS["tiny"].replace(capacity_factor=0.5, drop_policy=policy)).eval()
        ids = torch.randint(0, 1024, (2, 32))
        labels = torch.where(torch.rand(2, 32) < 0.4, ids, torch.full_like(ids, -100))
        position_ids = torch.arange(32).expand(2, 32)
        out = model(ids, position_ids=position_ids, labels=labels)
        has_loss = model.token_info(position_ids, labels, None).has_loss_T
        for layer, st in zip(model.layers, out.router_stats):
            plan, _ = layer.moe.route(layer.norm_moe(_block_input(model, ids, layer)).reshape(64, -1),
                                      tokens=model.token_info(position_ids, labels, None))
            assert st.dropped_loss.item() == (~plan.kept & has_loss[:, None]).sum().item()
            assert st.loss_assignments.item() == has_loss.sum().item() * model.config.top_k
            assert st.dropped.item() > st.dropped_loss.item() >= 0


def _block_input(model, ids, layer, position_ids=None):
    """The input x of `layer` (a block of `model`) for input_ids `ids`: embeddings through the earlier blocks."""
    captured = {}

    def keep_input(module, args):
        captured["x"] = args[0]  # returns None: the block's arguments are left as they are
    hook = layer.register_forward_pre_hook(keep_input)
    with torch.no_grad():
        model(ids, position_ids=position_ids)
    hook.remove()
    return captured["x"]


def test_sequence_scope_is_each_packed_examples_balance_averaged():
    # Two rows, each packing examples of 12, 9 and 11 tokens: the layer's balance loss is the
    # batch formula (naive loop) on each of the 6 examples alone, averaged.
    from floe.testing.naive_moe import naive_balance_loss

    torch.manual_seed(0)
    model = ArcticForCausalLM(PRESETS["tiny"].replace(capacity_factor=None, balance_scope="sequence")).eval()
    position_ids = torch.cat([torch.arange(n) for n in (12, 9, 11)]).expand(2, 32)
    ids = torch.randint(0, 1024, (2, 32))
    with torch.no_grad():
        out = model(ids, position_ids=position_ids)
    starts = torch.tensor([0, 12, 21, 32])
    for layer, st in zip(model.layers, out.router_stats):
        x = _block_input(model, ids, layer, position_ids)
        plan, _ = layer.moe.route(layer.norm_moe(x).reshape(64, -1))
        per_example = []
        for row in range(2):
            for a, b in zip(starts[:-1], starts[1:]):
                t = slice(row * 32 + a, row * 32 + b)
                per_example.append(float(naive_balance_loss(plan.probs[t], plan.expert_ids[t, 0].tolist())))
        assert st.balance_loss.item() == pytest.approx(sum(per_example) / 6, rel=1e-5)
    batch = ArcticForCausalLM(PRESETS["tiny"].replace(capacity_factor=None)).eval()
    batch.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert batch(ids, position_ids=position_ids).balance_loss.item() != pytest.approx(out.balance_loss.item())


def test_freeze_router_leaves_the_gates_without_gradient():
    model = tiny_model(freeze_router=True).train()
    ids = torch.randint(0, 1024, (2, 16))
    model(ids, labels=ids).loss.backward()
    for block in model.layers:
        assert block.moe.gate.weight.grad is None and block.moe.experts.w1.grad is not None
