"""Which frozen projections a fine-tune touches (lora.targets): the one list LoRA adapts and the
quantized base (lora.quantize_base) stores quantized. A model room of its own, so that floe.lora and
floe.quantize both read it and neither imports the other's internals."""
from __future__ import annotations

import torch.nn as nn

# lora.targets: which projections get adapters. The module names each one adapts (model.py, layer.py):
LORA_TARGETS = {
    "attention": ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj"),
    "dense_mlp": ("mlp.w1", "mlp.w3", "mlp.w2"),
    "experts": ("moe.experts",),  # w1, w3 and w2 of every expert
}


def target_modules(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Module]]:
    """(name, module) of every projection `targets` (lora.targets) names: nn.Linear or GroupedExperts."""
    suffixes = tuple("." + s for t in targets for s in LORA_TARGETS[t])
    return [(name, m) for name, m in model.named_modules() if ("." + name).endswith(suffixes)]
