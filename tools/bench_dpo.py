"""Benchmark: a DPO step against an SFT step of the same rows (time and peak memory), one process.

    python tools/bench_dpo.py                              # tiny model, 16 rows of 256 tokens, 8 steps each
    python tools/bench_dpo.py --set model.hidden_size=128 --set model.dense_ffn=128 --set model.expert_ffn=128 \
        --set model.num_layers=4                           # learn_cpu's model

Both runs go through launch/train.py's config composition and floe.run.entry.train on the same
packed preference rows (tools/synthetic_pairs.py pairs, both sequences of a pair side by side in a
row): `dpo` is train.objective=dpo (forward, per-sequence log-probs, preference loss + aux loss,
backward, update; the reference pass before step 1 is timed apart), `sft` is the LM loss on the
same rows' answer tokens (the Trainer's SFT step). Each run is a fresh process (peak RSS is per
process); the runs alternate --repeats times and medians of steps 2.. are reported, so the
machine's load hits both alike. Goal (issue 20): dpo <= 2.2x sft time, no second model in memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(objective: str, pairs: str, run_dir: str, args) -> dict:
    """One run in this process; returns its per-step times, peak memory and reference-pass time."""
    import time

    from hydra import compose, initialize_config_dir

    from floe.parallel import read_launch_env
    from floe.run import entry
    from launch.train import CONF_DIR, parse_config

    overrides = [f"run.dir={run_dir}", "run.name=bench", "log.wandb=disabled", f"model={args.model}",
                 "data=preference", f"data.paths=[{pairs}]", f"data.seq_len={args.seq_len}",
                 f"data.cache_dir={os.path.dirname(pairs)}/cache", "train.objective=dpo",
                 f"train.max_steps={args.steps}", f"train.global_batch_size={args.rows}",
                 f"train.micro_batch_size={args.rows}", "train.save_every=0", *args.set]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("config", overrides=overrides)
    launch = read_launch_env()
    configs = parse_config(cfg, launch)
    # The SFT step on the same preference rows: parse_config pairs data=preference with dpo, so the
    # objective is switched here, after the checks (only this benchmark trains SFT on pair rows).
    configs = dataclasses.replace(configs, train=dataclasses.replace(configs.train, objective=objective))
    t0 = time.perf_counter()
    entry.train(configs, {}, launch)
    total = time.perf_counter() - t0
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    times = [r["step_time_s"] for r in records]
    return {"step_s": statistics.median(times[1:]), "mem_peak_gb": records[-1]["mem_peak_gb"],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records[1:]),
            "outside_steps_s": total - sum(times)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rows", type=int, default=16, help="rows per step (one micro-batch)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--set", action="append", default=[], help="another config override, e.g. model.hidden_size=128")
    p.add_argument("--child", choices=("sft", "dpo"), help=argparse.SUPPRESS)
    p.add_argument("--pairs", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.pairs, args.run_dir, args)))
        return 0
    from tools.synthetic_pairs import main as make_pairs

    with tempfile.TemporaryDirectory() as tmp:
        pairs = os.path.join(tmp, "pairs.jsonl")
        make_pairs(["--num", str(args.rows * args.steps * 2), "--out", pairs])
        results = {"sft": [], "dpo": []}
        for rep in range(args.repeats):
            for objective in ("sft", "dpo"):
                cmd = [sys.executable, os.path.abspath(__file__), "--child", objective, "--pairs", pairs,
                       "--run-dir", os.path.join(tmp, f"{objective}{rep}"), "--model", args.model,
                       "--seq-len", str(args.seq_len), "--rows", str(args.rows), "--steps", str(args.steps),
                       *[f"--set={o}" for o in args.set]]
                proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return 1
                results[objective].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    summary = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in results.items()}
    summary["dpo_over_sft_time"] = round(summary["dpo"]["step_s"] / summary["sft"]["step_s"], 3)
    summary["dpo_over_sft_mem"] = round(summary["dpo"]["mem_peak_gb"] / summary["sft"]["mem_peak_gb"], 3)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
