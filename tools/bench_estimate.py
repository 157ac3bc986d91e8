"""The estimator against real training on the CPU: estimated vs measured peak memory per rank.

    python tools/bench_estimate.py                      # the validation table in BENCHMARKS.md
    python tools/bench_estimate.py --only tiny-ep2-z2   # one row

Each row trains real steps with launch/train.py's train() (1 or 2 gloo processes) inside a
PeakMemoryTracker (moe/plan/tensor_memory.py) entered before the model is built, so it counts weights,
DeepSpeed's buffers, optimizer state and activations alike; the estimate is tools/estimate.py
for the same overrides with train.device=cpu and +routing=balanced (real routing at
initialisation is close to uniform; "worst" is the memory plan's default).
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COMMON = ["train.device=cpu", "train.max_steps=2", "log.wandb=disabled", "parallel.reduce_bucket_size=1000000",
          "parallel.allgather_bucket_size=1000000"]
TINY = ["model=tiny", "train.global_batch_size=8", "train.micro_batch_size=8", "data.seq_len=256",
        "data.num_examples=200"]
# small at full width, 4 of its 12 layers and 128-token rows: fp32 states of the full 0.74B model
# (~12 GB per process) would not fit a shared 24 GiB CPU machine
SMALL = ["model=small", "model.num_layers=4", "train.global_batch_size=2", "train.micro_batch_size=2", "data.seq_len=128",
         "data.num_examples=100"]
CASES = {
    "tiny-ep1-z0": (1, TINY + ["parallel.ep_size=1", "parallel.zero_stage=0"]),
    "tiny-ep1-z2": (1, TINY + ["parallel.ep_size=1", "parallel.zero_stage=2"]),
    "tiny-ep2-z0": (2, TINY + ["parallel.ep_size=2", "parallel.zero_stage=0", "train.global_batch_size=16"]),
    "tiny-ep2-z2": (2, TINY + ["parallel.ep_size=2", "parallel.zero_stage=2", "train.global_batch_size=16"]),
    "tiny-ep1-z0-full": (1, TINY + ["parallel.ep_size=1", "parallel.zero_stage=0",
                                    "train.activation_checkpointing=full"]),
    "tiny-ep2-z2-full": (2, TINY + ["parallel.ep_size=2", "parallel.zero_stage=2", "train.global_batch_size=16",
                                    "train.activation_checkpointing=full"]),
    "small-ep1-z2": (1, SMALL + ["parallel.ep_size=1", "parallel.zero_stage=2"]),
    "small-ep2-z2": (2, SMALL + ["parallel.ep_size=2", "parallel.zero_stage=2", "train.global_batch_size=4"]),
}


def estimate_gb(overrides: list[str], world_size: int) -> float:
    from floe.plan.memory_plan import estimate
    from tools.estimate import build_spec, compose

    return estimate(build_spec(compose([*overrides, f"+world_size={world_size}", "+routing=balanced"]))).total_gb


def main(argv=None) -> int:
    from tools.estimate import measure_training_peak

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", choices=sorted(CASES), help="rows to run (default: all)")
    args = p.parse_args(argv)
    print(f"| case | procs | estimate GiB | measured GiB | estimate / measured |\n|---|---|---|---|---|")
    for name in args.only or CASES:
        procs, overrides = CASES[name]
        overrides = COMMON + overrides
        est = estimate_gb(overrides, procs)
        real = measure_training_peak(overrides, procs)
        print(f"| {name} | {procs} | {est:.4f} | {real:.4f} | {est / real:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
