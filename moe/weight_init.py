"""Keyed weight initialisation: each tensor draws from a generator seeded by its own key.

The values then depend on (seed, name, global expert id) only, never on the order of
initialisation or on which experts a rank holds, so a model built on the meta device,
sharded for expert parallelism and materialised holds exactly the rows the 1-process
model holds.
"""
from __future__ import annotations

import hashlib
import math

import torch

from floe.config import ModelConfig


def _keyed_generator(device: torch.device, key: tuple) -> torch.Generator:
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def seeded_normal_(t: torch.Tensor, std: float, *key) -> None:
    """Fill t from N(0, std^2) with a generator seeded by `key` alone."""
    t.normal_(0.0, std, generator=_keyed_generator(t.device, key))


def seeded_uniform_(t: torch.Tensor, bound: float, *key) -> None:
    """Fill t from U(-bound, bound) with a generator seeded by `key` alone."""
    t.uniform_(-bound, bound, generator=_keyed_generator(t.device, key))


def init_stds(config: ModelConfig) -> tuple[float, float]:
    """(std, out_std): out_std for residual-branch outputs (o_proj, w2), which shrink with depth
    as in GPT-2 because each block adds three of them."""
    return config.init_std, config.init_std / math.sqrt(2 * config.num_layers)


def draw_seed() -> int:
    """A seed from torch's global RNG, for callers that pass none."""
    return int(torch.randint(0, 2**62, (1,), device="cpu"))
