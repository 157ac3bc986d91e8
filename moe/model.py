"""ArcticForCausalLM: a dense-residual MoE transformer in plain single-device PyTorch.

Each block, with x its input:
    h   = x + Attention(norm_in(x))
    out = h + DenseMLP(norm_res(h)) + MoE(norm_moe(x))
The MoE reads x, not h, so its dispatch does not wait for attention.

Shape legend: B batch, S sequence, D hidden, H query heads, G kv heads, Dh head dim,
V vocab, T = tokens entering the MoE (B*S minus padding).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from floe.config import ModelConfig
from floe.weight_init import draw_seed, init_stds, seeded_normal_
from floe import kernels
from floe.layer import GroupedExperts, MoELayer, MoEStats, TokenInfo

IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, S, V]
    loss: torch.Tensor | None  # lm_loss + aux_loss (None without labels)
    lm_loss: torch.Tensor | None  # mean cross-entropy over this batch's loss tokens
    lm_loss_sum: torch.Tensor | None  # summed cross-entropy (for normalising by a global token count)
    num_loss_tokens: torch.Tensor | None  # scalar long
    aux_loss: torch.Tensor  # balance_coef * sum_l balance_l + z_loss_coef * sum_l z_l
    balance_loss: torch.Tensor  # sum over layers of the normalised GShard loss, before the coefficient
    router_stats: list[MoEStats] = field(default_factory=list)


def flex_attention(q, k, v, block_mask: BlockMask, enable_gqa: bool):
    """FlexAttention: compiled on CUDA (its fused kernel; eager would materialise the scores),
    eager elsewhere (forward only on a CPU in torch 2.13)."""
    from torch.nn.attention.flex_attention import flex_attention as eager

    if not q.is_cuda:
        return eager(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(eager, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


_compiled_flex = None


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """Neox-style RoPE: cos/sin per position id, so positions may restart inside a row."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta  # frequencies are made per call: no buffer to
        # materialise after building the model on the meta device

    def forward(self, position_ids_BS: torch.Tensor, dtype: torch.dtype):
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=position_ids_BS.device)
        inv_freq = 1.0 / (self.theta ** (exponent / self.head_dim))
        freqs_BSh = position_ids_BS.float()[..., None] * inv_freq  # (B, S, Dh/2)
        emb_BSDh = torch.cat((freqs_BSh, freqs_BSh), dim=-1)[:, None]  # (B, 1, S, Dh)
        return emb_BSDh.cos().to(dtype), emb_BSDh.sin().to(dtype)


class Attention(nn.Module):
    """Causal grouped-query attention through scaled_dot_product_attention."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, hd
        self.q_proj = nn.Linear(d, config.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, config.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, config.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(config.num_heads * hd, d, bias=False)

    def forward(self, x_BSD, rope, attn_mask, cache=None):
        """cache: this layer's KV cache in generation (moe/generate.py), which appends k, v and
        returns every key and value so far; attn_mask then spans them (it is never None)."""
        b, s, _ = x_BSD.shape
        q = self.q_proj(x_BSD).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, S, Dh)
        k = self.k_proj(x_BSD).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, S, Dh)
        v = self.v_proj(x_BSD).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, S, Dh)
        cos, sin = rope
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v)  # (B, G, cached + S, Dh)
        gqa = self.num_heads != self.num_kv_heads
        if isinstance(attn_mask, BlockMask):  # packed rows on CUDA: no S x S mask, skipped blocks
            y = flex_attention(q, k, v, block_mask=attn_mask, enable_gqa=gqa)
        elif attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, -1))  # (B, S, D)


class DenseMLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, ffn, bias=False)
        self.w3 = nn.Linear(hidden, ffn, bias=False)
        self.w2 = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ArcticBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, eps = config.hidden_size, config.norm_eps
        self.norm_in = nn.RMSNorm(d, eps=eps)
        self.attn = Attention(config)
        self.norm_res = nn.RMSNorm(d, eps=eps)
        self.mlp = DenseMLP(d, config.dense_ffn)
        self.norm_moe = nn.RMSNorm(d, eps=eps)
        self.moe = MoELayer(config)
        self.checkpointing = "none"  # one of CHECKPOINTING; set by apply_activation_checkpointing

    def forward(self, x_BSD, rope, attn_mask, moe_tokens, dropless: bool = False, cache=None,
                token_info: TokenInfo | None = None):
        b, s, d = x_BSD.shape
        mode = self.checkpointing if torch.is_grad_enabled() else "none"
        if mode == "full":  # keeps neither the norm's output nor the router's input
            moe_in_TD, logits_TE = _checkpoint(self._moe_input, x_BSD, moe_tokens, True)
        else:
            moe_in_TD, logits_TE = self._moe_input(x_BSD, moe_tokens), None
        pending = self.moe.start(moe_in_TD, dropless, logits_TE, token_info)  # the MoE reads the block input, not h
        del moe_in_TD  # only the rows gathered by start() are still needed
        if mode == "full":
            out = _checkpoint(self._attention_and_mlp, x_BSD, rope, attn_mask, cache)
        elif mode == "selective":
            h = x_BSD + self.attn(self.norm_in(x_BSD), rope, attn_mask, cache)
            out = h + _checkpoint(self._mlp, h)
        else:
            out = self._attention_and_mlp(x_BSD, rope, attn_mask, cache)
        moe_out_TD, stats = self.moe.finish(pending)
        if moe_tokens is not None:
            # index_put, not index_copy: autograd's index_copy would keep the [T, D] source until backward
            moe_out_TD = moe_out_TD.new_zeros(b * s, d).index_put((moe_tokens,), moe_out_TD)
        return out + moe_out_TD.view(b, s, d), stats

    def _moe_input(self, x_BSD, moe_tokens, with_logits: bool = False):
        """norm_moe(x) as [T, D] rows without the padding (and the router logits when asked)."""
        moe_in_TD = self.norm_moe(x_BSD).reshape(-1, x_BSD.shape[-1])
        if moe_tokens is not None:
            moe_in_TD = moe_in_TD[moe_tokens]  # padding stays out of routing, capacity and stats
        return (moe_in_TD, self.moe.router_logits(moe_in_TD)) if with_logits else moe_in_TD

    def _attention_and_mlp(self, x_BSD, rope, attn_mask, cache):
        h = x_BSD + self.attn(self.norm_in(x_BSD), rope, attn_mask, cache)
        return h + self.mlp(self.norm_res(h))

    def _mlp(self, h_BSD):
        return self.mlp(self.norm_res(h_BSD))


# train.activation_checkpointing: what each block recomputes in backward instead of keeping.
#   none       nothing
#   moe        the expert MLPs (their [rows, expert_ffn] intermediates); attention and the dense MLP kept
#   selective  the expert MLPs and the dense MLP with its norm: every [tokens, ffn]-wide intermediate,
#              at the cost of one more forward of the MLPs; attention (whose recompute would cost the
#              O(S^2) attention again) and the router are kept
#   full       everything but what came over the network: norms, attention, dense MLP, router logits
#              and experts; a block keeps its input, the routing plan ([T, E] fp32 and [T, k] ints),
#              the rows received from the dispatch and the rows the combine brought back
# In every mode the routing decided in the forward is reused and no all-to-all is repeated: the
# checkpointed regions never contain a route() or a dispatcher call.
CHECKPOINTING = ("none", "moe", "selective", "full")


def apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Make every ArcticBlock of `model` recompute per `mode` (see CHECKPOINTING) in backward; in place."""
    if mode not in CHECKPOINTING:
        raise ValueError(f"train.activation_checkpointing must be one of {CHECKPOINTING}, got {mode!r}")
    for block in model.modules():
        if isinstance(block, ArcticBlock):
            block.checkpointing = mode
            block.moe.checkpoint_experts = mode != "none"
    return model


def apply_kernel_backend(model: nn.Module, backend: str) -> nn.Module:
    """Make every experts module of `model` run its grouped GEMMs on floe.kernels backend `backend`
    (train.kernels: auto | reference | triton); in place. The choice travels with the model, not in
    a module global, so two models in one process (a test's reference beside it) keep their own."""
    kernels.check_backend(backend, "train.kernels")
    for m in model.modules():
        if isinstance(m, GroupedExperts):
            m.kernel_backend = backend
    return model


def _checkpoint(fn, *args):
    return torch_checkpoint(fn, *args, use_reentrant=False)


def shift_targets(labels_BS: torch.Tensor, position_ids_BS: torch.Tensor) -> torch.Tensor:
    """Targets [B, S-1] for logits[:, :-1]: labels shifted left, and -100 wherever a new example
    starts, so the last token of one packed example never predicts the first of the next."""
    return labels_BS[:, 1:].masked_fill(position_ids_BS[:, 1:] == 0, IGNORE_INDEX)


def document_ids(position_ids_BS: torch.Tensor) -> torch.Tensor:
    """[B, S] index of the packed example each token belongs to: a new example starts wherever
    position_ids restart at 0 (as varlen attention derives it); tokens before the first restart
    form an example of their own."""
    return torch.cumsum(position_ids_BS == 0, dim=1)


def example_lengths(position_ids_BS: torch.Tensor) -> torch.Tensor:
    """[B, S] length of the packed example each token belongs to (a row's padding tail is one more)."""
    doc_BS = document_ids(position_ids_BS)
    counts_BN = torch.zeros(doc_BS.shape[0], doc_BS.shape[1] + 1, dtype=torch.long, device=doc_BS.device)
    counts_BN.scatter_add_(1, doc_BS, torch.ones_like(doc_BS))  # tokens per example id
    return counts_BN.gather(1, doc_BS)


def neftune_noise(x_BSD: torch.Tensor, position_ids_BS: torch.Tensor, alpha: float) -> torch.Tensor:
    """NEFTune's noise for embeddings x: U(-1, 1) * alpha / sqrt(L * D), with L the token's own example
    length in a packed row (transformers and the paper use the whole padded row: the same for one example
    a row). Draws from torch's default generator of x's device."""
    scale_BS = alpha / (example_lengths(position_ids_BS) * x_BSD.shape[-1]).to(torch.float32).sqrt()
    return (torch.rand_like(x_BSD, dtype=torch.float32) * 2 - 1).mul_(scale_BS[..., None]).to(x_BSD.dtype)


def packed_attention_mask(position_ids_BS: torch.Tensor) -> torch.Tensor:
    """Causal mask (B, 1, S, S) that also keeps each packed example to itself (the CPU path)."""
    doc_BS = document_ids(position_ids_BS)
    same_doc = doc_BS[:, :, None] == doc_BS[:, None, :]  # (B, S, S)
    s = position_ids_BS.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=position_ids_BS.device).tril()
    return (same_doc & causal)[:, None]


def packed_block_mask(position_ids_BS: torch.Tensor, block_size: int = 128) -> BlockMask:
    """The same rule as packed_attention_mask as a FlexAttention BlockMask: per (B, query block, kv
    block) only the list of blocks that hold an allowed pair (blocks above the diagonal or across
    examples are never computed); no S x S tensor is kept. Built once per batch."""
    doc_BS = document_ids(position_ids_BS)

    def same_example_causal(b, h, q_idx, kv_idx):
        return (doc_BS[b, q_idx] == doc_BS[b, kv_idx]) & (q_idx >= kv_idx)

    b, s = doc_BS.shape
    return create_block_mask(same_example_causal, b, None, s, s, device=doc_BS.device, BLOCK_SIZE=block_size)


# The packed-attention kernel: "auto" = FlexAttention with a block mask on CUDA, dense-mask SDPA
# elsewhere (torch 2.13 has no CPU backward for FlexAttention or varlen_attn); "dense" or "flex"
# force one (flex runs forward-only on a CPU: tests compare it with dense there).
PACKED_ATTENTION = ("auto", "dense", "flex")


class ArcticForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ArcticBlock(config) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = Rotary(config.head_dim, config.rope_theta)
        self.packed_attention = "auto"  # one of PACKED_ATTENTION
        self.neftune_alpha = 0.0  # train.neftune_alpha: noise on the input embeddings in training forwards only
        self.reset_parameters()
        for block in self.layers:
            if config.freeze_moe:
                block.moe.requires_grad_(False)
            if config.freeze_router:
                block.moe.gate.requires_grad_(False)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Initialise every weight from `seed` (None: drawn from torch's global RNG).

        Each tensor, and each row of a stacked expert weight, draws from its own generator
        keyed by (seed, parameter name, global expert id) (moe/weight_init.py). So the values do not
        depend on the order of initialisation, and a model built on the meta device, sharded,
        then materialised with to_empty initialises exactly the rows the full model holds.
        """
        seed = draw_seed() if seed is None else seed
        std, out_std = init_stds(self.config)
        moe_params = set()
        for module_name, module in self.named_modules():
            if isinstance(module, MoELayer):  # the router and the experts key their own init
                module.init_weights(seed, key=module_name)
                moe_params.update(id(p) for p in module.parameters())
        for name, p in self.named_parameters():
            if p.is_meta or id(p) in moe_params:
                continue
            if p.dim() < 2:
                p.fill_(1.0)  # RMSNorm weights (floe has no biases)
            else:
                seeded_normal_(p, out_std if name.endswith(("o_proj.weight", "mlp.w2.weight")) else std, seed, name)

    def token_info(self, position_ids_BS, labels_BS, moe_tokens) -> TokenInfo | None:
        """Per routed token: its packed example (only for model.balance_scope=sequence) and, given
        labels, whether its prediction is trained (the shifted label is not -100, so the last token
        of an example has none): model.drop_policy=loss_aware drops by it, every policy counts
        dropped_loss by it. None when there is nothing to say."""
        cfg = self.config
        example_ids = has_loss = None
        if cfg.balance_scope == "sequence":
            b, s = position_ids_BS.shape
            row_offset = torch.arange(b, device=position_ids_BS.device)[:, None] * (s + 1)
            example_ids = (document_ids(position_ids_BS) + row_offset).reshape(-1)  # unique over the batch
        if labels_BS is not None:
            targets = shift_targets(labels_BS, position_ids_BS) != IGNORE_INDEX  # (B, S-1)
            has_loss = F.pad(targets, (0, 1), value=False).reshape(-1)  # (B*S,)
        if example_ids is None and has_loss is None:
            return None
        if moe_tokens is not None:  # padding is not routed
            example_ids = None if example_ids is None else example_ids[moe_tokens]
            has_loss = None if has_loss is None else has_loss[moe_tokens]
        return TokenInfo(example_ids_T=example_ids, has_loss_T=has_loss)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        dropless: bool = False,
        cache=None,
    ) -> CausalLMOutput:
        """input_ids [B, S]; position_ids [B, S] restart at 0 at each packed example;
        labels [B, S] aligned with input_ids (-100 = no loss); attention_mask [B, S] (0 = padding);
        dropless: route without capacity limits whatever model.capacity_factor says (inference);
        cache: a floe.generate.KVCache; input_ids then continue the cached tokens, position_ids are
        required, and attention_mask (None = all real) marks this chunk's padding."""
        b, s = input_ids.shape
        if cache is not None:
            assert position_ids is not None, "generation with a cache passes explicit position_ids"
            attn_mask = cache.append(attention_mask, s)  # (B, 1, S, cached + S): causal, padding masked
        elif position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
            attn_mask = None  # one example per row: plain causal attention
        else:  # example boundaries from the position_ids restarts, once per batch for every layer
            kind = self.packed_attention
            if kind == "auto":
                kind = "flex" if input_ids.is_cuda else "dense"
            attn_mask = packed_block_mask(position_ids) if kind == "flex" else packed_attention_mask(position_ids)
        moe_tokens = None
        if attention_mask is not None:
            # NOTE: device-to-host sync (nonzero) to size the MoE's token set.
            moe_tokens = attention_mask.reshape(-1).bool().nonzero().squeeze(1)

        token_info = self.token_info(position_ids, labels, moe_tokens)

        x = self.embed_tokens(input_ids)
        if self.neftune_alpha > 0 and self.training and torch.is_grad_enabled() and cache is None:
            x = x + neftune_noise(x, position_ids, self.neftune_alpha)
        rope = self.rotary(position_ids, x.dtype)
        stats = []
        for i, block in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layer(i)
            x, layer_stats = block(x, rope, attn_mask, moe_tokens, dropless, layer_cache, token_info)
            stats.append(layer_stats)
        logits = self.lm_head(self.norm(x))

        cfg = self.config
        balance = torch.stack([st.balance_loss for st in stats]).sum()
        aux = cfg.balance_coef * balance
        if cfg.z_loss_coef > 0:
            aux = aux + cfg.z_loss_coef * torch.stack([st.z_loss for st in stats]).sum()
        out = CausalLMOutput(logits=logits, loss=None, lm_loss=None, lm_loss_sum=None, num_loss_tokens=None,
                             aux_loss=aux, balance_loss=balance, router_stats=stats)
        if labels is not None:
            targets = shift_targets(labels, position_ids)
            loss_sum = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                       targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
            num = (targets != IGNORE_INDEX).sum()
            out.lm_loss_sum, out.num_loss_tokens = loss_sum, num
            out.lm_loss = loss_sum / num.clamp(min=1)
            out.loss = out.lm_loss + aux
        return out

