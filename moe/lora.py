"""LoRA: low-rank adapters beside the frozen weights of attention, the dense MLP and the experts.

    apply_lora(model, LoRAConfig(rank=8, alpha=16, targets=["attention", "dense_mlp", "experts"]), seed=0)

Every adapted projection W [out, in] computes W x + scaling * B A dropout(x), with A [r, in],
B [out, r] and scaling = alpha / r, or alpha / sqrt(r) with `rslora` (rank-stabilised LoRA). B starts
at zero, so the adapted model computes exactly what its base computes until the first update.
  - nn.Linear (attention q/k/v/o_proj, dense MLP w1/w3/w2): a `LoRA` child named `lora` and a forward
    hook that adds its term to the Linear's output; the frozen weight keeps its name and its module.
  - GroupedExperts: a `GroupedLoRA` child named `lora` holding, for each of w1/w3/w2, A [L, r, in] and
    B [L, out, r] for the L experts the module holds. GroupedExperts.forward hands it its rows; base and
    adapter products run through kernels.grouped_mm on the same groups. Expert parallelism shards it
    with the experts (GroupedExperts.shard_ slices it; apply_lora after sharding builds only the local
    rows), and checkpoints store its rows by global expert id (GroupedExperts.expert_tensors).
    w1 and w3 read the same rows, so their adapters share one dropout mask (as PEFT's LoRA on a fused
    gate/up projection does; separate nn.Linear's in PEFT draw one each) and one product with both A's.
Every other parameter gets requires_grad False (the router too, unless `train_router`; the embedding and
lm_head, unless `train_embeddings`), so DeepSpeed creates no gradient, optimizer state or ZeRO partition for it.

A is drawn like torch's nn.Linear default (kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in)),
PEFT's default too) from a generator keyed by (seed, parameter name, global expert id), so a shard holds
exactly the rows of the 1-process model whatever the expert-parallel size.

Shape legend (experts): R rows, L local experts, I a projection's input width, O its output width, r rank.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from floe import kernels
from floe.config import ModelConfig
from floe.errors import field_type_errors
from floe.layer import EXPERT_WEIGHTS, GroupedExperts
from floe.quantize import QUANTIZE_BASE, dequantize_base_, quantized_weights
from floe.targets import LORA_TARGETS, target_modules
from floe.weight_init import seeded_uniform_

@dataclass
class LoRAConfig:
    """The `lora.*` config section. rank 0 = no adapters (every parameter trains as configured)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0  # on each adapter's input, training only
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    rslora: bool = False  # scaling alpha / sqrt(rank) instead of alpha / rank
    train_router: bool = False  # also train the router (gate.weight) in full
    # also train the input embedding and lm_head in full (PEFT's modules_to_save=["embed_tokens", "lm_head"]):
    # what an answer in tokens the base never produced needs (BENCHMARKS.md "Learning")
    train_embeddings: bool = False
    quantize_base: str = "none"  # none | int8 | nf4: the frozen weights of lora.targets stored quantized (floe.quantize)

    def __post_init__(self):
        if errors := field_type_errors(self, "lora"):
            raise ValueError("invalid lora config:\n  " + "\n  ".join(errors))
        errors = []
        if self.rank < 0:
            errors.append(f"lora.rank must be >= 0 (0 = LoRA off), got {self.rank}")
        if not self.alpha > 0:
            errors.append(f"lora.alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            errors.append(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if unknown := [t for t in self.targets if t not in LORA_TARGETS]:
            errors.append(f"lora.targets: unknown target(s) {unknown}; known: {', '.join(LORA_TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            errors.append(f"lora.targets lists a target twice: {self.targets}")

        if self.quantize_base not in QUANTIZE_BASE:
            errors.append(f"lora.quantize_base must be one of {', '.join(QUANTIZE_BASE)}, got {self.quantize_base!r}")
        elif self.quantize_base != "none" and self.rank == 0:
            errors.append(f"lora.quantize_base={self.quantize_base} needs adapters to train (lora.rank > 0): a "
                          "quantized base alone has nothing trainable in the layers it quantizes")
        if self.rank > 0 and not self.targets:
            errors.append("lora.targets is empty: name at least one of " + ", ".join(LORA_TARGETS))
        if errors:
            raise ValueError("invalid lora config:\n  " + "\n  ".join(errors))

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def base_is_adapters_off(self) -> bool:
        """Whether disabling the adapters gives the starting model back (nothing else trains), as
        DPO's reference policy needs."""
        return self.enabled and not (self.train_router or self.train_embeddings)

    def fully_trained(self, model: nn.Module) -> list[str]:
        """The names of `model`'s parameters that train in full beside the adapters."""
        return [name for name, _ in model.named_parameters()
                if (self.train_router and name.endswith("moe.gate.weight"))
                or (self.train_embeddings and name in ("embed_tokens.weight", "lm_head.weight"))]

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def lora_model_errors(lora: LoRAConfig, model: ModelConfig) -> list[str]:
    """The rules between lora.* and model.* (checked before any process group exists)."""
    if lora.enabled and model.freeze_moe:
        return ["lora.rank > 0 together with model.freeze_moe: LoRA freezes the base itself and trains adapters "
                "(on the experts too when lora.targets has 'experts'); drop model.freeze_moe, or leave 'experts' "
                "out of lora.targets to keep the MoE as it is"]
    return []


class Dropout(nn.Module):
    """Dropout whose 1/(1-p) the caller applies: in training mode forward(x) zeroes each element with
    probability p and leaves the rest as they are; `gain` is then 1/(1-p) (1 otherwise, and x itself
    comes back). An adapter folds the gain into the multiply it makes anyway, by its scaling on the
    rank-r product, so dropout costs one pass over x instead of nn.Dropout's three. The mask is drawn as
    31-bit integers against round(p * 2^31) (p to within 2^-31) instead of bernoulli_'s float draws: 0.68x
    F.dropout's CPU time (tools/bench_lora_parts.py; LoRA dropout was ~15% of a CPU LoRA step)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = round(p * 2**31)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:  # p 0: no random draw at all, the run's RNG stream is kept
            return x
        return x * (torch.empty(x.shape, dtype=torch.int32, device=x.device).random_() >= self.threshold)

    @property
    def gain(self) -> float:
        return 1 / (1 - self.p) if self.training else 1.0

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LoRA(nn.Module):
    """The adapter of one nn.Linear: forward(x [..., in], out [..., out]) -> out + scaling * B A dropout(x)."""

    def __init__(self, linear: nn.Linear, rank: int, scaling: float, dropout: float):
        super().__init__()
        w = linear.weight
        self.A = nn.Parameter(torch.empty(rank, w.shape[1], device=w.device, dtype=w.dtype))
        self.B = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device, dtype=w.dtype))
        self.scaling = scaling
        self.dropout = Dropout(dropout)
        self.enabled, self.merged = True, False
        self.shared_input = None  # (x, dropout(x)) while the parent module runs (_share_dropout)

    @torch.no_grad()
    def reset_parameters(self, seed: int, key: str) -> None:
        seeded_uniform_(self.A, 1 / math.sqrt(self.A.shape[1]), seed, f"{key}.A")
        self.B.zero_()

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (the Linear's output for x) + scaling * B A dropout(x): the second product and the sum in
        one addmm (no [..., out] temporary); the scaling multiplies the rank-r product, not the result.
        With a mask shared with its siblings (_share_dropout) the dropped input is theirs."""
        shared = self.shared_input
        dropped = shared[1] if shared is not None and shared[0] is x else self.dropout(x)
        xa = F.linear(dropped, self.A) * (self.scaling * self.dropout.gain)
        return torch.addmm(out.reshape(-1, out.shape[-1]), xa.reshape(-1, xa.shape[-1]), self.B.t()).view(out.shape)

    def delta(self) -> torch.Tensor:
        """scaling * B A: what merging adds to the Linear's weight [out, in]."""
        return (self.B @ self.A) * self.scaling

    def extra_repr(self) -> str:
        return f"rank {self.A.shape[0]}, scaling {self.scaling:g}"


def _add_lora(linear: nn.Linear, args, out: torch.Tensor):
    """Forward hook of an adapted nn.Linear: its output plus the adapter's term."""
    lora = linear.lora
    if lora.enabled and not lora.merged:
        return lora(args[0], out)
    return None  # output unchanged


class GroupedLoRA(nn.Module):
    """Adapters of GroupedExperts' w1, w3 and w2: {w}_A [L, r, in], {w}_B [L, out, r] for its L experts.

    forward(experts, x [R, D] grouped by local expert, tokens_per_local_expert [L]) -> [R, D]: the experts'
    SwiGLU with every projection adapted."""

    def __init__(self, experts: GroupedExperts, rank: int, scaling: float, dropout: float):
        super().__init__()
        for w in EXPERT_WEIGHTS:
            base_LOI = getattr(experts, w)
            num_local, out_features, in_features = base_LOI.shape
            kw = {"device": base_LOI.device, "dtype": base_LOI.dtype}
            setattr(self, f"{w}_A", nn.Parameter(torch.empty(num_local, rank, in_features, **kw)))
            setattr(self, f"{w}_B", nn.Parameter(torch.zeros(num_local, out_features, rank, **kw)))
        self.scaling = scaling
        self.dropout = Dropout(dropout)
        self.enabled, self.merged = True, False

    @property
    def active(self) -> bool:
        return self.enabled and not self.merged

    @torch.no_grad()
    def reset_parameters(self, seed: int, key: str, first_expert: int) -> None:
        """Row e of {w}_A draws from (seed, f"{key}.{w}_A", first_expert + e); every B is zero."""
        for w in EXPERT_WEIGHTS:
            a_LrI = getattr(self, f"{w}_A")
            for row in range(a_LrI.shape[0]):
                seeded_uniform_(a_LrI[row], 1 / math.sqrt(a_LrI.shape[2]), seed, f"{key}.{w}_A", first_expert + row)
            getattr(self, f"{w}_B").zero_()

    @torch.no_grad()
    def shard_(self, rows: slice) -> None:
        """Keep only local rows `rows` (GroupedExperts.shard_ calls it with its own slice)."""
        for name, p in list(self.named_parameters(recurse=False)):
            setattr(self, name, nn.Parameter(p.detach()[rows].clone(), requires_grad=p.requires_grad))

    def forward(self, experts: GroupedExperts, x_RD: torch.Tensor, tokens_per_local_expert: torch.Tensor):
        backend = experts.kernel_backend  # the experts' own (train.kernels, floe.model.apply_kernel_backend)

        def gmm(x_RI, w_LOI):  # x W_g^T per expert group g (a transposed view, never a copy)
            return kernels.grouped_mm(x_RI, w_LOI.transpose(1, 2), tokens_per_local_expert, backend)

        # w1 and w3 read the same rows, so their adapters are one fused gate/up adapter, as LoRA on a fused
        # projection is: one dropout mask and one product with both A's ([L, 2r, D]); the scaling goes on
        # the rank-r products, not the [R, F] results.
        rank, scaling = self.w1_A.shape[1], self.scaling * self.dropout.gain
        xa_R2r = gmm(self.dropout(x_RD), torch.cat([self.w1_A, self.w3_A], dim=1)) * scaling
        gate_RF = gmm(x_RD, experts.w1) + gmm(xa_R2r[:, :rank], self.w1_B)
        up_RF = gmm(x_RD, experts.w3) + gmm(xa_R2r[:, rank:], self.w3_B)
        h_RF = F.silu(gate_RF) * up_RF
        return gmm(h_RF, experts.w2) + gmm(gmm(self.dropout(h_RF), self.w2_A) * scaling, self.w2_B)

    def delta(self, w: str) -> torch.Tensor:
        """scaling * B_e A_e for every local expert e: what merging adds to experts.{w} [L, out, in]."""
        return torch.bmm(getattr(self, f"{w}_B"), getattr(self, f"{w}_A")) * self.scaling

    def extra_repr(self) -> str:
        return f"rank {self.w1_A.shape[1]}, scaling {self.scaling:g}, {self.w1_A.shape[0]} experts"


def apply_lora(model: nn.Module, cfg: LoRAConfig, seed: int = 0) -> nn.Module:
    """Give every targeted projection of `model` (an ArcticForCausalLM with its weights in place,
    expert-parallel or not) an adapter and freeze everything but the adapters (and cfg.fully_trained:
    the router, the embedding and lm_head on request); in place. rank 0: the model is returned
    untouched. Adapter A is keyed by `seed`.
    On a model of the meta device (the memory plan, floe.plan) the adapters are built there too,
    shapes only: a model whose weights are loaded afterwards would lose them, so training adapts after."""
    if not cfg.enabled:
        return model
    if adapters(model):
        raise ValueError("apply_lora: the model has LoRA adapters already")
    meta = any(p.is_meta for p in model.parameters())
    model.requires_grad_(False)
    for name, module in target_modules(model, cfg.targets):
        if isinstance(module, GroupedExperts):
            module.lora = GroupedLoRA(module, cfg.rank, cfg.scaling, cfg.dropout)
        elif isinstance(module, nn.Linear):
            module.lora = LoRA(module, cfg.rank, cfg.scaling, cfg.dropout)
            module.register_forward_hook(_add_lora)
        else:
            raise AssertionError(f"LORA_TARGETS names {name}, a {type(module).__name__}")
    if cfg.dropout > 0:
        for name, module in model.named_modules():
            children = (getattr(module, c, None) for c in SHARED_INPUT.get(name.rsplit(".", 1)[-1], ()))
            loras = [c.lora for c in children if isinstance(getattr(c, "lora", None), LoRA)]
            if len(loras) > 1:
                _share_dropout(module, loras)
    if not meta:
        reset_adapters(model, cfg.targets, seed)
    for name in cfg.fully_trained(model):
        model.get_parameter(name).requires_grad_(True)
    return model


# Linears that read one input inside one module (attention's q/k/v, the dense MLP's w1/w3): their adapters
# share one dropout mask, as LoRA on the fused projection (qkv, gate/up) has; GroupedLoRA does the same
# for the experts' w1/w3. (PEFT, adapting separate nn.Linear's, draws one mask each.)
SHARED_INPUT = {"attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("w1", "w3")}


def _share_dropout(parent: nn.Module, loras: list[LoRA]) -> None:
    """Hooks on `parent`: before it runs, dropout(its input) once for `loras`; after it (or its error), forget it."""
    def draw(module, args):
        if args and all(a.enabled and not a.merged for a in loras):
            dropped = loras[0].dropout(args[0])  # only in training mode; each adapter applies the gain
            for a in loras:
                a.shared_input = (args[0], dropped)

    def forget(module, args, out):
        for a in loras:
            a.shared_input = None

    parent.register_forward_pre_hook(draw)
    parent.register_forward_hook(forget, always_call=True)


def reset_adapters(model: nn.Module, targets: list[str], seed: int, under: str = "") -> None:
    """Initialise the adapters apply_lora gave `model` whose module path starts with `under` (A keyed by
    `seed`, its name and the global expert id; B zero): the same values whichever part goes first, so a
    QLoRA load (floe.run.init_from) initialises a block's adapters once that block is materialised."""
    for name, module in target_modules(model, targets):
        if name.startswith(under) and isinstance(module, GroupedExperts):
            module.lora.reset_parameters(seed, f"{name}.lora", module.first_expert)
        elif name.startswith(under):
            module.lora.reset_parameters(seed, f"{name}.lora")


def adapters(model: nn.Module) -> list[tuple[str, LoRA | GroupedLoRA]]:
    """(name, adapter) of every LoRA and GroupedLoRA in `model`."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (LoRA, GroupedLoRA))]


def is_adapter_name(name: str) -> bool:
    """Whether a parameter name belongs to an adapter (every adapter module is called `lora`)."""
    return ".lora." in f".{name}"


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Inside the block `model` computes without its adapters: its base (e.g. DPO's reference policy)
    when nothing else trained (LoRAConfig.base_is_adapters_off); merged adapters stay merged (unmerge
    first to get the base from a merged model)."""
    found = adapters(model)
    before = [a.enabled for _, a in found]
    for _, a in found:
        a.enabled = False
    try:
        yield model
    finally:
        for (_, a), was in zip(found, before):
            a.enabled = was


def _adapted_weights(model: nn.Module):
    """(adapter, base weight, delta) of every adapter, one per adapted [out, in] or [L, out, in] weight."""
    for name, a in adapters(model):
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if isinstance(a, LoRA):
            yield a, owner.weight, a.delta
        else:
            for w in EXPERT_WEIGHTS:
                yield a, getattr(owner, w), (lambda a=a, w=w: a.delta(w))


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Add every adapter's scaling * B A into its base weight (in place); adapters then add nothing."""
    if quantized_weights(model):
        raise ValueError("merge_lora: the base is quantized (lora.quantize_base); floe.quantize.dequantize_base_"
                         "(model) first, or take merged_state_dict(model)")
    for a, weight, delta in _adapted_weights(model):
        if not a.merged:
            weight.add_(delta().to(weight.dtype))
    for _, a in adapters(model):
        a.merged = True
    return model


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo merge_lora (subtracts the same terms: equal to the base up to rounding)."""
    for a, weight, delta in _adapted_weights(model):
        if a.merged:
            weight.sub_(delta().to(weight.dtype))
    for _, a in adapters(model):
        a.merged = False
    return model


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter merged into its weight, adapter entries left out:
    the state dict of a plain ArcticForCausalLM (for export). The model is not changed. A quantized
    base (lora.quantize_base) is dequantized first: the merge adds to the weights the run trained on."""
    if quantized_weights(model):
        import copy

        model = dequantize_base_(copy.deepcopy(model))  # the copy: the quantized buffers and adapters
    out = {k: v.detach() for k, v in model.state_dict().items() if not is_adapter_name(k)}
    names = {id(p): n for n, p in model.named_parameters()}
    for a, weight, delta in _adapted_weights(model):
        if not a.merged:
            out[names[id(weight)]] = weight.detach() + delta().to(weight.dtype)
    return out


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name: parameter} of what trains (requires_grad): what a LoRA checkpoint holds."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
