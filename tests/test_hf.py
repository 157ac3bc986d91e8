"""Hugging Face Arctic import (config.json, lazy per-rank weights) checked against an independent
Arctic implementation (floe.testing.arctic_reference), on 1 process and on 2 at ep_size 2."""
from __future__ import annotations

import dataclasses

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from floe.config import PRESETS
from floe.hf import config_from_hf, hf_config_from, load_hf_weights, read_hf_config, save_hf
from floe.model import ArcticForCausalLM
from floe.testing.arctic_reference import ArcticReference, tiny_arctic_config
from floe.testing.distributed import run_distributed

INPUT_IDS = torch.tensor([[5, 17, 3, 88, 42, 9, 61, 2, 33, 70, 14], [1, 90, 23, 23, 57, 8, 40, 11, 76, 5, 29]])


def floe_from_hf(hf_dir, **overrides):
    """What `train.init_from` does on one process: config from the file, meta build, lazy load."""
    with torch.device("meta"):
        model = ArcticForCausalLM(read_hf_config(str(hf_dir), overrides))
    report = load_hf_weights(model, str(hf_dir))
    return model, report


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_hf_arctic_to_floe_same_logits(tmp_path, top_k):
    """Top-1 is not renormalised in Arctic, top-2/3 are: floe must read that from num_experts_per_tok."""
    ref = ArcticReference(tiny_arctic_config(num_experts_per_tok=top_k)).randomize(top_k)
    ref.save(tmp_path, max_shard_tensors=10)  # sharded, with model.safetensors.index.json
    model, report = floe_from_hf(tmp_path)
    assert model.config.normalize_weights == (top_k > 1) and model.config.capacity_factor is None
    assert report.tensors_read == len(ref.state_dict())
    with torch.no_grad():
        expected, got = ref(INPUT_IDS), model(INPUT_IDS).logits
    assert (expected - got).abs().max() < 1e-4
    model.config.normalize_weights = not model.config.normalize_weights  # the layers share this config
    with torch.no_grad():
        assert (expected - model(INPUT_IDS).logits).abs().max() > 1e-3  # so the check above can fail


def test_floe_to_hf_to_floe_is_bit_exact(tmp_path):
    from floe.data.tokenizer import Tokenizer

    cfg = PRESETS["tiny"].replace(capacity_factor=None)
    model = ArcticForCausalLM(cfg)
    model.reset_parameters(seed=7)
    save_hf(model.state_dict(), cfg, str(tmp_path), Tokenizer())
    back, _ = floe_from_hf(tmp_path)
    original = model.state_dict()
    assert back.state_dict().keys() == original.keys()
    assert all(torch.equal(back.state_dict()[k], original[k]) for k in original)
    # and what was written is an Arctic model: the independent implementation agrees with floe
    ref = ArcticReference(json.loads((tmp_path / "config.json").read_text()))
    ref.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    ids = INPUT_IDS * 10
    with torch.no_grad():
        assert (ref(ids) - model(ids).logits).abs().max() < 1e-4


def test_missing_extra_and_misshapen_tensors_are_named(tmp_path):
    ref = ArcticReference(tiny_arctic_config()).randomize(0)
    ref.save(tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    gone = state.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight")
    save_file(state | {"model.layers.0.block_sparse_moe.experts.9.w1.weight": gone}, path)
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.block_sparse_moe.experts.3.w2.weight'\], "
                                         r"unexpected \['model.layers.0.block_sparse_moe.experts.9.w1.weight'\]"):
        floe_from_hf(tmp_path)
    save_file(state | {"model.layers.1.block_sparse_moe.experts.3.w2.weight": gone.t().contiguous()}, path)
    with pytest.raises(ValueError, match=r"experts.3.w2.weight has shape \(24, 32\), the model needs \(32, 24\)"):
        floe_from_hf(tmp_path)
    path.unlink()
    with pytest.raises(ValueError, match="no model.safetensors and no model.safetensors.index.json"):
        floe_from_hf(tmp_path)


@pytest.mark.parametrize("key, value", [
    ("moe_layer_frequency", 2), ("parallel_attn_mlp_res", False), ("hidden_act", "gelu"),
    ("tie_word_embeddings", True), ("sliding_window", 16), ("moe_min_capacity", 4),
    ("moe_eval_capacity_factor", 2), ("model_type", "mixtral"), ("quantization", {"q_bits": 8}),
])
def test_config_from_hf_refuses_what_floe_cannot_express(key, value):
    hf = tiny_arctic_config(moe_token_dropping=True) | {key: value}
    with pytest.raises(ValueError, match=key):
        config_from_hf(hf)


def test_config_from_hf_reads_arctic_fields_and_checks_overrides():
    hf = tiny_arctic_config(moe_token_dropping=True, moe_train_capacity_factor=1.5, moe_eval_capacity_factor=1.5)
    cfg = config_from_hf(hf)
    assert (cfg.hidden_size, cfg.dense_ffn, cfg.expert_ffn, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == \
        (32, 32, 24, 2, 4, 2)
    assert (cfg.num_experts, cfg.top_k, cfg.capacity_factor, cfg.drop_policy) == (4, 2, 1.5, "position")
    # training-only fields may be overridden; the architecture may not
    assert config_from_hf(hf, {"capacity_factor": None, "balance_coef": 0.01}).capacity_factor is None
    with pytest.raises(ValueError, match=r"model.hidden_size=64 contradicts config.json \(32\)"):
        config_from_hf(hf, {"hidden_size": 64})
    with pytest.raises(ValueError, match=r"model.normalize_weights=False contradicts"):
        config_from_hf(hf, {"normalize_weights": False})
    with pytest.raises(ValueError, match=r"model.hiden_size is not a model field"):
        config_from_hf(hf, {"hiden_size": 64})


def test_config_round_trip_and_export_refusals():
    for name in ("tiny", "arctic_480b"):
        cfg = PRESETS[name]
        back = config_from_hf(hf_config_from(cfg))
        assert back == cfg.replace(drop_policy="position"), name
    with pytest.raises(ValueError, match=r"model.dense_ffn = 128 != model.hidden_size = 64: Arctic's residual MLP"):
        hf_config_from(PRESETS["tiny"].replace(dense_ffn=128))
    with pytest.raises(ValueError, match=r"model.normalize_weights = True with model.top_k = 1"):
        hf_config_from(PRESETS["tiny"].replace(top_k=1))
    with pytest.raises(ValueError, match=r"model.normalize_weights = False with model.top_k = 2"):
        hf_config_from(PRESETS["tiny"].replace(normalize_weights=False))


def test_export_refuses_before_writing(tmp_path):
    from floe.data.tokenizer import Tokenizer

    cfg = PRESETS["tiny"].replace(dense_ffn=128)
    with pytest.raises(ValueError, match="model.dense_ffn"):
        save_hf(ArcticForCausalLM(cfg).state_dict(), cfg, str(tmp_path / "out"), Tokenizer())
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 2 processes, ep_size 2


class CountingSafeOpen:
    """Wraps safetensors.safe_open: counts the files opened and the tensors and bytes read."""

    def __init__(self):
        self.files, self.tensors = [], []

    def __call__(self, path, framework, device="cpu"):
        self.files.append(path)
        handle, counter = safe_open(path, framework=framework, device=device), self

        class Handle:
            def get_slice(self, name):
                inner = handle.get_slice(name)

                class Slice:
                    def get_shape(self):
                        return inner.get_shape()

                    def __getitem__(self, index):
                        t = inner[index]
                        counter.tensors.append((name, t.numel() * t.element_size()))
                        return t
                return Slice()

            def get_tensor(self, name):
                return self.get_slice(name)[:]

            def keys(self):
                return handle.keys()

        return Handle()


def _ep_worker(rank, world_size, hf_dir):
    import safetensors

    from floe.parallel import apply_expert_parallel, build_parallel_groups, init_distributed

    init_distributed(torch.device("cpu"), timeout_s=60)
    groups = build_parallel_groups(2)
    with torch.device("meta"):
        model = ArcticForCausalLM(read_hf_config(hf_dir))
    apply_expert_parallel(model, groups)
    counter = CountingSafeOpen()
    real, safetensors.safe_open = safetensors.safe_open, counter  # load_hf_weights opens through this
    try:
        report = load_hf_weights(model, hf_dir)
    finally:
        safetensors.safe_open = real
    with torch.no_grad():
        logits = model(INPUT_IDS).logits
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"logits": logits, "tensors": counter.tensors, "files": counter.files, "held": held,
            "report": dataclasses.asdict(report)}  # plain data: the harness loads results with weights_only


@pytest.mark.slow
def test_hf_arctic_to_floe_on_two_processes_ep2(tmp_path):
    ref = ArcticReference(tiny_arctic_config()).randomize(11)
    ref.save(tmp_path, max_shard_tensors=12)
    with torch.no_grad():
        expected = ref(INPUT_IDS)
    results = run_distributed(_ep_worker, world_size=2, args=(str(tmp_path),), timeout=180)
    state = ref.state_dict()
    dense = {n for n in state if ".experts." not in n}
    num_bytes = {n: t.numel() * t.element_size() for n, t in state.items()}
    seen_experts = []
    for rank, r in enumerate(results):
        assert (r["logits"] - expected).abs().max() < 1e-4, rank
        names = [n for n, _ in r["tensors"]]
        assert len(names) == len(set(names)), "a tensor was read twice"
        experts = {n for n in names if ".experts." in n}
        mine = {n for n in state if any(f".experts.{e}." in n for e in (2 * rank, 2 * rank + 1))}
        assert set(names) == dense | mine and experts == mine  # its 2 of 4 experts, no other rank's
        assert sum(b for _, b in r["tensors"]) == sum(num_bytes[n] for n in dense | mine) == r["report"]["bytes_read"]
        assert r["held"] == sum(num_bytes[n] for n in dense | mine)  # never more than its own share
        seen_experts += sorted(mine)
    assert sorted(seen_experts) == sorted(n for n in state if ".experts." in n)  # each expert read once


def test_arctic_weights_start_the_balancing_bias_at_zero(tmp_path):
    from floe.data.tokenizer import Tokenizer

    cfg = PRESETS["tiny"].replace(capacity_factor=None)
    source = ArcticForCausalLM(cfg)
    source.reset_parameters(seed=7)
    save_hf(source.state_dict(), cfg, str(tmp_path), Tokenizer())
    with torch.device("meta"):
        model = ArcticForCausalLM(cfg.replace(balance_bias_rate=0.01))
    load_hf_weights(model, str(tmp_path))  # materialises: the bias would hold garbage if it were skipped
    state = model.state_dict()
    for i in range(cfg.num_layers):
        assert torch.equal(state.pop(f"layers.{i}.moe.expert_bias"), torch.zeros(cfg.num_experts))
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in state.items())
