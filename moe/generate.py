"""Batched text generation with a KV cache: greedy or temperature / top-p sampling.

    ids = generate(model, [prompt_ids, ...], max_new_tokens=64, stop=tok.im_end)

Prompts of different lengths are left-padded (a padded batch, left- or right-padded, is
re-aligned first): every row then writes its next token at the same cache slot, and padding is
masked out of attention and kept out of the MoE. The prompt is run once (prefill); each new
token then runs alone against the cached keys and values, so the work per token does not grow
with the prompt apart from attention's read of the cache. The MoE routes dropless, so a token's
output never depends on the other rows of the batch.

Shape legend: B batch, S tokens in this forward, P cached tokens, L cache capacity,
G kv heads, Dh head dim, V vocab.
"""
from __future__ import annotations

import torch

from floe.config import ModelConfig


class KVCache:
    """Keys and values of every layer for a batch, preallocated to `max_len` tokens per row."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, config.num_kv_heads, max_len, config.head_dim)  # (B, G, L, Dh)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.key_valid_BL = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.max_len, self.start, self.end = max_len, 0, 0  # this forward writes slots [start, end)

    def append(self, attention_mask_BS: torch.Tensor | None, s: int) -> torch.Tensor:
        """Reserve the next `s` slots; the attention mask (B, 1, S, P + S) of the chunk."""
        if self.end + s > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {self.end} cached + {s} new do not fit")
        self.start, self.end = self.end, self.end + s
        valid = True if attention_mask_BS is None else attention_mask_BS.bool()
        self.key_valid_BL[:, self.start:self.end] = valid
        q_pos = torch.arange(self.start, self.end, device=self.key_valid_BL.device)[:, None]  # (S, 1)
        k_pos = torch.arange(self.end, device=self.key_valid_BL.device)[None, :]  # (1, P + S)
        allowed = (k_pos <= q_pos) & self.key_valid_BL[:, None, :self.end]  # (B, S, P + S)
        allowed |= k_pos == q_pos  # a padding query sees itself: no all-masked row (NaN in SDPA)
        return allowed[:, None]

    def layer(self, i: int) -> "_LayerCache":
        return _LayerCache(self, i)


class _LayerCache:
    def __init__(self, cache: KVCache, i: int):
        self.cache, self.i = cache, i

    def update(self, k_BGSD: torch.Tensor, v_BGSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this chunk's keys and values; return all of them so far, (B, G, P + S, Dh)."""
        c = self.cache
        c.k[self.i][:, :, c.start:c.end] = k_BGSD
        c.v[self.i][:, :, c.start:c.end] = v_BGSD
        return c.k[self.i][:, :, :c.end], c.v[self.i][:, :, :c.end]


def left_align(input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the right end (left padding); they must be contiguous."""
    mask = attention_mask_BS.bool()
    lengths = mask.sum(1)
    first = mask.long().argmax(1)
    s = mask.shape[1]
    # NOTE: device-to-host sync: a malformed mask is a caller error, checked once per call.
    contiguous = mask.long().cumsum(1).gather(1, (first + lengths - 1).clamp(min=0)[:, None]).squeeze(1) == lengths
    if not bool((contiguous & (lengths > 0)).all()):
        raise ValueError("attention_mask: each row needs real tokens, contiguous (left or right padding)")
    shift = s - (first + lengths)  # how far each row moves right
    cols = (torch.arange(s, device=mask.device)[None, :] - shift[:, None]) % s  # (B, S) source column
    return input_ids_BS.gather(1, cols), mask.gather(1, cols)


def pad_left(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (B, S), for prompts of different lengths."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    s = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), s), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), s, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, s - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, s - len(p):] = 1
    return ids.to(device), mask.to(device)


def next_token(logits_BV: torch.Tensor, temperature: float, top_p: float,
               generator: torch.Generator | None) -> torch.Tensor:
    """Greedy at temperature 0, else a sample from the smallest top set of mass >= top_p; (B,)."""
    if temperature == 0:
        return logits_BV.argmax(-1)
    probs = torch.softmax(logits_BV.float() / temperature, dim=-1)
    sorted_p, order = probs.sort(-1, descending=True)
    if top_p < 1:  # (at 1 a rounded cumsum could cut the tail)
        mass_before = sorted_p.cumsum(-1) - sorted_p
        sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)  # the first token is always kept
    pick = torch.multinomial(sorted_p, 1, generator=generator)  # normalises the kept mass itself
    return order.gather(-1, pick).squeeze(-1)


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    errors = []
    if max_new_tokens < 1:
        errors.append(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        errors.append(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        errors.append(f"top_p must be in (0, 1], got {top_p}")
    if errors:
        raise ValueError("generate: " + "; ".join(errors))


@torch.inference_mode()
def generate(model, prompts: list[list[int]] | torch.Tensor, max_new_tokens: int, *,
             attention_mask: torch.Tensor | None = None, stop: list[int] | None = None, pad_id: int = 0,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> list[list[int]]:
    """New tokens per prompt, up to and excluding `stop` (a token sequence, e.g. <|im_end|>'s ids).

    prompts: lists of ids, or input_ids (B, S) with attention_mask (B, S) padded on either side.
    temperature 0 is greedy; otherwise sampling from a torch.Generator seeded with `seed`.
    """
    _check_sampling(max_new_tokens, temperature, top_p)
    device = next(model.parameters()).device
    if isinstance(prompts, torch.Tensor):
        mask = torch.ones_like(prompts) if attention_mask is None else attention_mask
        input_ids, mask = left_align(prompts.to(device), mask.to(device))
    else:
        input_ids, mask = pad_left(prompts, pad_id, device)
    b, s = input_ids.shape
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(0 if seed is None else seed)
    cache = KVCache(model.config, b, s + max_new_tokens, device, next(model.parameters()).dtype)
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)  # (B, S)
    logits = model(input_ids, position_ids=positions, attention_mask=mask, dropless=True, cache=cache).logits
    next_pos = positions[:, -1:] + 1  # (B, 1)
    stop_t = torch.tensor(stop or [], dtype=torch.long, device=device)
    out = torch.empty(b, 0, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        token = next_token(logits[:, -1], temperature, top_p, generator)
        out = torch.cat([out, token[:, None]], dim=1)
        if len(stop_t) and out.shape[1] >= len(stop_t):
            done |= (out[:, -len(stop_t):] == stop_t).all(1)
        # NOTE: device-to-host sync, once per token: stop when every row has met `stop`.
        if bool(done.all()) or out.shape[1] == max_new_tokens:
            break
        logits = model(token[:, None], position_ids=next_pos, dropless=True, cache=cache).logits
        next_pos = next_pos + 1
    return [_cut(row, stop or []) for row in out.tolist()]


def _cut(row: list[int], stop: list[int]) -> list[int]:
    """`row` up to the first occurrence of `stop` (all of it when `stop` is empty or absent)."""
    n = len(stop)
    for i in range(len(row) - n + 1 if n else 0):
        if row[i:i + n] == stop:
            return row[:i]
    return row
