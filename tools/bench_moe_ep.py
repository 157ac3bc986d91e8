"""Benchmark: expert-parallel forward+backward of floe's MoE against DeepSpeed's MoE, same shapes.

    torchrun --standalone --nproc_per_node=2 tools/bench_moe_ep.py            # ep_size = world size
    python tools/bench_moe_ep.py --procs 2                                     # spawns the ranks itself
    python tools/bench_moe_ep.py --procs 2 --tokens 2048 8192 --experts 64 --threads 1

Each rank routes its own `tokens` rows. floe: MoELayer with its experts sharded and
the all-to-all dispatcher installed by floe.parallel.apply_expert_parallel (uneven all-to-all of
the kept rows only). DeepSpeed: deepspeed.moe.layer.MoE
with the same ep_size (dense [E, capacity, D] dispatch, all-to-all of the padded buffer).
Both hold the same weights, route deterministically (no RTS, no sampled 2nd expert) and drop
first-come (floe drop_policy=position), as tools/bench_moe.py does on one process. Reported:
median time per forward+backward on rank 0 and tokens/s over all ranks. Also times floe with
the dispatch waited for in start() (async_dispatch=False) against in finish().
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
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class SwiGLU(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.w1, self.w3 = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.w2 = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def build(args, groups):
    from deepspeed.moe.layer import MoE

    from floe.config import ModelConfig
    import copy

    from floe.layer import EXPERT_WEIGHTS, MoELayer
    from floe.parallel import apply_expert_parallel

    cfg = ModelConfig(vocab_size=32, hidden_size=args.hidden, num_layers=1, num_heads=2, num_kv_heads=2,
                      dense_ffn=args.hidden, expert_ffn=args.expert_ffn, num_experts=args.experts,
                      top_k=args.top_k, capacity_factor=args.capacity_factor, drop_policy="position")
    torch.manual_seed(0)  # the same full layer on every rank; each keeps its shard
    full = MoELayer(cfg)
    ours = {mode: apply_expert_parallel(copy.deepcopy(full), groups, async_dispatch=mode) for mode in (True, False)}
    theirs = MoE(args.hidden, SwiGLU(args.hidden, args.expert_ffn), num_experts=args.experts, ep_size=groups.ep_size,
                 k=args.top_k, capacity_factor=args.capacity_factor, eval_capacity_factor=args.capacity_factor,
                 min_capacity=0, use_rts=False, drop_tokens=True, top2_2nd_expert_sampling=False)
    theirs.set_deepspeed_parallelism()
    lo = ours[True].experts.first_expert
    with torch.no_grad():
        theirs.deepspeed_moe.gate.wg.weight.copy_(full.gate.weight)
        for i, expert in enumerate(theirs.deepspeed_moe.experts.deepspeed_experts):
            for w in EXPERT_WEIGHTS:
                getattr(expert, w).weight.copy_(getattr(full.experts, w)[lo + i])
    return ours, theirs


def fwd_bwd(fn, x, grad_out):
    x = x.detach().requires_grad_()
    dist.barrier()
    t0 = time.perf_counter()
    fn(x).backward(grad_out)
    dist.barrier()
    return time.perf_counter() - t0


def run(args):
    from floe.parallel import build_parallel_groups, init_distributed

    if args.threads:
        torch.set_num_threads(args.threads)
    init_distributed(torch.device("cpu"))
    world = dist.get_world_size()
    groups = build_parallel_groups(world)
    ours, theirs = build(args, groups)
    rank = dist.get_rank()
    rows = []
    for tokens in args.tokens:
        g = torch.Generator().manual_seed(100 + rank)
        x, grad_out = torch.randn(tokens, args.hidden, generator=g), torch.randn(tokens, args.hidden, generator=g)
        fns = {"floe": lambda t: ours[True](t)[0], "floe_blocking": lambda t: ours[False](t)[0],
               "deepspeed": lambda t: theirs(t)[0]}
        with torch.no_grad():
            same = (fns["floe"](x) - fns["deepspeed"](x)).abs().amax(dim=1) < 1e-4
        times = {k: [] for k in fns}
        for _ in range(2):
            for fn in fns.values():
                fwd_bwd(fn, x, grad_out)
        for _ in range(args.repeats):
            for k, fn in fns.items():  # interleaved, so drift hits all three alike
                times[k].append(fwd_bwd(fn, x, grad_out))
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"tokens_per_rank": tokens, "ranks": world, "ep_size": groups.ep_size,
               **{f"{k}_ms": v * 1e3 for k, v in med.items()},
               **{f"{k}_tokens_per_s": tokens * world / v for k, v in med.items()},
               "speedup_vs_deepspeed": med["deepspeed"] / med["floe"],
               "same_outputs_frac_rank0": float(same.float().mean())}
        rows.append(row)
        if rank == 0:
            print(f"tokens/rank {tokens:6d}: floe {row['floe_ms']:8.1f} ms ({row['floe_tokens_per_s']:9.0f} tok/s)  "
                  f"floe blocking {row['floe_blocking_ms']:8.1f} ms  deepspeed {row['deepspeed_ms']:8.1f} ms "
                  f"({row['deepspeed_tokens_per_s']:9.0f} tok/s)  speedup {row['speedup_vs_deepspeed']:.2f}x  "
                  f"same outputs on {100 * row['same_outputs_frac_rank0']:.1f}% of rank-0 tokens", flush=True)
    if rank == 0:
        print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "results": rows}))
    dist.destroy_process_group()


def _spawned(rank, world, port, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    run(args)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=int, default=2, help="ranks to spawn when not under torchrun")
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192], help="tokens routed by each rank")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--expert-ffn", type=int, default=512)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank")
    args = p.parse_args()
    if "RANK" in os.environ:
        run(args)
        return
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(args.procs, port, args), nprocs=args.procs)


if __name__ == "__main__":
    main()
