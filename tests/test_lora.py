"""floe.lora against PEFT's LoRA on the independent Arctic reference (experts as nn.Linear modules)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from floe.config import PRESETS
from floe.errors import ConfigError  # noqa: F401  (ConfigError is a ValueError: the config tests below)
from floe.hf import hf_config_from, peft_target_modules, to_hf, to_peft
from floe.lora import (LORA_TARGETS, GroupedLoRA, LoRA, LoRAConfig, adapters, apply_lora, disable_adapters,
                       is_adapter_name, lora_model_errors, merge_lora, merged_state_dict, trainable_parameters,
                       unmerge_lora)
from floe.model import ArcticForCausalLM
from floe.testing.arctic_reference import ArcticReference

IDS = torch.tensor([[5, 17, 3, 88, 42, 9, 61, 2, 33, 70, 14, 7], [1, 90, 23, 23, 57, 8, 40, 11, 76, 5, 29, 64]])
ALL = list(LORA_TARGETS)


def lora_model(seed=3, rank=4, alpha=8.0, rslora=False, targets=ALL, dropout=0.0, train_router=False,
               random_b=True, train_embeddings=False, **model_changes):
    """A dropless tiny floe model with adapters; B drawn at random (as after training) unless random_b=False."""
    cfg = PRESETS["tiny"].replace(capacity_factor=None, **model_changes)
    model = ArcticForCausalLM(cfg)
    model.reset_parameters(seed=seed)
    apply_lora(model, LoRAConfig(rank=rank, alpha=alpha, rslora=rslora, targets=list(targets), dropout=dropout,
                                 train_router=train_router, train_embeddings=train_embeddings), seed=seed + 1)
    if random_b:
        g = torch.Generator().manual_seed(seed + 2)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if is_adapter_name(name) and name.endswith(("B", "_B")):
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def base_state(model):
    return {k: v for k, v in model.state_dict().items() if not is_adapter_name(k)}


def peft_reference(model, rank, alpha, rslora, targets=ALL):
    """PEFT's own LoRA injected into ArcticReference holding floe's base weights, floe's adapters copied in
    through PEFT's own loader (set_peft_model_state_dict) under to_peft's names."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    cfg = model.config
    ref = ArcticReference(hf_config_from(cfg))
    ref.load_state_dict(to_hf(base_state(model), cfg), strict=True)
    ref = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, lora_dropout=0.0,
                                             target_modules=peft_target_modules(targets)), ref)
    trained = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}
    peft_state = {k.removeprefix("base_model.model."): v for k, v in to_peft(trained, cfg).items()}
    result = set_peft_model_state_dict(ref, peft_state)
    assert not result.unexpected_keys, result.unexpected_keys[:5]
    return ref


@pytest.mark.parametrize("rslora", [False, True])
def test_logits_and_adapter_gradients_equal_peft(rslora):
    model = lora_model(rslora=rslora)
    ref = peft_reference(model, 4, 8.0, rslora)
    lora_params = {n: p for n, p in ref.named_parameters() if "lora_" in n}
    # every floe adapter row has its PEFT twin: 2 layers x (4 attention + 3 dense + 8 experts x 3) x (A, B)
    assert len(lora_params) == 2 * (4 + 3 + 8 * 3) * 2
    weights = torch.linspace(-1, 1, 1024)  # a loss that weighs every logit differently
    got = model(IDS).logits
    expected = ref(IDS)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    floe_grads = to_peft({n: p.grad for n, p in trainable_parameters(model).items()}, model.config)
    assert len(floe_grads) == len(lora_params)
    for name, grad in floe_grads.items():
        key = name.removeprefix("base_model.model.").replace(".weight", ".default.weight")
        torch.testing.assert_close(grad, lora_params[key].grad, atol=2e-5, rtol=1e-4, msg=key)
    # the adapters matter: the base alone computes something else
    with torch.no_grad(), disable_adapters(model):
        assert (model(IDS).logits - expected).abs().max() > 1e-3


def test_step_zero_is_the_base_model_bit_for_bit():
    model = lora_model(random_b=False)
    with torch.no_grad():
        got = model(IDS).logits
        with disable_adapters(model):
            base = model(IDS).logits
    assert torch.equal(got, base)
    assert all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters() if n.endswith(("B", "_B")))


def test_only_adapters_train_and_router_on_request():
    model = lora_model()
    names = set(trainable_parameters(model))
    assert names and all(is_adapter_name(n) for n in names)
    kinds = {type(a) for _, a in adapters(model)}
    assert kinds == {LoRA, GroupedLoRA}
    routed = lora_model(train_router=True)
    assert {n for n in trainable_parameters(routed) if not is_adapter_name(n)} == {
        f"layers.{i}.moe.gate.weight" for i in range(2)}
    embedded = lora_model(train_embeddings=True)
    assert {n for n in trainable_parameters(embedded) if not is_adapter_name(n)} == {
        "embed_tokens.weight", "lm_head.weight"}
    attn_only = lora_model(targets=["attention"])
    assert all(".attn." in n for n in trainable_parameters(attn_only))


def test_merge_equals_unmerged_and_unmerge_restores():
    model = lora_model()
    before = {k: v.clone() for k, v in base_state(model).items()}
    with torch.no_grad():
        unmerged = model(IDS).logits
        merged_dict = merged_state_dict(model)
        plain = ArcticForCausalLM(model.config)
        plain.load_state_dict(merged_dict, strict=True)
        torch.testing.assert_close(plain(IDS).logits, unmerged, atol=2e-5, rtol=1e-4)
        merge_lora(model)
        torch.testing.assert_close(model(IDS).logits, unmerged, atol=2e-5, rtol=1e-4)
        assert any(not torch.equal(before[k], v) for k, v in base_state(model).items())
        unmerge_lora(model)
        for k, v in base_state(model).items():
            torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)
        torch.testing.assert_close(model(IDS).logits, unmerged, atol=2e-5, rtol=1e-4)


def test_dropout_applies_in_training_only():
    model = lora_model(dropout=0.5)
    with torch.no_grad():
        model.eval()
        a, b = model(IDS).logits, model(IDS).logits
        assert torch.equal(a, b)
        model.train()
        torch.manual_seed(0)
        c = model(IDS).logits
        torch.manual_seed(0)
        assert torch.equal(c, model(IDS).logits)  # the draws come from torch's RNG (restored on resume)
        assert (c - a).abs().max() > 1e-4


def test_dropout_statistics():
    """floe.lora.Dropout: each element zeroed with probability p, the gain 1/(1-p) making it unbiased;
    in evaluation x itself; p 0 draws nothing."""
    from floe.lora import Dropout

    x = torch.ones(1000, 1000)
    for p in (0.05, 0.3):
        d = Dropout(p).train()
        y = d(x)
        zeros = (y == 0).float().mean().item()
        assert abs(zeros - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5, (p, zeros)
        assert set(y.unique().tolist()) == {0.0, 1.0} and d.gain == 1 / (1 - p)
        assert abs((y * d.gain).mean().item() - 1) < 0.005
        assert d.eval()(x) is x and d.gain == 1.0
    rng = torch.get_rng_state()
    assert Dropout(0.0).train()(x) is x and torch.equal(rng, torch.get_rng_state())


def test_adapters_of_one_input_share_one_dropout_mask():
    """q/k/v (and the dense MLP's w1/w3) read one input, so their adapters see one dropped copy of it,
    as LoRA on a fused projection does; each projection's output is still W x + s B A dropped(x)."""
    model = lora_model(dropout=0.5).train()
    seen = {}

    def record(name):
        def hook(linear, args, out):
            shared = linear.lora.shared_input
            seen[name] = shared
            if shared is not None:
                assert shared[0] is args[0]
                expected = F.linear(args[0], linear.weight) + \
                    F.linear(F.linear(shared[1], linear.lora.A) * linear.lora.scaling * 2, linear.lora.B)
                torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        return hook

    layer = model.layers[0]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(layer.attn, name).register_forward_hook(record(name))
    for name in ("w1", "w3", "w2"):
        getattr(layer.mlp, name).register_forward_hook(record(name))
    model(IDS)
    x, dropped = seen["q_proj"]
    assert seen["k_proj"][1] is dropped and seen["v_proj"][1] is dropped and seen["w3"][1] is seen["w1"][1]
    assert seen["o_proj"] is None and seen["w2"] is None  # each reads an input of its own: its own mask
    kept = dropped != 0
    assert 0.35 < kept.float().mean() < 0.65 and torch.equal(dropped[kept], x[kept])  # the 1/(1-p): above
    assert all(a.shared_input is None for _, a in adapters(model) if isinstance(a, LoRA))  # nothing kept after
    rng = torch.get_rng_state()
    with torch.no_grad(), disable_adapters(model):  # DPO's reference: no adapter, no draw
        model(IDS)
    assert torch.equal(rng, torch.get_rng_state())


def test_expert_w1_w3_adapters_share_one_dropout_mask():
    """GroupedLoRA against a loop over experts: one mask on the rows for w1 and w3, one on the hidden rows
    for w2, drawn in that order from torch's RNG."""
    from floe.layer import GroupedExperts

    torch.manual_seed(0)
    experts = GroupedExperts(3, 16, 24)
    for w in ("w1", "w3", "w2"):
        torch.nn.init.normal_(getattr(experts, w), std=0.2)
    experts.lora = GroupedLoRA(experts, rank=4, scaling=1.5, dropout=0.5)
    experts.lora.reset_parameters(0, "experts.lora", 0)
    with torch.no_grad():
        for w in ("w1", "w3", "w2"):
            getattr(experts.lora, f"{w}_B").normal_(std=0.2)
    experts.train()
    sizes, x = [4, 0, 6], torch.randn(10, 16)
    torch.manual_seed(7)
    y = experts(x, torch.tensor(sizes))
    def dropout(t):  # the draw floe.lora.Dropout documents: 31-bit integers against p * 2^31, then 1/(1-p)
        return t * (torch.empty(t.shape, dtype=torch.int32).random_() >= 2**30) / 0.5

    torch.manual_seed(7)
    dx = dropout(x)
    lo, ref = 0, []
    hidden = []
    lora = experts.lora

    def proj(w, e, inp, dropped):
        return inp @ getattr(experts, w)[e].t() + 1.5 * (dropped @ getattr(lora, f"{w}_A")[e].t()) @ \
            getattr(lora, f"{w}_B")[e].t()

    for e, n in enumerate(sizes):
        rows = slice(lo, lo + n)
        hidden.append(F.silu(proj("w1", e, x[rows], dx[rows])) * proj("w3", e, x[rows], dx[rows]))
        lo += n
    h = torch.cat(hidden)
    dh = dropout(h)
    lo = 0
    for e, n in enumerate(sizes):
        rows = slice(lo, lo + n)
        ref.append(proj("w2", e, h[rows], dh[rows]))
        lo += n
    torch.testing.assert_close(y, torch.cat(ref), rtol=1e-5, atol=1e-5)


def test_sharding_slices_the_expert_adapters():
    model = lora_model()
    experts = model.layers[0].moe.experts
    full = {k: v.clone() for k, v in experts.expert_tensors().items()}
    assert set(full) == {"w1", "w3", "w2", "lora.w1_A", "lora.w1_B", "lora.w3_A", "lora.w3_B", "lora.w2_A",
                         "lora.w2_B"}
    experts.shard_(4, 4)
    for k, v in experts.expert_tensors().items():
        assert torch.equal(v, full[k][4:8]), k
    # apply_lora on a model sharded first draws the same A rows (keyed by global expert id)
    cfg = model.config
    other = ArcticForCausalLM(cfg)
    other.reset_parameters(seed=3)
    other.layers[0].moe.experts.shard_(4, 4)
    apply_lora(other, LoRAConfig(rank=4, alpha=8.0), seed=4)
    assert torch.equal(other.layers[0].moe.experts.lora.w2_A, full["lora.w2_A"][4:8])


@pytest.mark.parametrize("changes, key", [
    ({"rank": -1}, "lora.rank"), ({"alpha": 0.0}, "lora.alpha"), ({"dropout": 1.0}, "lora.dropout"),
    ({"targets": ["attention", "lm_head"]}, "lora.targets"), ({"rank": 4, "targets": []}, "lora.targets"),
    ({"rank": "8"}, "lora.rank"),
])
def test_config_errors_name_the_key(changes, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        LoRAConfig(**changes)


def test_lora_with_freeze_moe_is_refused():
    assert lora_model_errors(LoRAConfig(rank=4), PRESETS["tiny"].replace(freeze_moe=True))
    assert not lora_model_errors(LoRAConfig(rank=0), PRESETS["tiny"].replace(freeze_moe=True))
    assert not lora_model_errors(LoRAConfig(rank=4), PRESETS["tiny"])


TRITON_CHECK = r"""
import torch
from floe.layer import GroupedExperts
from floe.lora import GroupedLoRA

torch.manual_seed(0)
experts = GroupedExperts(4, 32, 48)
for w in ("w1", "w3", "w2"):
    torch.nn.init.normal_(getattr(experts, w), std=0.1)
experts.requires_grad_(False)
experts.lora = GroupedLoRA(experts, rank=4, scaling=2.0, dropout=0.0)
experts.lora.reset_parameters(0, "experts.lora", 0)
with torch.no_grad():
    for w in ("w1", "w3", "w2"):
        getattr(experts.lora, f"{w}_B").normal_(std=0.1)
sizes = torch.tensor([5, 0, 17, 3])  # an empty expert, groups smaller than a tile
x = torch.randn(25, 32)
results = {}
for backend in ("triton", "reference"):
    experts.kernel_backend = backend  # what floe.model.apply_kernel_backend sets from train.kernels
    xi = x.clone().requires_grad_(True)
    y = experts(xi, sizes)
    (y * torch.linspace(-1, 1, 32)).sum().backward()
    results[backend] = [y.detach(), xi.grad] + [p.grad.clone() for p in experts.lora.parameters()]
    experts.lora.zero_grad()
for got, ref in zip(results["triton"], results["reference"]):
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
assert results["triton"][3].abs().sum() > 0
print("ok")
"""


def test_expert_adapters_on_the_triton_kernels():
    """The experts' adapters through the Triton grouped GEMM (the interpreter on a CPU) equal the reference."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", TRITON_CHECK], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.parametrize("mode", ["moe", "full"])
def test_activation_checkpointing_recomputes_the_same_dropout_masks(mode):
    from floe.model import apply_activation_checkpointing

    plain, checkpointed = lora_model(dropout=0.3), lora_model(dropout=0.3)
    apply_activation_checkpointing(checkpointed, mode)
    losses = []
    for model in (plain, checkpointed):
        model.train()
        torch.manual_seed(5)
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    grads = [trainable_parameters(m) for m in (plain, checkpointed)]
    for name, p in grads[0].items():
        torch.testing.assert_close(grads[1][name].grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
