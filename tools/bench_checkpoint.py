"""Time floe's checkpoint save and load (moe/run/checkpoint.py) and measure its size, on one process.

    python tools/bench_checkpoint.py                       # model=small, ZeRO-0
    python tools/bench_checkpoint.py model=tiny parallel.zero_stage=2

Builds the engine as training does, takes one optimizer step on a random batch (so the Adam state
exists), then saves a checkpoint and loads it back into the same engine, `--repeat` times each.
Prints one JSON line: parameters, bytes on disk (model/ and optim/), save and load seconds (median).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(argv: list[str]) -> dict:
    repeat = 3
    if argv and argv[0].startswith("--repeat="):
        repeat, argv = int(argv[0].split("=", 1)[1]), argv[1:]
    from hydra import compose, initialize_config_dir

    from launch.train import CONF_DIR, parse_config
    from floe.run import checkpoint
    from floe.model import ArcticForCausalLM
    from floe.parallel import build_engine, init_distributed, teardown

    work = tempfile.mkdtemp(prefix="floe-bench-ckpt-")
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("config", overrides=[f"run.dir={work}", "model=small", "train.global_batch_size=1",
                                           "train.micro_batch_size=1", "log.wandb=disabled", *argv])
    c = parse_config(cfg)
    init_distributed(torch.device("cpu"))
    try:
        with torch.device("meta"):
            model = ArcticForCausalLM(c.model)
        engine = build_engine(model, c.parallel, c.optim, seed=0, device=torch.device("cpu"), global_batch_size=1,
                              micro_batch_size=1, total_steps=10)
        ids = torch.randint(0, c.model.vocab_size, (1, 32))
        out = engine(input_ids=ids, labels=ids)
        engine.backward(out.loss)
        engine.step()
        ckpt_dir = os.path.join(work, "checkpoints")
        saves, loads = [], []
        for i in range(repeat):
            t0 = time.perf_counter()
            path = checkpoint.save(engine, ckpt_dir, 1 + i, {"step": 1 + i}, keep_last=1)
            saves.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            checkpoint.load(engine, path)
            loads.append(time.perf_counter() - t0)
        result = {"overrides": argv, "params": sum(p.numel() for p in model.parameters()),
                  "zero_stage": c.parallel.zero_stage, "model_bytes": _du(os.path.join(path, "model")),
                  "optim_bytes": _du(os.path.join(path, "optim")), "total_bytes": _du(path),
                  "save_s": statistics.median(saves), "load_s": statistics.median(loads),
                  "save_all_s": saves, "load_all_s": loads, "load_avg_1min": os.getloadavg()[0]}
    finally:
        teardown()
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
