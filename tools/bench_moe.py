"""Benchmark: forward+backward of floe's MoELayer against DeepSpeed's MoE layer, same shape.

    python tools/bench_moe.py                       # 128 experts, top-2, cf 1.25, D=256, F=512
    python tools/bench_moe.py --tokens 4096 16384 --repeats 7

Both layers get the same weights and inputs; DeepSpeed runs deterministically (no random
token selection, no sampled second expert), so both route identically and drop first-come
(floe's drop_policy=position). Runs alternate (ours, theirs, ours, ...) in one process and
the medians are reported, with achieved GFLOP/s against a large fp32 matmul measured in the
same run. FLOPs counted: 3 expert GEMMs of 2*D*F per kept assignment, x3 for forward+backward.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn as nn
import torch.nn.functional as F


class SwiGLU(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False), nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def init_single_process_group():
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
        dist.init_process_group("gloo")
    import deepspeed

    from floe.parallel.lifecycle import skip_shm_comm_build

    skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeed's comm layer wraps the torch group


def build_pair(d, f, num_experts, top_k, capacity_factor):
    """floe's MoELayer and DeepSpeed's MoE holding the same weights."""
    from deepspeed.moe.layer import MoE

    from floe.config import ModelConfig
    from floe.layer import EXPERT_WEIGHTS, MoELayer

    cfg = ModelConfig(vocab_size=32, hidden_size=d, num_layers=1, num_heads=2, num_kv_heads=2, dense_ffn=d,
                      expert_ffn=f, num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor,
                      drop_policy="position")
    ours = MoELayer(cfg)
    theirs = MoE(d, SwiGLU(d, f), num_experts=num_experts, ep_size=1, k=top_k, capacity_factor=capacity_factor,
                 eval_capacity_factor=capacity_factor, min_capacity=0, use_rts=False, drop_tokens=True,
                 top2_2nd_expert_sampling=False)
    theirs.set_deepspeed_parallelism()
    with torch.no_grad():
        theirs.deepspeed_moe.gate.wg.weight.copy_(ours.gate.weight)
        for e, expert in enumerate(theirs.deepspeed_moe.experts.deepspeed_experts):
            for w in EXPERT_WEIGHTS:
                getattr(expert, w).weight.copy_(getattr(ours.experts, w)[e])
    return ours, theirs


def time_fwd_bwd(fn, module, x, grad_out):
    module.zero_grad(set_to_none=True)  # as an optimizer step leaves them: no accumulation
    x = x.detach().requires_grad_()
    t0 = time.perf_counter()
    y = fn(x)
    y.backward(grad_out)
    return time.perf_counter() - t0


def matmul_gflops(n=2048, repeats=15):
    """The machine's fp32 GEMM ceiling: the fastest of `repeats` large products (a ceiling, so
    the best run, not the median: one-off slowdowns from other processes must not lower it)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--expert-ffn", type=int, default=512)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    init_single_process_group()
    torch.manual_seed(0)
    ours, theirs = build_pair(args.hidden, args.expert_ffn, args.experts, args.top_k, args.capacity_factor)
    peak = matmul_gflops()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 matmul 2048^3: {peak:.1f} GFLOP/s")
    results = []
    for num_tokens in args.tokens:
        x = torch.randn(num_tokens, args.hidden)
        grad_out = torch.randn(num_tokens, args.hidden)
        # Same routing, same outputs: check before timing (differences only where DeepSpeed
        # renormalises the weight of a token that lost one of its two choices to capacity).
        with torch.no_grad():
            y_ours, stats = ours(x)
            y_theirs = theirs(x)[0]
        kept = int(stats.tokens_per_expert.sum())
        both_kept = (y_ours - y_theirs).abs().amax(dim=1) < 1e-4
        run_ours = lambda t: ours(t)[0]  # noqa: E731
        run_theirs = lambda t: theirs(t)[0]  # noqa: E731
        for _ in range(2):  # warm-up
            time_fwd_bwd(run_ours, ours, x, grad_out)
            time_fwd_bwd(run_theirs, theirs, x, grad_out)
        t_ours, t_theirs = [], []
        for _ in range(args.repeats):
            t_ours.append(time_fwd_bwd(run_ours, ours, x, grad_out))
            t_theirs.append(time_fwd_bwd(run_theirs, theirs, x, grad_out))
        m_ours, m_theirs = statistics.median(t_ours), statistics.median(t_theirs)
        flops = kept * 3 * 2 * args.hidden * args.expert_ffn * 3
        row = {
            "tokens": num_tokens, "kept_assignments": kept, "identical_token_outputs": float(both_kept.float().mean()),
            "floe_ms": m_ours * 1e3, "deepspeed_ms": m_theirs * 1e3, "speedup": m_theirs / m_ours,
            "floe_gflops": flops / m_ours / 1e9, "deepspeed_gflops": flops / m_theirs / 1e9,
            "floe_share_of_matmul": flops / m_ours / 1e9 / peak,
        }
        results.append(row)
        print(f"tokens {num_tokens:6d}: floe {row['floe_ms']:8.1f} ms  deepspeed {row['deepspeed_ms']:8.1f} ms  "
              f"speedup {row['speedup']:.2f}x  floe {row['floe_gflops']:.1f} GFLOP/s "
              f"({100 * row['floe_share_of_matmul']:.0f}% of matmul)  same outputs on "
              f"{100 * row['identical_token_outputs']:.1f}% of tokens")
    print(json.dumps({"matmul_gflops": peak, "results": results}))


if __name__ == "__main__":
    main()
