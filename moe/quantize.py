"""A quantized frozen base (lora.quantize_base): frozen weights stored as int8 or NF4, dequantized per
layer on the fly.

    apply_quantize_base(model, kind, targets)   after weights are loaded and experts sharded, before
                                                the engine: each targeted frozen weight becomes a
                                                QuantizedWeight child (integer buffers only)
    forward of a quantized module               a pre-hook dequantizes its weights into plain tensors
                                                under their usual names, in the input's dtype; the
                                                post-hook drops them
    backward                                    the model-level saved-tensor hooks keep no dequantized
                                                weight between forward and backward: a saved weight is
                                                re-dequantized when backward needs it (as QLoRA does)

So a step holds the whole base quantized and, at a time, one module's dequantized weights (a layer's
local experts, w1, w3 and w2) plus the weights the running backward node is using.

Formats (the library does the quantization; floe keeps the result as plain buffers and dequantizes):
  nf4   QLoRA's NormalFloat4 through torchao's `to_nf4`: 64-element blocks, each block's absmax
        double-quantized to int8 in groups of 256 blocks (fewer when a weight has fewer blocks: the
        largest divisor of its block count up to 256), per expert of a stacked weight, so an
        expert-parallel shard is a slice of the buffers. 0.5 + 1/64 + ~4/16384 bytes per weight.
  int8  per-output-channel symmetric absmax through torchao's affine primitives: one fp32 scale per
        output row (per expert and row of a stacked weight). 1 + 4/in bytes per weight.
Every buffer is an integer tensor (fp32 scales are stored as their int32 bits), so no module-wide cast
(`.to(bfloat16)`, DeepSpeed's bf16 mode) changes them, and DeepSpeed neither broadcasts, partitions nor
optimizes them: they are buffers, not parameters.

Shape legend: E stacked experts (1 for a plain nn.Linear weight), O output rows, I input columns,
N = O * I elements per expert, NB = N / 64 blocks, NS scaler groups.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from floe.layer import EXPERT_WEIGHTS, GroupedExperts
from floe.targets import LORA_TARGETS, target_modules

QUANTIZE_BASE = ("none", "int8", "nf4")
NF4_BLOCK = 64  # elements per absmax block (QLoRA's)
NF4_SCALER_BLOCK = 256  # blocks per double-quantization group (QLoRA's)


def _torchao():
    """torchao, imported only when a base is quantized (its import logs unusable optional CUDA
    extensions at WARNING on a machine without them: floe keeps that off the console)."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    pytree = logging.getLogger("torch.utils._pytree")  # torchao 0.18 registers an Enum torch 2.13 deprecates
    level = pytree.level
    pytree.setLevel(logging.ERROR)
    try:
        import torchao.quantization as tq
        from torchao.quantization import quant_primitives
    except ImportError as e:
        raise ImportError(f"lora.quantize_base needs torchao: pip install 'torchao>=0.18,<0.19' ({e})") from None
    finally:
        pytree.setLevel(level)
    return tq, quant_primitives


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float32).contiguous().view(torch.int32)


def _float(bits: torch.Tensor) -> torch.Tensor:
    return bits.view(torch.float32)


def quantize_errors(shape: tuple[int, ...], kind: str, name: str) -> list[str]:
    """Why a weight of `shape` cannot be stored as `kind` (empty when it can)."""
    per_expert = math.prod(shape[-2:])
    if kind == "nf4" and per_expert % NF4_BLOCK:
        return [f"lora.quantize_base=nf4: {name} {tuple(shape)} has {per_expert} elements per matrix, not a "
                f"multiple of the NF4 block ({NF4_BLOCK})"]
    return []


class QuantizedWeight(nn.Module):
    """One frozen weight [E, O, I] or [O, I], stored quantized; `dequantize(dtype)` gives it back."""

    def __init__(self, weight: torch.Tensor, kind: str):
        super().__init__()
        if kind not in QUANTIZE_BASE[1:]:
            raise ValueError(f"lora.quantize_base must be one of {QUANTIZE_BASE}, got {kind!r}")
        self.kind, self.shape = kind, tuple(weight.shape)
        if kind == "nf4":
            self.scaler_block = self._nf4_scaler_block(self.shape)
        if weight.is_meta:  # shapes only (the memory plan): the buffers the real weight would get
            for key, (shape, dtype) in self._layout().items():
                self.register_buffer(key, torch.empty(shape, dtype=dtype, device="meta"))
            return
        w_EOI = weight.detach().reshape(-1, *self.shape[-2:]).to(torch.float32)  # (E, O, I)
        parts = [self._quantize_one(w_EOI[e]) for e in range(w_EOI.shape[0])]
        for key in parts[0]:
            self.register_buffer(key, torch.stack([p[key] for p in parts]))

    def _layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """{buffer: (shape, dtype)} for this weight's shape and kind (what _quantize_one stacks)."""
        num = math.prod(self.shape[:-2])
        out_features, in_features = self.shape[-2:]
        if self.kind == "int8":
            return {"codes": ((num, out_features, in_features), torch.int8), "scale": ((num, out_features), torch.int32)}
        blocks = out_features * in_features // NF4_BLOCK
        return {"codes": ((num, out_features * in_features // 2), torch.uint8), "scalers": ((num, blocks), torch.int8),
                "factor": ((num, blocks // self.scaler_block), torch.int32), "mean": ((num, 1), torch.int32),
                "levels": ((num, 16), torch.int32)}

    @staticmethod
    def _nf4_scaler_block(shape) -> int:
        return math.gcd(math.prod(shape[-2:]) // NF4_BLOCK, NF4_SCALER_BLOCK)

    def _quantize_one(self, w_OI: torch.Tensor) -> dict[str, torch.Tensor]:
        tq, qp = _torchao()
        if self.kind == "int8":
            block = (1, w_OI.shape[1])  # one scale per output row
            scale_O, zero = qp.choose_qparams_affine(w_OI, qp.MappingType.SYMMETRIC, block, torch.int8,
                                                     scale_dtype=torch.float32)
            q_OI = qp.quantize_affine(w_OI, block, scale_O, zero, torch.int8)
            return {"codes": q_OI, "scale": _bits(scale_O.reshape(-1))}
        t = tq.to_nf4(w_OI.contiguous(), NF4_BLOCK, self._nf4_scaler_block(w_OI.shape))
        return {"codes": t.quantized_data,  # (N/2,) two 4-bit codes per byte, the first in the high nibble
                "scalers": t.quantized_scalers,  # (NB,) int8: block absmax minus the mean, quantized
                "factor": _bits(t.quantization_factor),  # (NS,) fp32 per scaler group
                "mean": _bits(t.scaler_mean.reshape(1)),  # (1,) fp32 mean block absmax
                "levels": _bits(t.nf4)}  # (16,) the NF4 code book

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.shape}"

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight in `dtype`, a fresh contiguous tensor of the original shape (computed per expert in
        fp32, the library's arithmetic, then cast: transient fp32 memory is one expert's matrix)."""
        out = torch.empty(self.shape, dtype=dtype, device=self.codes.device)
        out_EOI = out.view(-1, *self.shape[-2:])
        for e in range(out_EOI.shape[0]):
            out_EOI[e].copy_(self._dequantize_one(e).view(self.shape[-2:]))
        return out

    def _dequantize_one(self, e: int) -> torch.Tensor:
        if self.kind == "int8":
            return self.codes[e].to(torch.float32) * _float(self.scale[e])[:, None]  # (O, I)
        # The block scales: int8 / per-group factor + mean, as torchao's NF4Tensor.dequantize_scalers.
        scalers_NB = (self.scalers[e].view(-1, self.scaler_block) / _float(self.factor[e])[:, None]).flatten()
        scalers_NB = scalers_NB + _float(self.mean[e])
        levels = _float(self.levels[e])
        # Both nibbles of each byte through one 256-entry table: (N/2, 2) values, then one scale per block.
        pairs = torch.stack((levels.repeat_interleave(16), levels.repeat(16)), dim=1)  # (256, 2)
        values = pairs.index_select(0, self.codes[e].to(torch.int32))  # (N/2, 2)
        return values.view(scalers_NB.numel(), -1) * scalers_NB[:, None]  # (NB, 64)


def _storage_key(t: torch.Tensor) -> int:
    """The address of t's StorageImpl: shared by every view of it, and defined under FakeTensorMode (the
    memory plan), where data_ptr() is 0 for every tensor."""
    return t.untyped_storage()._cdata


@dataclass
class _Saved:
    """A dequantized weight saved for backward, kept as the recipe to rebuild it."""

    source: QuantizedWeight
    dtype: torch.dtype
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


class _Recompute:
    """Saved-tensor hooks for a model's forward: a tensor autograd saves that is (a view of) a live
    dequantized weight is stored as its recipe and dequantized again when backward unpacks it."""

    def __init__(self):
        self.live: dict[int, tuple[QuantizedWeight, torch.Tensor]] = {}  # _storage_key -> (source, weight)
        self.contexts: list = []

    def pack(self, t: torch.Tensor):
        if t.requires_grad or t.layout != torch.strided or t.device.type == "meta":
            return t
        hit = self.live.get(_storage_key(t))
        if hit is None or hit[1].device != t.device:
            return t
        return _Saved(hit[0], t.dtype, t.size(), t.stride(), t.storage_offset())

    @staticmethod
    def unpack(saved):
        if not isinstance(saved, _Saved):
            return saved
        return saved.source.dequantize(saved.dtype).as_strided(saved.size, saved.stride, saved.offset)

    def enter(self, module, args, kwargs):
        ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        ctx.__enter__()
        self.contexts.append(ctx)

    def exit(self, module, args, kwargs, output):
        self.contexts.pop().__exit__(None, None, None)


def _owners(model: nn.Module, targets, under: str = "") -> list[tuple[str, nn.Module, tuple[str, ...]]]:
    """(module path, module owning the weights, weight names) for every targeted frozen weight whose
    path starts with `under`."""
    return [(path, module, EXPERT_WEIGHTS if isinstance(module, GroupedExperts) else ("weight",))
            for path, module in target_modules(model, targets) if path.startswith(under)]


def quantize_base_errors(model: nn.Module, kind: str, targets, under: str = "") -> list[str]:
    """Every reason `apply_quantize_base(model, kind, targets, under)` would refuse (shapes only: meta is
    fine)."""
    if kind not in QUANTIZE_BASE:
        return [f"lora.quantize_base must be one of {', '.join(QUANTIZE_BASE)}, got {kind!r}"]
    errors = [f"lora.targets: unknown target {t!r} (one of {', '.join(LORA_TARGETS)})"
              for t in targets if t not in LORA_TARGETS]
    if kind == "none" or errors:
        return errors
    for path, owner, names in _owners(model, targets, under):
        for name in names:
            p = owner._parameters.get(name)
            if p is None:
                continue  # already quantized
            if p.requires_grad:
                errors.append(f"lora.quantize_base={kind}: {path}.{name} is trainable; only frozen weights are "
                              "quantized")
            errors += quantize_errors(tuple(p.shape), kind, f"{path}.{name}")
    return errors


def quantize_config_errors(model_config, kind: str, targets) -> list[str]:
    """The shape rules of lora.quantize_base for a model config, checked on a meta model (no memory),
    before any process group exists."""
    if kind == "none" or any(t not in LORA_TARGETS for t in targets):
        return []  # LoRAConfig reports unknown targets
    from floe.model import ArcticForCausalLM

    with torch.device("meta"):
        model = ArcticForCausalLM(model_config.replace(num_layers=1))  # every layer has the same shapes
    return [e for path, owner, names in _owners(model, targets) for name in names
            for e in quantize_errors(tuple(owner._parameters[name].shape), kind, f"{path}.{name}")]


def apply_quantize_base(model: nn.Module, kind: str, targets, under: str = "") -> dict[str, QuantizedWeight]:
    """Store the frozen weights of `targets` (lora.targets) quantized as `kind`; in place. Call after the
    weights are loaded and the experts sharded (a shard quantizes only its own experts), before the
    engine. `under`: only the weights whose module path starts with it (e.g. "layers.3.": a QLoRA load
    quantizes each block as soon as it is filled). Returns {weight name: its QuantizedWeight}; {} for
    kind "none"."""
    if errors := quantize_base_errors(model, kind, targets, under):
        raise ValueError("cannot quantize the base:\n  " + "\n  ".join(errors))
    if kind == "none":
        return {}
    recompute = getattr(model, "_floe_recompute", None)
    if recompute is None:
        recompute = model._floe_recompute = _Recompute()
        model.register_forward_pre_hook(recompute.enter, with_kwargs=True)
        model.register_forward_hook(recompute.exit, with_kwargs=True, always_call=True)
    done = {}
    for path, owner, names in _owners(model, targets, under):
        names = [n for n in names if n in owner._parameters]
        for name in names:
            weight = owner._parameters.pop(name)
            done[f"{path}.{name}"] = quantized = QuantizedWeight(weight, kind)
            owner.add_module(f"{name}_quantized", quantized)
            del weight
        if names:
            _install_dequantize(owner, tuple(names), recompute)
    return done


def _install_dequantize(owner: nn.Module, names: tuple[str, ...], recompute: _Recompute) -> None:
    """During owner's forward its weights `names` exist as plain tensors in the input's dtype."""

    def before(module, args):
        dtype = args[0].dtype if args[0].is_floating_point() else torch.float32
        for name in names:
            weight = getattr(module, f"{name}_quantized").dequantize(dtype)
            module.__dict__[name] = weight
            recompute.live[_storage_key(weight)] = (getattr(module, f"{name}_quantized"), weight)

    def after(module, args, output):
        for name in names:
            weight = module.__dict__.pop(name, None)
            if weight is not None:
                recompute.live.pop(_storage_key(weight), None)

    before._floe_dequantize = after._floe_dequantize = True  # found again by dequantize_base_ (also in a copy)
    owner.register_forward_pre_hook(before)
    owner.register_forward_hook(after, always_call=True)


def quantized_weights(model: nn.Module) -> dict[str, QuantizedWeight]:
    """{weight name as the unquantized model names it: its QuantizedWeight}."""
    return {path.removesuffix("_quantized"): m for path, m in model.named_modules() if isinstance(m, QuantizedWeight)}


@torch.no_grad()
def dequantize_base_(model: nn.Module) -> nn.Module:
    """Undo apply_quantize_base: every quantized weight becomes a frozen fp32 Parameter again (holding
    the dequantized values), e.g. before a merged export. In place."""
    for path, owner in list(model.named_modules()):
        for hooks in (owner._forward_pre_hooks, owner._forward_hooks):
            for key in [k for k, fn in hooks.items() if getattr(fn, "_floe_dequantize", False)]:
                del hooks[key]
                owner._forward_hooks_always_called.pop(key, None)
        for child, quantized in list(owner.named_children()):
            if isinstance(quantized, QuantizedWeight):
                name = child.removesuffix("_quantized")
                delattr(owner, child)
                owner.register_parameter(name, nn.Parameter(quantized.dequantize(torch.float32), requires_grad=False))
    return model
