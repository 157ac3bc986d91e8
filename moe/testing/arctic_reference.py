"""A small, independent re-implementation of Hugging Face Arctic (Snowflake's `ArcticForCausalLM`)
for tests: the oracle that floe's import and export are checked against.

Written from Arctic's architecture description, not from floe and not copied from Snowflake's
code; module names follow Arctic's checkpoint names, so `state_dict()` IS an Arctic checkpoint.
Only what floe can express is implemented (and asserted): every layer MoE
(`moe_layer_frequency` 1), the parallel residual MLP (`parallel_attn_mlp_res`), SwiGLU, no
biases, untied embeddings. Each decoder layer, x its input:

    h   = x + self_attn(input_layernorm(x))
    out = h + residual_mlp(residual_layernorm(h)) + block_sparse_moe(post_attention_layernorm(x))

block_sparse_moe: fp32 softmax over `gate` logits, top-k, the k weights renormalised to sum 1
only when k > 1 (`if self.top_k > 1` in Arctic's ArcticMoE), and every expert run on every
token with its (possibly zero) weight: no capacity, no permutation, nothing shared with floe's
routing code. Attention: eager softmax(q k^T / sqrt(head_dim)) with a causal mask, k/v heads
repeated for GQA, rotate-half RoPE from `rope_theta`. RMSNorm in fp32, weight applied after.
"""
from __future__ import annotations

import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, width: int):
        super().__init__()
        self.w1 = nn.Linear(dim, width, bias=False)
        self.w3 = nn.Linear(dim, width, bias=False)
        self.w2 = nn.Linear(width, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SparseMoE(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.top_k, self.num_experts = c["num_experts_per_tok"], c["num_local_experts"]
        self.gate = nn.Linear(c["hidden_size"], self.num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(c["hidden_size"], c["intermediate_size"])
                                     for _ in range(self.num_experts))

    def forward(self, x):  # x: (B, S, D)
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        top_p, top_i = torch.topk(probs, self.top_k, dim=-1)
        if self.top_k > 1:
            top_p = top_p / top_p.sum(-1, keepdim=True)
        dense_w = torch.zeros_like(probs).scatter(-1, top_i, top_p).to(x.dtype)  # (B, S, E)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + dense_w[..., e:e + 1] * expert(x)
        return out


def rope(x, positions, theta):
    """Rotate-half RoPE: x (B, H, S, Dh), positions (B, S)."""
    dh = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, dh, 2, dtype=torch.float32) / dh)
    ang = positions.float()[:, None, :, None] * inv  # (B, 1, S, Dh/2)
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(x.dtype), torch.cat([ang.sin()] * 2, -1).to(x.dtype)
    half = dh // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class SelfAttention(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        d, self.h = c["hidden_size"], c["num_attention_heads"]
        self.g = c.get("num_key_value_heads") or self.h
        self.dh, self.theta = d // self.h, c["rope_theta"]
        self.q_proj = nn.Linear(d, self.h * self.dh, bias=False)
        self.k_proj = nn.Linear(d, self.g * self.dh, bias=False)
        self.v_proj = nn.Linear(d, self.g * self.dh, bias=False)
        self.o_proj = nn.Linear(self.h * self.dh, d, bias=False)

    def forward(self, x, positions):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.h, self.dh).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.g, self.dh).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.g, self.dh).transpose(1, 2)
        q, k = rope(q, positions, self.theta), rope(k, positions, self.theta)
        rep = self.h // self.g
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(self.dh)
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        attn = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1).to(q.dtype)
        return self.o_proj((attn @ v).transpose(1, 2).reshape(b, s, -1))


class DecoderLayer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        d, eps = c["hidden_size"], c["rms_norm_eps"]
        self.self_attn = SelfAttention(c)
        self.block_sparse_moe = SparseMoE(c)
        self.input_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.residual_layernorm = RMSNorm(d, eps)
        self.residual_mlp = SwiGLU(d, d)  # Arctic's residual MLP is hidden_size wide

    def forward(self, x, positions):
        h = x + self.self_attn(self.input_layernorm(x), positions)
        dense = h + self.residual_mlp(self.residual_layernorm(h))
        return dense + self.block_sparse_moe(self.post_attention_layernorm(x))  # the MoE reads x


class Backbone(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])


class ArcticReference(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        assert c.get("moe_layer_frequency", 1) == 1 and c.get("parallel_attn_mlp_res") is True
        assert c.get("hidden_act", "silu") == "silu" and not c.get("tie_word_embeddings", False)
        self.config = c
        self.model = Backbone(c)
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)

    def forward(self, input_ids, position_ids=None):
        b, s = input_ids.shape
        positions = torch.arange(s).expand(b, s) if position_ids is None else position_ids
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, positions)
        return self.lm_head(self.model.norm(x))

    @torch.no_grad()
    def randomize(self, seed: int) -> "ArcticReference":
        """Random weights, norms included (all-ones norms would hide a swapped norm name)."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
        return self

    def save(self, out_dir: str, max_shard_tensors: int | None = None) -> list[str]:
        """config.json + model.safetensors, or shards of at most max_shard_tensors tensors + index."""
        from safetensors.torch import save_file

        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(self.config, f)
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        if max_shard_tensors is None:
            save_file(state, os.path.join(out_dir, "model.safetensors"))
            return ["model.safetensors"]
        names = list(state)
        chunks = [names[i:i + max_shard_tensors] for i in range(0, len(names), max_shard_tensors)]
        files = [f"model-{i + 1:05d}-of-{len(chunks):05d}.safetensors" for i in range(len(chunks))]
        for fname, chunk in zip(files, chunks):
            save_file({n: state[n] for n in chunk}, os.path.join(out_dir, fname))
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": {n: fn for fn, ch in zip(files, chunks) for n in ch}}, f)
        return files


def tiny_arctic_config(**changes) -> dict:
    """An Arctic config.json for a model small enough for a CPU test (dropless)."""
    c = {"model_type": "arctic", "architectures": ["ArcticForCausalLM"], "vocab_size": 96, "hidden_size": 32,
         "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "num_local_experts": 4, "num_experts_per_tok": 2, "moe_layer_frequency": 1,
         "parallel_attn_mlp_res": True, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
         "max_position_embeddings": 64, "tie_word_embeddings": False, "moe_token_dropping": False,
         "moe_train_capacity_factor": 1, "moe_eval_capacity_factor": 1, "moe_min_capacity": 0,
         "router_aux_loss_coef": 0.001, "initializer_range": 0.02, "sliding_window": None,
         "bos_token_id": 1, "eos_token_id": 2}
    return c | changes
