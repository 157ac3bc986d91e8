"""Independent, slow reference implementations of routing and the MoE layer (test oracles).

Written as plain per-token / per-assignment Python loops, sharing no code with moe/.
"""
import math

import torch
import torch.nn.functional as F


def naive_route(logits, top_k, capacity_factor, drop_policy, normalize=True, bias=None, has_loss=None):
    """Returns (expert_ids [T][k] lists, weights [T, k] tensor (differentiable), kept [T][k] bools).
    bias [E]: chooses by probs + bias, weighs by probs. has_loss [T] bools: drop_policy="loss_aware"
    serves loss tokens first, then by probability."""
    num_tokens, num_experts = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)
    bias = [0.0] * num_experts if bias is None else [float(b) for b in bias]
    has_loss = [True] * num_tokens if has_loss is None else [bool(h) for h in has_loss]
    expert_ids, weights = [], []
    for t in range(num_tokens):
        order = sorted(range(num_experts), key=lambda e: (-(probs[t, e].item() + bias[e]), e))[:top_k]
        expert_ids.append(order)
        w = torch.stack([probs[t, e] for e in order])
        weights.append(w / w.sum() if normalize else w)
    kept = [[True] * top_k for _ in range(num_tokens)]
    if capacity_factor is not None:
        cap = math.ceil(capacity_factor * top_k * num_tokens / num_experts)
        used = [0] * num_experts
        for j in range(top_k):  # every first choice before every second choice
            tokens = list(range(num_tokens))
            if drop_policy == "probs":
                tokens.sort(key=lambda t: -probs[t, expert_ids[t][j]].item())  # stable: ties by position
            elif drop_policy == "loss_aware":
                tokens.sort(key=lambda t: (not has_loss[t], -probs[t, expert_ids[t][j]].item()))
            for t in tokens:
                e = expert_ids[t][j]
                if used[e] < cap:
                    used[e] += 1
                else:
                    kept[t][j] = False
    return expert_ids, torch.stack(weights) if weights else probs.new_zeros(0, top_k), kept


def naive_balance_loss(probs, first_choice):
    num_tokens, num_experts = probs.shape
    total = 0.0
    for e in range(num_experts):
        f_e = sum(1 for t in range(num_tokens) if first_choice[t] == e) / num_tokens
        m_e = sum(probs[t, e] for t in range(num_tokens)) / num_tokens
        total = total + f_e * m_e
    return num_experts * total


def naive_moe(x, gate_w, w1, w3, w2, top_k, capacity_factor, drop_policy, normalize=True):
    """y[t] = sum over kept choices j of weight[t, j] * SwiGLU_e(x[t]), one token at a time."""
    logits = x.float() @ gate_w.float().t()
    expert_ids, weights, kept = naive_route(logits, top_k, capacity_factor, drop_policy, normalize)
    rows = []
    for t in range(x.shape[0]):
        y_t = torch.zeros_like(x[t])
        for j in range(top_k):
            if kept[t][j]:
                e = expert_ids[t][j]
                h = F.silu(w1[e] @ x[t]) * (w3[e] @ x[t])
                y_t = y_t + weights[t, j] * (w2[e] @ h)
        rows.append(y_t)
    return torch.stack(rows), expert_ids, kept
