"""The host (CPU) allocator setting of a training process: `train.host_allocator`.

glibc serves an allocation above its mmap threshold (128 KiB, adapting up to 32 MiB) with a
fresh mmap and unmaps it on free. A training step on a CPU allocates and frees the same large
tensors every step (one [128, 512, 256] fp32 expert gradient is 64 MiB), so with the system
setting every step faults in every page of them again: about 200k minor page faults per step at
tools/bench_step.py's 128-expert shape, a quarter of the step. `retain` makes glibc serve every
allocation from its heap and keep freed memory for the next step (no page fault after the first
step); the price is a resident set that stays at the run's peak (about +10% there).
"""
from __future__ import annotations

import ctypes

HOST_ALLOCATORS = ("auto", "retain", "system")  # auto: retain when training on the CPU, else system

# glibc's mallopt parameters (malloc.h); both values below are documented in mallopt(3).
_M_TRIM_THRESHOLD = -1  # -1: never give freed heap memory back to the kernel
_M_MMAP_MAX = -4  # 0: never serve an allocation with its own mmap


def resolve(choice: str, device_type: str) -> str:
    """`retain` or `system` for `train.host_allocator=choice` (checked by TrainConfig) on a
    `device_type` run."""
    if choice == "auto":
        return "retain" if device_type == "cpu" else "system"
    return choice


def retain_freed_memory() -> bool:
    """From now on, for the whole process: every allocation comes from the heap and freed memory
    stays there for reuse. False (nothing changed) where the C library has no glibc mallopt."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))


def configure(choice: str, device_type: str) -> str:
    """Apply `train.host_allocator`; returns what the process now runs with, for the log."""
    if resolve(choice, device_type) == "system":
        return "system"
    if retain_freed_memory():
        return "retain"
    return "system (this C library has no glibc mallopt)"
