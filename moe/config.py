"""Model architecture config, presets and parameter counting (no torch needed to count)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from floe.errors import field_type_errors

# Over capacity, within a choice rank: keep higher "probs", earlier "position", or tokens with a loss
# first and then higher probs ("loss_aware"). moe/router.py route() says exactly how.
DROP_POLICIES = ("probs", "position", "loss_aware")
# Where the balance loss is measured: over the micro-batch's tokens, or per packed example averaged.
BALANCE_SCOPES = ("batch", "sequence")


@dataclass
class ModelConfig:
    """Architecture of an Arctic-style dense-residual MoE transformer.

    Every block: h = x + Attn(norm_in(x)); out = h + DenseMLP(norm_res(h)) + MoE(norm_moe(x)).
    """

    vocab_size: int = 32000
    hidden_size: int = 7168
    num_layers: int = 35
    num_heads: int = 56
    num_kv_heads: int = 8
    dense_ffn: int = 7168  # width of the dense residual SwiGLU MLP
    expert_ffn: int = 4864  # width of each expert's SwiGLU MLP
    num_experts: int = 128
    top_k: int = 2
    capacity_factor: float | None = 1.25  # None = dropless
    drop_policy: str = "probs"  # over capacity, within a choice rank: keep higher "probs", earlier "position",
    # or loss tokens first ("loss_aware")
    normalize_weights: bool = True  # renormalise the top-k router weights to sum to 1
    balance_coef: float = 0.01
    balance_scope: str = "batch"  # the balance loss per micro-batch ("batch") or per example averaged ("sequence")
    balance_bias_rate: float = 0.0  # aux-loss-free balancing: per-expert selection bias step per optimizer step; 0 = off
    z_loss_coef: float = 0.0
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    norm_eps: float = 1e-5
    init_std: float = 0.02
    freeze_moe: bool = False  # train only the dense parts (router and experts frozen)
    freeze_router: bool = False  # train everything but the routers (gate weights frozen)

    def __post_init__(self):
        errors = field_type_errors(self, "model")
        if errors:
            raise ValueError("invalid model config:\n  " + "\n  ".join(errors))

        def positive(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                errors.append(f"model.{name} must be a positive integer, got {value!r}")
                return False
            return True

        ok = {name: positive(name) for name in (
            "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
            "dense_ffn", "expert_ffn", "num_experts", "top_k", "max_seq_len")}
        if ok["top_k"] and ok["num_experts"] and self.top_k > self.num_experts:
            errors.append(f"model.top_k ({self.top_k}) must be <= model.num_experts ({self.num_experts})")
        if ok["hidden_size"] and ok["num_heads"]:
            if self.hidden_size % self.num_heads:
                errors.append(f"model.hidden_size ({self.hidden_size}) must be divisible by "
                              f"model.num_heads ({self.num_heads})")
            elif (self.hidden_size // self.num_heads) % 2:
                errors.append(f"model.hidden_size / model.num_heads = {self.hidden_size // self.num_heads} "
                              "must be even (RoPE rotates pairs)")
        if ok["num_heads"] and ok["num_kv_heads"] and self.num_heads % self.num_kv_heads:
            errors.append(f"model.num_heads ({self.num_heads}) must be divisible by "
                          f"model.num_kv_heads ({self.num_kv_heads})")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            errors.append(f"model.capacity_factor must be > 0 or null (dropless), got {self.capacity_factor!r}")
        if self.drop_policy not in DROP_POLICIES:
            errors.append(f"model.drop_policy must be one of {DROP_POLICIES}, got {self.drop_policy!r}")
        if self.balance_scope not in BALANCE_SCOPES:
            errors.append(f"model.balance_scope must be one of {BALANCE_SCOPES}, got {self.balance_scope!r}")
        for name in ("balance_coef", "balance_bias_rate", "z_loss_coef", "norm_eps", "init_std"):
            if not getattr(self, name) >= 0:
                errors.append(f"model.{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.rope_theta > 0:
            errors.append(f"model.rope_theta must be > 0, got {self.rope_theta!r}")
        if errors:
            raise ValueError("invalid model config:\n  " + "\n  ".join(errors))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def num_params(self) -> tuple[int, int]:
        """(total, active_per_token) parameter counts, by arithmetic.

        Active counts every dense parameter (embedding and head included, as Arctic's
        "17B active" does) plus top_k of the num_experts experts in every layer.
        """
        d, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attn = 2 * d * d + 2 * d * kv  # q, o and k, v projections
        dense_mlp = 3 * d * self.dense_ffn
        router = self.num_experts * d
        expert = 3 * d * self.expert_ffn
        norms = 3 * d
        dense_per_layer = attn + dense_mlp + router + norms
        outside = 2 * self.vocab_size * d + d  # embedding, untied head, final norm
        total = outside + self.num_layers * (dense_per_layer + self.num_experts * expert)
        active = outside + self.num_layers * (dense_per_layer + self.top_k * expert)
        return total, active

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    # Tests and the default run: trains in seconds on a CPU. Arctic-expressible (the residual
    # MLP is hidden_size wide), so an exported tiny run loads in Hugging Face.
    "tiny": ModelConfig(
        vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        dense_ffn=64, expert_ffn=64, num_experts=8, top_k=2, capacity_factor=1.25,
        max_seq_len=512,
    ),
    # A model worth a few GPU-hours: ~0.74B total, ~0.17B active.
    "small": ModelConfig(
        vocab_size=32000, hidden_size=1024, num_layers=12, num_heads=16, num_kv_heads=4,
        dense_ffn=1024, expert_ffn=512, num_experts=32, top_k=2, capacity_factor=1.25,
        max_seq_len=4096,
    ),
    # Arctic-shaped proxies for data-mix ablations (the cookbook pretrained 2B- then 7B-active MoEs to
    # choose Arctic's mix): dense residual, 128 experts top-2, head_dim 128, 8 kv heads, the residual
    # MLP hidden_size wide and experts about 2/3 of it as in Arctic. ~49.6B total, ~2.03B active.
    "arctic_2b": ModelConfig(
        vocab_size=32000, hidden_size=3072, num_layers=20, num_heads=24, num_kv_heads=8,
        dense_ffn=3072, expert_ffn=2048, num_experts=128, top_k=2, capacity_factor=1.25,
    ),
    # ~195B total, ~7.3B active.
    "arctic_7b": ModelConfig(
        vocab_size=32000, hidden_size=5120, num_layers=28, num_heads=40, num_kv_heads=8,
        dense_ffn=5120, expert_ffn=3456, num_experts=128, top_k=2, capacity_factor=1.25,
    ),
    # Snowflake Arctic's published shape: ~480B total, ~17B active.
    "arctic_480b": ModelConfig(),
}
