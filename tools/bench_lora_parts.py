"""Benchmark the parts of a CPU LoRA step that tools/bench_step.py --lora cannot separate.

    python tools/bench_lora_parts.py                    # bench_step's shape: 4096 routed rows, hidden 256
    python tools/bench_lora_parts.py --rows 8192 --repeats 50

One torch thread, medians of --repeats calls after a warm-up, on the host:
  grouped products  kernels.reference.grouped_mm at 16 and 128 groups (equal groups): the rank-r
                    adapter products (A: [rows, hidden] -> 2r, B: [rows, r] -> expert_ffn) against
                    the base product they sit beside ([rows, hidden] -> expert_ffn);
  dropout masks     one mask over [rows, hidden]: torch's F.dropout (bernoulli_ + scale + multiply)
                    against floe.lora.Dropout (31-bit integers against p * 2^31, one multiply; its
                    1/(1-p) goes into the adapter's scaling).
Prints one line per measurement: milliseconds per call.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, thread pool
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    from floe.kernels import reference
    from floe.lora import Dropout

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4096, help="routed rows (bench_step: 8 x 256 tokens, top-2)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--expert-ffn", type=int, default=512)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n, d, f, r = args.rows, args.hidden, args.expert_ffn, args.rank
    x, xa = torch.randn(n, d), torch.randn(n, r)
    print(f"torch {torch.__version__}, 1 thread, {n} rows, hidden {d}, expert_ffn {f}, rank {r}")
    for groups in (16, 128):
        sizes = torch.full((groups,), n // groups)
        sizes[-1] += n - int(sizes.sum())
        shapes = {f"A product [{n}, {d}] -> {2 * r}": (x, torch.randn(groups, 2 * r, d)),
                  f"B product [{n}, {r}] -> {f}": (xa, torch.randn(groups, f, r)),
                  f"base product [{n}, {d}] -> {f}": (x, torch.randn(groups, f, d))}
        for name, (inp, w) in shapes.items():
            ms = median_ms(lambda inp=inp, w=w, s=sizes: reference.grouped_mm(inp, w.transpose(1, 2), s), args.repeats)
            print(f"{groups:4d} groups  {name:32s} {ms:8.2f} ms")
    drop = Dropout(args.dropout).train()
    print(f"dropout p={args.dropout} over [{n}, {d}]: F.dropout "
          f"{median_ms(lambda: F.dropout(x, args.dropout, True), args.repeats):.2f} ms, floe.lora.Dropout "
          f"{median_ms(lambda: drop(x), args.repeats):.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
