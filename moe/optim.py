"""Optimizer parameter groups and the learning-rate schedule (warmup + cosine decay)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class OptimConfig:
    lr: float = 3e-3
    warmup_ratio: float = 0.05  # share of the total steps spent warming up linearly from 0
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm (dense and expert gradients together); 0 = off
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8

    def __post_init__(self):
        from floe.errors import field_type_errors

        errors = field_type_errors(self, "optim")
        typed = {f for f in ("lr", "warmup_ratio", "min_lr_ratio", "weight_decay", "grad_clip", "beta1", "beta2",
                             "eps") if not any(e.startswith(f"optim.{f} ") for e in errors)}
        checks = [  # (key, holds, what it must be); checked where the type is right
            ("lr", lambda v: v >= 0, ">= 0"),  # 0: the weights stay as loaded (e.g. to evaluate an init_from model)
            ("warmup_ratio", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
            ("weight_decay", lambda v: v >= 0, ">= 0"),
            ("grad_clip", lambda v: v >= 0, ">= 0 (0 = off)"),
            ("beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("eps", lambda v: v > 0, "> 0"),
        ]
        errors += [f"optim.{key} must be {what}, got {getattr(self, key)!r}" for key, holds, what in checks
                   if key in typed and not holds(getattr(self, key))]
        if errors:
            raise ValueError("invalid optim config:\n  " + "\n  ".join(errors))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices (and stacked experts) decay; norms and other vectors do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(groups: list[dict], optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `groups`, fused where torch has a fused kernel for `device` (CPU, CUDA).

    Fused: one kernel per tensor (or per flat ZeRO partition) updates the weights and both moments
    in place. The for-loop AdamW torch picks on a CPU allocates several temporaries the size of
    each tensor; for a stacked expert tensor ([128, 512, 256] fp32: 67 MB) those are fresh pages
    faulted in on every step, which made the optimizer slower than the model's backward.
    DeepSpeed takes it as a client optimizer at ZeRO 0, 1 and 2 (it steps the flat partitions).
    """
    fused = torch.device(device).type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                             fused=fused or None)


def lr_lambda(total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then cosine."""
    warmup = int(math.ceil(warmup_ratio * total_steps))

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn
