"""Hugging Face Arctic names for floe's weights, both ways: a rename plus a split of the
stacked experts along dim 0.

floe's block is Arctic's decoder layer with `parallel_attn_mlp_res` on:
    norm_in  -> input_layernorm            attn.*   -> self_attn.*
    norm_res -> residual_layernorm (on h)  mlp.w*   -> residual_mlp.w*
    norm_moe -> post_attention_layernorm (on the block input x)
    moe.gate -> block_sparse_moe.gate      moe.w*[e] -> block_sparse_moe.experts.{e}.w*
"""
from __future__ import annotations

import re

import torch

from moe.config import ModelConfig

_LAYER_RENAMES = {
    "norm_in.weight": "input_layernorm.weight",
    "norm_res.weight": "residual_layernorm.weight",
    "norm_moe.weight": "post_attention_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp.w1.weight": "residual_mlp.w1.weight",
    "mlp.w2.weight": "residual_mlp.w2.weight",
    "mlp.w3.weight": "residual_mlp.w3.weight",
    "moe.gate.weight": "block_sparse_moe.gate.weight",
}
_TOP_RENAMES = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                "lm_head.weight": "lm_head.weight"}
_EXPERT_WEIGHTS = ("w1", "w2", "w3")


def to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """floe state dict -> Hugging Face Arctic state dict (experts split, one tensor each)."""
    out, seen = {}, set()
    for name, hf in _TOP_RENAMES.items():
        out[hf] = state[name]
        seen.add(name)
    for i in range(config.num_layers):
        prefix, hf_prefix = f"layers.{i}.", f"model.layers.{i}."
        for name, hf in _LAYER_RENAMES.items():
            out[hf_prefix + hf] = state[prefix + name]
            seen.add(prefix + name)
        for w in _EXPERT_WEIGHTS:
            stacked = state[f"{prefix}moe.{w}"]  # [E, out, in]
            seen.add(f"{prefix}moe.{w}")
            for e in range(config.num_experts):
                out[f"{hf_prefix}block_sparse_moe.experts.{e}.{w}.weight"] = stacked[e]
    unknown = sorted(set(state) - seen)
    if unknown:
        raise ValueError(f"to_hf: no Hugging Face name for {unknown}")
    return out


def from_hf(hf_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face Arctic state dict -> floe state dict (experts stacked [E, out, in])."""
    inverse_top = {hf: name for name, hf in _TOP_RENAMES.items()}
    inverse_layer = {hf: name for name, hf in _LAYER_RENAMES.items()}
    expert_re = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
    layer_re = re.compile(r"model\.layers\.(\d+)\.(.+)")
    out, experts, unknown = {}, {}, []
    for hf, tensor in hf_state.items():
        if hf in inverse_top:
            out[inverse_top[hf]] = tensor
        elif m := expert_re.fullmatch(hf):
            experts[(int(m[1]), m[3], int(m[2]))] = tensor
        elif (m := layer_re.fullmatch(hf)) and m[2] in inverse_layer:
            out[f"layers.{m[1]}.{inverse_layer[m[2]]}"] = tensor
        else:
            unknown.append(hf)
    missing = [(i, w, e) for i in range(config.num_layers) for w in _EXPERT_WEIGHTS
               for e in range(config.num_experts) if (i, w, e) not in experts]
    if unknown or missing:
        raise ValueError(f"from_hf: unknown tensors {unknown[:5]}{'...' if len(unknown) > 5 else ''}; "
                         f"missing experts (layer, weight, expert) {missing[:5]}{'...' if len(missing) > 5 else ''}")
    for i in range(config.num_layers):
        for w in _EXPERT_WEIGHTS:
            out[f"layers.{i}.moe.{w}"] = torch.stack([experts[(i, w, e)] for e in range(config.num_experts)])
    return out


def hf_config(config: ModelConfig) -> dict:
    """config.json for Hugging Face's ArcticForCausalLM (transformers' `arctic` model type)."""
    return {
        "architectures": ["ArcticForCausalLM"],
        "model_type": "arctic",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.expert_ffn,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "num_local_experts": config.num_experts,
        "num_experts_per_tok": config.top_k,
        "moe_layer_frequency": 1,
        "parallel_attn_mlp_res": True,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_seq_len,
        "router_aux_loss_coef": config.balance_coef,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
