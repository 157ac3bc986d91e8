"""Top-k routing with capacity-based token dropping, and the router losses.

Plain functions on [T, E] tensors (T tokens, E experts, k choices per token), testable alone.
All router math is fp32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from floe.config import BALANCE_SCOPES, DROP_POLICIES


@dataclass
class RoutePlan:
    expert_ids: torch.Tensor  # [T, k] long: choice j of token t
    weights: torch.Tensor  # [T, k] fp32: combine weight of each choice (dropped ones are masked by `kept`)
    kept: torch.Tensor  # [T, k] bool: assignment survived the capacity limit
    probs: torch.Tensor  # [T, E] fp32: softmax of the router logits


def capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float | None) -> int | None:
    """Per-expert slot count C = ceil(capacity_factor * top_k * tokens / num_experts); None = dropless."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * top_k * num_tokens / num_experts)


def route(
    logits: torch.Tensor,
    top_k: int,
    capacity: int | None,
    drop_policy: str = "probs",
    normalize_weights: bool = True,
    expert_bias: torch.Tensor | None = None,
    has_loss: torch.Tensor | None = None,
) -> RoutePlan:
    """Route logits [T, E] to top_k experts per token, dropping assignments beyond `capacity`.

    Priority for a slot of an over-full expert: every first choice before every second
    choice (and so on); within one choice rank, higher router probability first
    ("probs"), earlier token first ("position"), or tokens with a loss before tokens
    without one, then higher probability ("loss_aware"; has_loss [T] bool, None = all).

    expert_bias [E] (aux-loss-free balancing): added to the probabilities to *choose* the
    top_k experts; the combine weights and the drop priority stay the unbiased probabilities.
    """
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
    num_tokens, num_experts = logits.shape
    probs_TE = torch.softmax(logits.float(), dim=-1)
    if expert_bias is None:
        top_probs_TK, expert_ids_TK = torch.topk(probs_TE, top_k, dim=-1)
    else:
        _, expert_ids_TK = torch.topk(probs_TE.detach() + expert_bias.float(), top_k, dim=-1)
        top_probs_TK = probs_TE.gather(1, expert_ids_TK)
    weights_TK = top_probs_TK
    if normalize_weights:
        weights_TK = top_probs_TK / top_probs_TK.sum(dim=-1, keepdim=True)

    if capacity is None:
        kept_TK = torch.ones_like(expert_ids_TK, dtype=torch.bool)
    else:
        kept_TK = _within_capacity(expert_ids_TK, top_probs_TK.detach(), num_experts, capacity, drop_policy,
                                   has_loss)
    return RoutePlan(expert_ids_TK, weights_TK, kept_TK, probs_TE)


def _within_capacity(expert_ids_TK, top_probs_TK, num_experts, capacity, drop_policy, has_loss_T=None):
    """Mark the assignments that get one of their expert's `capacity` slots."""
    num_tokens, top_k = expert_ids_TK.shape
    # Priority order of all T*k assignments, choice-rank major: index j*T + t is choice j of token t.
    if drop_policy == "position":
        token_order_KT = torch.arange(num_tokens, device=expert_ids_TK.device).expand(top_k, num_tokens)
    else:  # "probs" and "loss_aware": within each choice rank, most confident tokens first (stable: ties keep position)
        token_order_KT = torch.argsort(top_probs_TK.t(), dim=1, descending=True, stable=True)
        if drop_policy == "loss_aware" and has_loss_T is not None:
            # Loss tokens first; a stable sort keeps the probability order inside each of the two sets.
            no_loss_KT = (~has_loss_T)[token_order_KT].to(torch.uint8)
            token_order_KT = token_order_KT.gather(1, torch.argsort(no_loss_KT, dim=1, stable=True))
    priority_A = (token_order_KT * top_k + torch.arange(top_k, device=expert_ids_TK.device)[:, None]).reshape(-1)
    # priority_A[i] is the flat [T, k] index of the i-th most important assignment.
    experts_A = expert_ids_TK.reshape(-1)[priority_A]
    # Group by expert keeping priority order; an assignment's slot is its rank inside its group.
    by_expert = torch.argsort(experts_A, stable=True)
    counts_E = torch.bincount(experts_A, minlength=num_experts)
    group_start_E = torch.cumsum(counts_E, 0) - counts_E
    slot_sorted = torch.arange(experts_A.numel(), device=experts_A.device) - group_start_E[experts_A[by_expert]]
    kept_A = torch.empty_like(experts_A, dtype=torch.bool)
    kept_A[priority_A[by_expert]] = slot_sorted < capacity
    return kept_A.view(num_tokens, top_k)


def balance_loss(probs: torch.Tensor, expert_ids: torch.Tensor, count: str = "first") -> torch.Tensor:
    """Normalised GShard balance loss E * sum_e f_e * m_e for probs [T, E], expert_ids [T, k].

    m_e is the mean router probability of expert e. f_e is the share of tokens whose first
    choice is e (count="first", as DeepSpeed's top-2 gating), or the share of all k
    assignments that go to e (count="all"). Counted before capacity dropping. Exactly 1.0
    when routing is uniform, whatever E and k.
    """
    num_tokens, num_experts = probs.shape
    if num_tokens == 0:
        return probs.sum() * 0.0 + 1.0  # no tokens: the floor, keeps the graph connected
    if count == "first":
        chosen = expert_ids[:, 0]
    elif count == "all":
        chosen = expert_ids.reshape(-1)
    else:
        raise ValueError(f"balance_loss count must be 'first' or 'all', got {count!r}")
    f_E = torch.bincount(chosen, minlength=num_experts).to(probs.dtype) / chosen.numel()
    m_E = probs.mean(dim=0)
    return num_experts * torch.sum(f_E * m_E)


def sequence_balance_loss(probs: torch.Tensor, expert_ids: torch.Tensor, example_ids: torch.Tensor,
                          count: str = "first") -> torch.Tensor:
    """balance_loss of each example alone (example_ids [T]: tokens of one example share an id),
    averaged over the examples (DeepSeek's sequence-wise balance loss, floe's normalisation):
    still exactly 1.0 when every example routes uniformly."""
    num_tokens, num_experts = probs.shape
    if num_tokens == 0:
        return probs.sum() * 0.0 + 1.0
    _, example_T = torch.unique(example_ids, return_inverse=True)  # 0..N-1, whatever the ids were
    num_examples = int(example_T.max()) + 1  # NOTE: device-to-host sync (sizes the per-example sums)
    if count == "first":
        chosen_TK = expert_ids[:, :1]
    elif count == "all":
        chosen_TK = expert_ids
    else:
        raise ValueError(f"balance_loss count must be 'first' or 'all', got {count!r}")
    tokens_N = torch.bincount(example_T, minlength=num_examples).to(probs.dtype)
    chosen_NE = torch.zeros(num_examples, num_experts, dtype=probs.dtype, device=probs.device)
    chosen_NE.index_put_((example_T[:, None].expand_as(chosen_TK), chosen_TK),
                         torch.ones((), dtype=probs.dtype, device=probs.device), accumulate=True)
    f_NE = chosen_NE / (tokens_N[:, None] * chosen_TK.shape[1])
    m_NE = probs.new_zeros(num_examples, num_experts).index_add(0, example_T, probs) / tokens_N[:, None]
    return (num_experts * (f_NE * m_NE).sum(dim=1)).mean()


def balance(probs: torch.Tensor, expert_ids: torch.Tensor, scope: str = "batch",
            example_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The balance loss of model.balance_scope: over all tokens ("batch") or per example averaged
    ("sequence"; example_ids None = the tokens are one example)."""
    if scope not in BALANCE_SCOPES:
        raise ValueError(f"balance_scope must be one of {BALANCE_SCOPES}, got {scope!r}")
    if scope == "batch" or example_ids is None:
        return balance_loss(probs, expert_ids)
    return sequence_balance_loss(probs, expert_ids, example_ids)


@torch.no_grad()
def update_expert_bias_(expert_bias: torch.Tensor, routed_per_expert: torch.Tensor, rate: float) -> None:
    """Aux-loss-free balancing (DeepSeek-V3), in place: bias_e += rate * sign(mean load - load_e),
    routed_per_expert [E] the tokens that chose each expert (before capacity) over the global batch."""
    load_E = routed_per_expert.to(torch.float64)
    expert_bias += (rate * torch.sign(load_E.mean() - load_E)).to(expert_bias.dtype)


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits.float(), dim=-1).square().mean()
