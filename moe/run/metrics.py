"""Step metrics a cluster user expects: model FLOPs utilisation, peak memory, per-expert load.

    flops = train_flops_per_token(model_cfg, seq_len)       # model FLOPs of one trained token
    peak = device_peak_flops(device)                        # per device; None when unknown
    mfu = flops * tokens_per_s / (peak * world_size)
    mem_peak_gb(device)                                     # see its docstring for what it measures
    load_cv(tokens_per_expert_LE)                           # coefficient of variation, mean over layers

No torch.distributed here: the trainer sums the counts over ranks and passes them in.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from floe.config import ModelConfig

log = logging.getLogger("floe")
GIB = 1024**3

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched against
# torch.cuda.get_device_name() in this order (first match wins: "H100 PCIe" before "H100").
# MFU is quoted against the bf16 peak whatever the run's precision, as is customary.
GPU_PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),   # SXM
    ("H200", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("V100", 125e12),   # fp16 tensor cores (no bf16)
    ("MI300X", 1307e12),
)
PEAK_ENV = "FLOE_PEAK_TFLOPS"  # overrides the table / the CPU measurement (per device, TFLOP/s)


def matmul_params(cfg: ModelConfig) -> int:
    """Weights one token multiplies through (top_k experts, router and head included;
    the embedding is a lookup and the norms are elementwise, so neither counts)."""
    _, active = cfg.num_params()
    return active - cfg.vocab_size * cfg.hidden_size - (3 * cfg.num_layers + 1) * cfg.hidden_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs to train on one token (forward + backward = 3 x forward).

    forward = 2 * matmul_params + attention scores and values: QK^T and AV cost 2 * 2 * S * d_attn
    per layer for a full S x S matrix, halved because the mask is causal (PaLM's 12 L H Q T, halved).
    So 6 * N + 6 * L * num_heads * head_dim * S. Recomputation (activation checkpointing) and
    padding do not count: model FLOPs, not hardware FLOPs.
    """
    attn = 6 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    return 6.0 * matmul_params(cfg) + attn


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_gemm_flops(dtype: torch.dtype = torch.float32, n: int = 512, seconds: float = 0.3) -> float:
    """Best FLOP/s of an n x n x n matmul on this process's CPU threads, over about `seconds`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up (thread pool, pages)
    best, deadline = 0.0, time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        a @ b
        dt = time.perf_counter() - t0
        best = max(best, 2 * n**3 / dt)
        if t0 + dt > deadline:
            return best


CEILING_SAMPLES = 3  # launches that measure the CPU GEMM ceiling before the cached best is final


def cpu_peak_flops(dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None) -> float:
    """The measured GEMM ceiling of this CPU in `dtype` at torch's current thread count, cached in
    <cache>/cpu_peak.json per (CPU model, threads, dtype, torch version). A machine busy with other
    work measures low (and mfu would read high), so the first CEILING_SAMPLES calls each measure
    again and the cache keeps the best; later calls only read it."""
    root = Path(cache_dir or os.environ.get("FLOE_CACHE") or Path.home() / ".cache" / "floe")
    path = root / "cpu_peak.json"
    key = f"{_cpu_name()}|threads={torch.get_num_threads()}|{dtype}|torch={torch.__version__}"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    entry = cached.get(key)
    if isinstance(entry, (int, float)):  # written before the cache counted its samples
        entry = {"flops": entry, "samples": 1}
    if not (isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)) and entry["flops"] > 0
            and isinstance(entry.get("samples"), int)):
        entry = {"flops": 0.0, "samples": 0}
    if entry["samples"] >= CEILING_SAMPLES:
        return float(entry["flops"])
    entry = {"flops": max(float(entry["flops"]), measure_gemm_flops(dtype)), "samples": entry["samples"] + 1}
    cached[key] = entry
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cached, indent=1))
        os.replace(tmp, path)  # atomic: ranks on one host may race
    except OSError as e:
        log.warning("could not cache the CPU GEMM ceiling in %s: %s", path, e)
    return entry["flops"]


def device_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32,
                      cache_dir: str | None = None) -> float | None:
    """Peak FLOP/s of one device: $FLOE_PEAK_TFLOPS, else the GPU table, else (CPU) the measured
    GEMM ceiling in the model's dtype; None for a GPU not in the table."""
    env = os.environ.get(PEAK_ENV)
    if env:
        try:
            return float(env) * 1e12
        except ValueError:
            raise ValueError(f"{PEAK_ENV} must be a number (TFLOP/s), got {env!r}") from None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_FLOPS:
            if key.lower() in name.lower():
                return peak
        return None
    return cpu_peak_flops(dtype, cache_dir)


def mem_peak_gb(device: torch.device) -> float:
    """Peak memory so far, in GiB. CUDA: the caching allocator's peak of allocated tensor bytes
    (torch.cuda.max_memory_allocated). CPU: the process's peak resident set size (VmHWM on
    Linux, else getrusage ru_maxrss), which also counts the interpreter, libraries and data buffers: an upper bound on
    tensor memory, read for free each step (moe/plan/tensor_memory.py's op-by-op tracker is exact for tensors
    but slows every op, so it is for the estimator's measurements, not for every step)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    try:  # Linux: VmHWM, the peak of this process image (ru_maxrss survives exec: a worker started by a
        # large process, e.g. pytest or a launcher, would report its parent's peak)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024) / GIB  # bytes on macOS, KiB on Linux


def load_cv(tokens_per_expert_LE) -> float:
    """Coefficient of variation (population std / mean) of the tokens per expert, per layer,
    averaged over layers: 0 under perfectly even load, sqrt(E - 1) when one expert takes all."""
    counts = torch.as_tensor(tokens_per_expert_LE, dtype=torch.float64)
    assert counts.dim() == 2, counts.shape
    mean = counts.mean(dim=1)
    std = counts.std(dim=1, correction=0)
    return float(torch.where(mean > 0, std / mean.clamp(min=1e-12), torch.zeros_like(mean)).mean())
