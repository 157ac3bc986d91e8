import pytest
import torch

from floe.config import PRESETS, ModelConfig
from floe.model import ArcticForCausalLM


def built_counts(cfg):
    with torch.device("meta"):  # no memory: shapes only
        model = ArcticForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".moe.experts." in n)
    active = total - experts + experts * cfg.top_k // cfg.num_experts
    return total, active


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_num_params_matches_built_model(name):
    assert PRESETS[name].num_params() == built_counts(PRESETS[name])


def test_arctic_480b_shape():
    cfg = PRESETS["arctic_480b"]
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (7168, 35, 56, 8)
    assert (cfg.vocab_size, cfg.dense_ffn, cfg.num_experts, cfg.expert_ffn, cfg.top_k) == (32000, 7168, 128, 4864, 2)
    total, active = cfg.num_params()
    assert total == built_counts(cfg)[0]
    assert 470e9 < total < 490e9  # "480B"
    assert 16.5e9 < active < 18e9  # "17B active"


def test_validation_reports_every_problem_with_its_key():
    with pytest.raises(ValueError) as err:
        ModelConfig(hidden_size=100, num_heads=8, num_kv_heads=3, num_experts=4, top_k=5, capacity_factor=0,
                    drop_policy="random")
    msg = str(err.value)
    for key in ("model.top_k", "model.hidden_size", "model.num_heads", "model.capacity_factor", "model.drop_policy"):
        assert key in msg, key


def test_dropless_and_valid_configs_accepted():
    assert ModelConfig(capacity_factor=None).capacity_factor is None
    assert PRESETS["tiny"].head_dim == 16


def test_router_keys_are_checked_with_their_names():
    with pytest.raises(ValueError) as err:
        ModelConfig(balance_bias_rate=-0.001, balance_scope="token", drop_policy="loss")
    msg = str(err.value)
    for key in ("model.balance_bias_rate", "model.balance_scope", "model.drop_policy"):
        assert key in msg, key
    with pytest.raises(ValueError, match="model.balance_bias_rate"):
        ModelConfig(balance_bias_rate=float("nan"))
    ok = ModelConfig(balance_bias_rate=0.001, balance_scope="sequence", drop_policy="loss_aware", freeze_router=True)
    assert (ok.balance_bias_rate, ok.balance_scope, ok.drop_policy) == (0.001, "sequence", "loss_aware")


@pytest.mark.parametrize("name,active_range", [("arctic_2b", (1.8e9, 2.2e9)), ("arctic_7b", (6.8e9, 7.6e9))])
def test_arctic_proxy_presets(name, active_range):
    # Arctic-shaped (dense residual hidden_size wide, 128 experts top-2, head_dim 128), counted on the meta device.
    cfg = PRESETS[name]
    assert (cfg.num_experts, cfg.top_k, cfg.dense_ffn, cfg.head_dim) == (128, 2, cfg.hidden_size, 128)
    total, active = cfg.num_params()
    assert (total, active) == built_counts(cfg)
    assert active_range[0] < active < active_range[1]
    from floe.hf import hf_config_from

    hf_config_from(cfg)  # expressible as Hugging Face Arctic, like the full model
