"""What the environment says about running Triton, readable without importing Triton (triton.jit
decides at decoration time whether it interprets, so the kernels module asks this at import)."""
from __future__ import annotations

import os


def interpreter_enabled() -> bool:
    """Whether TRITON_INTERPRET is set (Triton then runs kernels on CPU tensors); reads the
    environment only, so callers need not import Triton to ask."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
