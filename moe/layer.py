"""The MoE MLP: router, capacity dropping, permutation into expert groups, SwiGLU experts.

Single-device code. Expert parallelism wraps this layer from outside (moe/parallel.py):
it reuses `route`, `permute`, `experts` and `unpermute` and puts an all-to-all between them.

Shape legend: T tokens, D hidden, E experts (global), L local experts, F expert width,
k choices per token, A kept assignments (rows sent to experts).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

import kernels
from moe import router
from moe.config import ModelConfig


@dataclass
class MoEStats:
    balance_loss: torch.Tensor  # scalar, differentiable; normalised GShard value (1.0 = perfectly uniform)
    z_loss: torch.Tensor  # scalar, differentiable
    tokens_per_expert: torch.Tensor  # [E] long: kept assignments per expert
    dropped: torch.Tensor  # scalar long: assignments dropped by capacity
    num_assignments: int  # T * k


@dataclass
class Permutation:
    token_idx_A: torch.Tensor  # [A] token of each sorted row
    weight_A: torch.Tensor  # [A] router weight of each sorted row
    tokens_per_expert_E: torch.Tensor  # [E] rows per expert, in sorted order


class MoELayer(nn.Module):
    """Top-k MoE of SwiGLU experts. forward(x [T, D]) -> (y [T, D], MoEStats)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        e, d, f = config.num_experts, config.hidden_size, config.expert_ffn
        self.gate = nn.Linear(d, e, bias=False)  # router
        # Stacked experts in nn.Linear (out, in) orientation: a rename away from HF Arctic/Mixtral.
        self.w1 = nn.Parameter(torch.empty(e, f, d))  # gate projection
        self.w3 = nn.Parameter(torch.empty(e, f, d))  # up projection
        self.w2 = nn.Parameter(torch.empty(e, d, f))  # down projection
        self.reset_parameters()

    def reset_parameters(self):
        std = self.config.init_std
        for w in (self.gate.weight, self.w1, self.w3, self.w2):
            nn.init.normal_(w, mean=0.0, std=std)

    def route(self, x_TD: torch.Tensor) -> tuple[router.RoutePlan, MoEStats]:
        """Router in fp32: plan for every token plus the losses and counts."""
        cfg = self.config
        logits_TE = x_TD.float() @ self.gate.weight.float().t()
        num_tokens = x_TD.shape[0]
        cap = router.capacity(num_tokens, cfg.num_experts, cfg.top_k, cfg.capacity_factor)
        plan = router.route(logits_TE, cfg.top_k, cap, cfg.drop_policy, cfg.normalize_weights)
        kept_experts = plan.expert_ids[plan.kept]
        stats = MoEStats(
            balance_loss=router.balance_loss(plan.probs, plan.expert_ids),
            z_loss=router.z_loss(logits_TE) if cfg.z_loss_coef > 0 else logits_TE.new_zeros(()),
            tokens_per_expert=torch.bincount(kept_experts, minlength=cfg.num_experts),
            dropped=(~plan.kept).sum(),
            num_assignments=plan.kept.numel(),
        )
        return plan, stats

    def permute(self, x_TD: torch.Tensor, plan: router.RoutePlan) -> tuple[torch.Tensor, Permutation]:
        """Gather the kept assignments into rows grouped by expert (stable: token order within a group)."""
        num_tokens, top_k = plan.expert_ids.shape
        kept_flat = plan.kept.reshape(-1)
        experts_A = plan.expert_ids.reshape(-1)[kept_flat]
        token_A = torch.arange(num_tokens, device=x_TD.device).repeat_interleave(top_k)[kept_flat]
        weight_A = plan.weights.reshape(-1)[kept_flat]
        order = torch.argsort(experts_A, stable=True)
        perm = Permutation(
            token_idx_A=token_A[order],
            weight_A=weight_A[order],
            tokens_per_expert_E=torch.bincount(experts_A, minlength=self.config.num_experts),
        )
        return x_TD[perm.token_idx_A], perm

    def experts(self, x_AD: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """SwiGLU experts on rows grouped by expert: x [A, D], tokens_per_expert [len(w1)] -> [A, D]."""
        return kernels.grouped_swiglu(x_AD, self.w1, self.w3, self.w2, tokens_per_expert)

    @staticmethod
    def unpermute(y_AD: torch.Tensor, perm: Permutation, num_tokens: int) -> torch.Tensor:
        """Weight each expert output by its router weight and sum the k contributions per token."""
        y_AD = y_AD * perm.weight_A.to(y_AD.dtype)[:, None]
        out_TD = y_AD.new_zeros(num_tokens, y_AD.shape[1])
        return out_TD.index_add(0, perm.token_idx_A, y_AD)  # dropped assignments add nothing

    # The block calls start() before attention and finish() after its dense MLP, so an
    # expert-parallel wrapper can put its all-to-all in flight in between.
    def start(self, x_TD: torch.Tensor):
        """Route and permute; returns the pending state finish() consumes."""
        plan, stats = self.route(x_TD)
        x_AD, perm = self.permute(x_TD, plan)
        return x_AD, perm, stats, x_TD.shape[0]

    def finish(self, pending) -> tuple[torch.Tensor, MoEStats]:
        """Run the experts and combine: (y [T, D], stats)."""
        x_AD, perm, stats, num_tokens = pending
        y_AD = self.experts(x_AD, perm.tokens_per_expert_E)
        return self.unpermute(y_AD, perm, num_tokens), stats

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        return self.finish(self.start(x_TD))
