"""Export to Hugging Face Arctic names and safetensors, checked against the trained model."""
import json

import pytest
import torch
from safetensors.torch import load_file

from moe.config import PRESETS
from moe.hf import from_hf, to_hf
from moe.model import ArcticForCausalLM
from tests.test_train import make_cfg
from tools.export import export, load_checkpoint_model, resolve_checkpoint


def test_round_trip_and_names():
    cfg = PRESETS["tiny"]
    torch.manual_seed(0)
    state = ArcticForCausalLM(cfg).state_dict()
    hf = to_hf(state, cfg)
    # every expert of every layer under its own name, in nn.Linear (out, in) orientation
    w2 = hf["model.layers.1.block_sparse_moe.experts.5.w2.weight"]
    assert torch.equal(w2, state["layers.1.moe.w2"][5]) and w2.shape == (cfg.hidden_size, cfg.expert_ffn)
    assert torch.equal(hf["model.layers.0.post_attention_layernorm.weight"], state["layers.0.norm_moe.weight"])
    assert len(hf) == len(state) - 3 * cfg.num_layers + 3 * cfg.num_layers * cfg.num_experts
    back = from_hf(hf, cfg)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_from_hf_names_missing_experts():
    cfg = PRESETS["tiny"]
    hf = to_hf(ArcticForCausalLM(cfg).state_dict(), cfg)
    del hf["model.layers.0.block_sparse_moe.experts.3.w1.weight"]
    with pytest.raises(ValueError, match=r"missing experts .*\(0, 'w1', 3\)"):
        from_hf(hf, cfg)


def test_export_of_a_trained_run(tmp_path):
    from launch.train import train

    run = tmp_path / "run"
    train(make_cfg(run, "train.max_steps=2", "train.global_batch_size=8", "train.micro_batch_size=8"))
    files = export(str(run), str(tmp_path / "out"))
    assert files == ["model.safetensors"]
    model, _ = load_checkpoint_model(*resolve_checkpoint(str(run)))
    exported = from_hf(load_file(tmp_path / "out" / "model.safetensors"), model.config)
    trained = model.state_dict()
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
    # the checkpoint really holds trained weights: step 2's differ from a fresh initialisation
    torch.manual_seed(0)
    fresh = ArcticForCausalLM(model.config).state_dict()
    assert not torch.equal(fresh["layers.0.moe.w1"], trained["layers.0.moe.w1"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "arctic" and config["num_local_experts"] == 8
    assert (tmp_path / "out" / "tokenizer.model").stat().st_size > 0


def test_sharded_export_index(tmp_path):
    from launch.train import train

    run = tmp_path / "run"
    train(make_cfg(run, "train.max_steps=1", "train.global_batch_size=8", "train.micro_batch_size=8"))
    files = export(str(run), str(tmp_path / "out"), max_shard_gb=0.5 / 1024)  # 0.5 MiB shards
    assert len(files) > 1
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    merged = {}
    for f in files:
        merged.update(load_file(tmp_path / "out" / f))
    assert set(index["weight_map"]) == set(merged)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resolve_checkpoint(str(tmp_path))
    with pytest.raises(ValueError, match="no such run or checkpoint directory"):
        resolve_checkpoint(str(tmp_path / "nope"))
