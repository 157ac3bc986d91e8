"""The MoE MLP: router, capacity dropping, permutation into expert groups, grouped SwiGLU experts.

Single-device code. Expert parallelism is applied from outside (moe/parallel/dispatch.py,
`apply_expert_parallel`): it shards each layer's `GroupedExperts` to a range of experts and
swaps its `LocalDispatcher` for an all-to-all one. This file knows nothing of either.

    start(x):  route -> permute (rows sorted by global expert) -> dispatcher.dispatch
    ...        the block runs attention and the dense MLP meanwhile
    finish():  dispatcher.receive -> experts -> dispatcher.combine -> un-permute, weight, sum

Shape legend: T tokens, D hidden, E experts (global), L local experts, F expert width,
k choices per token, A kept assignments (rows sent to experts), R rows the local experts run.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from floe import kernels
from floe import router
from floe.config import ModelConfig
from floe.weight_init import draw_seed, init_stds, seeded_normal_

# The stacked expert weights, in nn.Linear (out, in) orientation: w1 gate and w3 up [E, F, D],
# w2 down [E, D, F]. Checkpoints, conversion and DeepSpeed's markers all iterate this tuple.
EXPERT_WEIGHTS = ("w1", "w3", "w2")


# The aux-loss-free balancing bias [E] (fp32 buffer of each MoELayer when model.balance_bias_rate > 0):
# model state (checkpointed, exported only by tools/export.py --drop-expert-bias), never a parameter.
EXPERT_BIAS = "expert_bias"


@dataclass
class MoEStats:
    balance_loss: torch.Tensor  # scalar, differentiable; normalised GShard value (1.0 = perfectly uniform)
    z_loss: torch.Tensor  # scalar, differentiable
    tokens_per_expert: torch.Tensor  # [E] long: kept assignments per expert
    dropped: torch.Tensor  # scalar long: assignments dropped by capacity
    num_assignments: int  # T * k
    routed_per_expert: torch.Tensor  # [E] long: assignments per expert before capacity (the router's choice)
    expert_ids: torch.Tensor  # [T, k] long: each token's chosen experts (kept or not), for per-source loads
    dropped_loss: torch.Tensor  # scalar long: dropped assignments of tokens with a loss
    loss_assignments: torch.Tensor  # scalar long: assignments of tokens with a loss


@dataclass
class TokenInfo:
    """What the model knows about each routed token, for the variants that need it (None = unknown)."""

    example_ids_T: torch.Tensor | None = None  # [T] packed example of each token (model.balance_scope=sequence)
    has_loss_T: torch.Tensor | None = None  # [T] bool: the token's prediction is trained (drop_policy=loss_aware)


@dataclass
class Permutation:
    token_idx_A: torch.Tensor  # [A] token of each sorted row
    weight_A: torch.Tensor  # [A] router weight of each sorted row
    tokens_per_expert_E: torch.Tensor  # [E] rows per expert, in sorted order


class GroupedExperts(nn.Module):
    """SwiGLU experts stacked along dim 0; holds experts [first_expert, first_expert + L) of E.

    forward(x [R, D] rows grouped by local expert, tokens_per_local_expert [L]) -> [R, D].
    """

    def __init__(self, num_experts: int, hidden_size: int, ffn: int):
        super().__init__()
        self.num_experts = num_experts  # global E
        self.first_expert = 0  # global id of local row 0
        self.num_local_experts = num_experts
        self.kernel_backend = "auto"  # floe.kernels backend of the grouped GEMMs (floe.model.apply_kernel_backend)
        self.w1 = nn.Parameter(torch.empty(num_experts, ffn, hidden_size))  # gate projection
        self.w3 = nn.Parameter(torch.empty(num_experts, ffn, hidden_size))  # up projection
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, ffn))  # down projection
        self.lora = None  # optional adapters (floe.lora.GroupedLoRA, set by apply_lora): forward hands them the rows

    @torch.no_grad()
    def init_weights(self, seed: int, key: str, std: float, out_std: float) -> None:
        """Row e of weight w draws from (seed, f"{key}.{w}", first_expert + e): the rows a shard
        holds equal the full module's rows of the same global experts. w2 writes into the
        residual stream, so it gets out_std."""
        for w in EXPERT_WEIGHTS:
            p = getattr(self, w)
            if p.is_meta:
                continue
            name = f"{key}.{w}" if key else w
            for row in range(p.shape[0]):
                seeded_normal_(p[row], out_std if w == "w2" else std, seed, name, self.first_expert + row)

    @torch.no_grad()
    def shard_(self, first_expert: int, num_local_experts: int) -> None:
        """Keep only experts [first_expert, first_expert + num_local_experts), in place (new
        Parameters; works on the meta device, so no rank ever allocates the others)."""
        if not (0 <= first_expert and first_expert + num_local_experts <= self.num_local_experts
                and self.num_local_experts == self.num_experts):
            raise ValueError(f"cannot shard experts {first_expert}..{first_expert + num_local_experts - 1} out of "
                             f"a module holding {self.first_expert}..{self.first_expert + self.num_local_experts - 1}")
        rows = slice(first_expert, first_expert + num_local_experts)
        for w in EXPERT_WEIGHTS:
            full = getattr(self, w)
            setattr(self, w, nn.Parameter(full.detach()[rows].clone(), requires_grad=full.requires_grad))
        if self.lora is not None:
            self.lora.shard_(rows)  # the adapters' expert dim goes with the experts
        self.first_expert, self.num_local_experts = first_expert, num_local_experts

    def expert_tensors(self) -> dict[str, nn.Parameter]:
        """{name under this module: parameter} of every tensor whose dim 0 is the local expert: w1, w3,
        w2 and the adapters' (what expert parallelism, DeepSpeed's markers and checkpoints treat per expert).
        A weight stored quantized (floe.quantize: integer buffers, never trained or saved) is not one."""
        out = {w: self._parameters[w] for w in EXPERT_WEIGHTS if w in self._parameters}
        if self.lora is not None:
            out.update({f"lora.{name}": p for name, p in self.lora.named_parameters()})
        return out

    def forward(self, x_RD: torch.Tensor, tokens_per_local_expert: torch.Tensor) -> torch.Tensor:
        if self.lora is not None and self.lora.active:
            return self.lora(self, x_RD, tokens_per_local_expert)
        return kernels.grouped_swiglu(x_RD, self.w1, self.w3, self.w2, tokens_per_local_expert,
                                      backend=self.kernel_backend)

    def extra_repr(self) -> str:
        last = self.first_expert + self.num_local_experts - 1
        w1 = self._parameters.get("w1")  # absent while a quantized base holds it (floe.quantize: w1_quantized)
        shape = tuple(w1.shape) if w1 is not None else tuple(self.get_submodule("w1_quantized").shape)
        return f"experts {self.first_expert}..{last} of {self.num_experts}, w1 {shape}"


class LocalDispatcher:
    """Token dispatch when every expert is on this device: the identity.

    The dispatcher protocol MoELayer calls (moe/parallel/dispatch.py has the all-to-all one):
      dispatch(x [A, D] sorted by global expert, tokens_per_expert [E]) -> handle  (may start comms)
      receive(handle) -> (x [R, D] grouped by local expert, tokens_per_local_expert [L])
      combine(y [R, D], handle) -> y [A, D] in dispatch's row order
    """

    def dispatch(self, x_AD: torch.Tensor, tokens_per_expert_E: torch.Tensor):
        return x_AD, tokens_per_expert_E

    def receive(self, handle) -> tuple[torch.Tensor, torch.Tensor]:
        return handle

    def combine(self, y_RD: torch.Tensor, handle) -> torch.Tensor:
        return y_RD


class _WeightedScatterAdd(torch.autograd.Function):
    """out[T, D] = sum over rows a of token_idx[a]: weight[a] * y[a] (dropped assignments add nothing).

    The same arithmetic as index_add of y * weight, but autograd's index_add keeps its whole
    [A, D] source for backward; this keeps only y (which the weight's gradient needs anyway),
    so each MoE layer holds one [A, D] tensor fewer until backward.
    """

    @staticmethod
    def forward(ctx, y_AD, weight_A, token_idx_A, num_tokens: int):
        ctx.save_for_backward(y_AD, weight_A, token_idx_A)
        weighted_AD = y_AD * weight_A.to(y_AD.dtype)[:, None]
        return y_AD.new_zeros(num_tokens, y_AD.shape[1]).index_add_(0, token_idx_A, weighted_AD)

    @staticmethod
    def backward(ctx, grad_TD):
        y_AD, weight_A, token_idx_A = ctx.saved_tensors
        grad_AD = grad_TD.index_select(0, token_idx_A)
        grad_y = grad_AD * weight_A.to(grad_AD.dtype)[:, None] if ctx.needs_input_grad[0] else None
        grad_w = (grad_AD * y_AD).sum(1).to(weight_A.dtype) if ctx.needs_input_grad[1] else None
        return grad_y, grad_w, None, None


@dataclass
class _Pending:
    """What start() hands to finish()."""

    handle: object  # the dispatcher's
    perm: Permutation
    stats: MoEStats
    num_tokens: int


class MoELayer(nn.Module):
    """Top-k MoE of SwiGLU experts. forward(x [T, D]) -> (y [T, D], MoEStats)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # Registered before the router: parameter order (experts, then gate.weight) is what the
        # optimizer, ZeRO's flat buffers and the norm's summation order see; kept from the
        # pre-GroupedExperts layout so runs stay bit-identical.
        self.experts = GroupedExperts(config.num_experts, config.hidden_size, config.expert_ffn)
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # router
        self.dispatcher = LocalDispatcher()
        self.checkpoint_experts = False  # set by floe.model.apply_activation_checkpointing
        if config.balance_bias_rate > 0:  # only then: the default model's state is what it always was
            self.register_buffer(EXPERT_BIAS, torch.zeros(config.num_experts))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, key: str = "") -> None:
        """Keyed init of the router and the experts under the module path `key` (the model
        passes "layers.{i}.moe"; the names keep the pre-GroupedExperts keys, so a seed gives
        the weights it always gave). seed None: drawn from torch's global RNG."""
        if self.gate.weight.is_meta and self.experts.w1.is_meta:
            return  # shapes only: the owner initialises after materialising
        seed = draw_seed() if seed is None else seed
        std, out_std = init_stds(self.config)
        prefix = f"{key}." if key else ""
        if not self.gate.weight.is_meta:
            seeded_normal_(self.gate.weight, std, seed, f"{prefix}gate.weight")
        self.experts.init_weights(seed, key, std, out_std)
        bias = getattr(self, EXPERT_BIAS, None)
        if bias is not None and not bias.is_meta:
            bias.zero_()

    @torch.no_grad()
    def update_expert_bias(self, routed_per_expert_E: torch.Tensor) -> None:
        """After an applied optimizer step: move the balancing bias against the global batch's
        load, routed_per_expert_E [E] (the same on every rank, so every replica stays equal)."""
        bias = getattr(self, EXPERT_BIAS, None)
        if bias is not None:
            router.update_expert_bias_(bias, routed_per_expert_E.to(bias.device), self.config.balance_bias_rate)

    def router_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Router logits [T, E], in fp32 whatever the activations' dtype."""
        return x_TD.float() @ self.gate.weight.float().t()

    def route(self, x_TD: torch.Tensor, dropless: bool = False, logits_TE: torch.Tensor | None = None,
              tokens: TokenInfo | None = None) -> tuple[router.RoutePlan, MoEStats]:
        """Router in fp32: plan for every token plus the losses and counts. dropless: no capacity.
        logits_TE: router_logits(x_TD) when the caller computed them already."""
        cfg = self.config
        tokens = tokens or TokenInfo()
        if logits_TE is None:
            logits_TE = self.router_logits(x_TD)
        num_tokens = x_TD.shape[0]
        cap = None if dropless else router.capacity(num_tokens, cfg.num_experts, cfg.top_k, cfg.capacity_factor)
        plan = router.route(logits_TE, cfg.top_k, cap, cfg.drop_policy, cfg.normalize_weights,
                            getattr(self, EXPERT_BIAS, None), tokens.has_loss_T)
        kept_experts = plan.expert_ids[plan.kept]
        dropped_TK = ~plan.kept
        if tokens.has_loss_T is None:  # unknown: every token counts as carrying a loss
            dropped_loss, loss_assignments = dropped_TK.sum(), torch.tensor(plan.kept.numel(), device=x_TD.device)
        else:
            dropped_loss = (dropped_TK & tokens.has_loss_T[:, None]).sum()
            loss_assignments = tokens.has_loss_T.sum() * cfg.top_k
        stats = MoEStats(
            balance_loss=router.balance(plan.probs, plan.expert_ids, cfg.balance_scope, tokens.example_ids_T),
            z_loss=router.z_loss(logits_TE) if cfg.z_loss_coef > 0 else logits_TE.new_zeros(()),
            tokens_per_expert=torch.bincount(kept_experts, minlength=cfg.num_experts),
            dropped=dropped_TK.sum(),
            num_assignments=plan.kept.numel(),
            routed_per_expert=torch.bincount(plan.expert_ids.reshape(-1), minlength=cfg.num_experts),
            expert_ids=plan.expert_ids.detach(),
            dropped_loss=dropped_loss,
            loss_assignments=loss_assignments,
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

    @staticmethod
    def unpermute(y_AD: torch.Tensor, perm: Permutation, num_tokens: int) -> torch.Tensor:
        """Weight each expert output by its router weight and sum the k contributions per token."""
        return _WeightedScatterAdd.apply(y_AD, perm.weight_A, perm.token_idx_A, num_tokens)

    # The block calls start() before attention and finish() after its dense MLP, so a
    # dispatcher that communicates has its exchange in flight in between.
    def start(self, x_TD: torch.Tensor, dropless: bool = False, logits_TE: torch.Tensor | None = None,
              tokens: TokenInfo | None = None) -> _Pending:
        """Route, permute and dispatch; returns the pending state finish() consumes.
        logits_TE: router_logits(x_TD) when the caller computed them (activation checkpointing);
        tokens: per-token facts the routing variants need (TokenInfo)."""
        plan, stats = self.route(x_TD, dropless, logits_TE, tokens)
        x_AD, perm = self.permute(x_TD, plan)
        handle = self.dispatcher.dispatch(x_AD, perm.tokens_per_expert_E)
        return _Pending(handle, perm, stats, x_TD.shape[0])

    def finish(self, pending: _Pending) -> tuple[torch.Tensor, MoEStats]:
        """Run the experts on what the dispatcher delivers and combine: (y [T, D], stats)."""
        x_RD, tokens_per_local_expert = self.dispatcher.receive(pending.handle)
        if self.checkpoint_experts and torch.is_grad_enabled():
            # Only the expert MLPs between receive and combine are recomputed in backward: the
            # routing, the permutation and the all-to-alls of this forward are reused as they are.
            y_RD = checkpoint(self.experts, x_RD, tokens_per_local_expert, use_reentrant=False)
        else:
            y_RD = self.experts(x_RD, tokens_per_local_expert)
        y_AD = self.dispatcher.combine(y_RD, pending.handle)
        return self.unpermute(y_AD, pending.perm, pending.num_tokens), pending.stats

    def forward(self, x_TD: torch.Tensor, dropless: bool = False,
                tokens: TokenInfo | None = None) -> tuple[torch.Tensor, MoEStats]:
        return self.finish(self.start(x_TD, dropless, tokens=tokens))


def expert_tensors(model: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    """{parameter name: (global id of row 0, tensor [experts held here, ...])} for every tensor whose dim 0
    is the local expert (the weights and any adapters), expert-parallel or not."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, MoELayer):
            prefix = f"{name}.experts." if name else "experts."
            for w, p in m.experts.expert_tensors().items():  # the weights and any adapters
                out[prefix + w] = (m.experts.first_expert, p)
    return out
