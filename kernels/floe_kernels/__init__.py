"""floe kernels: grouped GEMMs for the expert MLPs.

`grouped_mm` and `grouped_swiglu` dispatch to a backend:
  - "reference": pure PyTorch (kernels/floe_kernels/reference.py), any device; the test oracle.
  - "triton":    Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
The backend is an argument of every call, passed down from the config (`train.kernels`, which
floe.model.apply_kernel_backend hands to each experts module): "reference" or "triton" forces one;
"auto" (the default) defers to the environment variable FLOE_KERNELS=reference|triton|auto, then
picks automatically (triton for CUDA tensors when Triton is importable, reference otherwise).
There is no module-global switch: two models in one process may use different backends.
"""
from __future__ import annotations

import os

import torch

import floe.kernels.reference as reference
from floe.kernels.environment import interpreter_enabled

BACKENDS = ("reference", "triton")
CHOICES = ("auto", *BACKENDS)  # what a config or FLOE_KERNELS may say


def check_backend(name: str, where: str = "kernels backend") -> str:
    """`name` if it is one of CHOICES, else ValueError naming `where` (a config key)."""
    if name not in CHOICES:
        raise ValueError(f"{where} must be one of {CHOICES}, got {name!r}")
    return name


def resolve_backend(x: torch.Tensor, backend: str = "auto") -> str:
    """The backend a call on tensor `x` with argument `backend` will use."""
    name = check_backend(backend)
    if name == "auto":
        name = os.environ.get("FLOE_KERNELS") or "auto"
    if name == "auto":
        return "triton" if x.is_cuda and _triton_available() else "reference"
    if name not in BACKENDS:
        raise ValueError(f"FLOE_KERNELS must be one of {BACKENDS} or 'auto', got {name!r}")
    return name


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_ops():
    try:
        from floe.kernels import ops  # imported lazily: Triton is optional on CPU-only machines
    except ImportError as e:
        raise RuntimeError(
            f"kernels backend 'triton' was selected (train.kernels or FLOE_KERNELS) but Triton "
            f"cannot be imported ({e}); install triton or use FLOE_KERNELS=reference"
        ) from e
    return ops


def grouped_mm(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """x [N, K] rows sorted by group, w [G, K, M] (any strides), group_sizes [G] -> [N, M]."""
    if resolve_backend(x, backend) == "triton":
        return _triton_ops().grouped_mm(x, w, group_sizes)
    return reference.grouped_mm(x, w, group_sizes)


def grouped_swiglu(x, w1, w3, w2, group_sizes, backend: str = "auto"):
    """Expert SwiGLU; x [N, D], w1/w3 [G, F, D], w2 [G, D, F], group_sizes [G] -> [N, D]."""
    if resolve_backend(x, backend) == "triton":
        return _triton_ops().grouped_swiglu(x, w1, w3, w2, group_sizes)
    return reference.grouped_swiglu(x, w1, w3, w2, group_sizes)


__all__ = ["grouped_mm", "grouped_swiglu", "check_backend", "resolve_backend", "interpreter_enabled", "BACKENDS",
           "CHOICES"]
