"""Learning comparison: full fine-tune vs LoRA vs QLoRA from one pretrained base, on the CPU.

    OMP_NUM_THREADS=1 python tools/bench_finetune.py --out runs/bench_finetune

1. base: `+experiment=learn_cpu` trained on the embedded mix WITHOUT the identity source (math, code,
   general), exported as a Hugging Face Arctic directory (tools/export.py);
2. three fine-tunes from it (`train.init_from`) on the identity source alone, same steps and data:
   full (every parameter), LoRA (`lora=default`, rank 8 on attention, dense MLP and experts) and QLoRA
   (the same with `lora.quantize_base=nf4`);
3. exact match of greedy replies to the embedded held-out questions (tools/evaluate.py's, 25 per source,
   none in training): identity is the task, math shows what the fine-tune kept.
Prints one markdown row per run: trainable parameters, wall and CPU seconds, final loss, exact match.
Runs that already finished in --out are reused (delete the directory to start over).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

VARIANTS = {  # name -> overrides of the fine-tune
    "full": [],
    "lora": ["lora=default", "lora.rank=8", "lora.alpha=16", "lora.dropout=0.0"],
    "qlora": ["lora=default", "lora.rank=8", "lora.alpha=16", "lora.dropout=0.0", "lora.quantize_base=nf4"],
    # the adapters plus the embedding and lm_head in full: the identity answers' words are tokens the base
    # never produced (its loss on them starts at ~12), which adapters on the linears alone barely reach
    "lora_embeddings": ["lora=default", "lora.rank=8", "lora.alpha=16", "lora.dropout=0.0",
                        "lora.train_embeddings=true"],
}


def _train(run_dir: str, overrides: list[str]) -> dict:
    """launch/train.py in a fresh process; (wall s, CPU s of that process)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    cmd = [sys.executable, "launch/train.py", "+experiment=learn_cpu", f"run.dir={run_dir}", "log.wandb=disabled",
           *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_s": time.perf_counter() - t0,
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def _last_metrics(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return json.loads([ln for ln in f if ln.strip()][-1])


def load_run(run_dir: str, base_dir: str):
    """The trained model of a run: a full run from its checkpoint; a LoRA run as training built it (the
    base from base_dir, adapters, the base quantized as lora.quantize_base says) plus its adapters."""
    import torch
    from omegaconf import OmegaConf

    from floe.hf import load_hf_weights
    from floe.lora import LoRAConfig, apply_lora
    from floe.model import ArcticForCausalLM
    from floe.quantize import apply_quantize_base
    from floe.run import checkpoint
    from tools.export import read_run_config
    from tools.generate import load_model_for_inference

    model_cfg, run_cfg = read_run_config(run_dir)
    lora = LoRAConfig(**run_cfg.get("lora", {}))
    if not lora.enabled:
        return load_model_for_inference(run_dir)[0]
    with torch.device("meta"):
        model = ArcticForCausalLM(model_cfg)
    load_hf_weights(model, base_dir)
    apply_lora(model, lora, seed=run_cfg["train"]["seed"])
    apply_quantize_base(model, lora.quantize_base, lora.targets)
    checkpoint.load_weights(model, checkpoint.latest_checkpoint(os.path.join(run_dir, "checkpoints")))
    return model.eval()


def score_run(run_dir: str, base_dir: str) -> dict:
    from floe.data.tokenizer import Tokenizer
    from tools.evaluate import evaluate, heldout_items, summarize

    model = load_run(run_dir, base_dir)
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    rows = evaluate(model, Tokenizer(), heldout_items(25, seed=0))
    return {"trainable_params": trainable, **summarize(rows)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_finetune")
    p.add_argument("--base-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=60, help="fine-tune steps")
    p.add_argument("--lr", type=float, default=1e-3, help="full fine-tune learning rate")
    p.add_argument("--lora-lr", type=float, default=5e-3, help="LoRA and QLoRA learning rate")
    p.add_argument("--batch", type=int, default=16, help="rows of 256 tokens per step (learn_cpu's 16)")
    p.add_argument("--only", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    batch = [f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}"]
    base, base_hf = os.path.join(out, "base"), os.path.join(out, "base_hf")
    if not os.path.isdir(base_hf):
        t = _train(base, ["data.sources=[math,code,general]", "data.weights=[0.8,0.1,0.1]",
                          f"train.max_steps={args.base_steps}", *batch])
        print(f"base: {args.base_steps} steps in {t['wall_s']:.0f} s wall, {t['cpu_s']:.0f} s CPU", flush=True)
        subprocess.run([sys.executable, "tools/export.py", base, "--out", base_hf], cwd=REPO, check=True)
    print("| run | trainable params | steps | wall s | CPU s | final loss | identity EM | math EM | overall EM |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    s = score_run(base, base_hf)
    print(f"| base, no fine-tune | - | {args.base_steps} | - | - | {_last_metrics(base)['loss']:.3f} "
          f"| {s['per_source'].get('identity', 0):.2f} | {s['per_source'].get('math', 0):.2f} "
          f"| {s['exact_match']:.2f} |", flush=True)
    for name in args.only:
        run = os.path.join(out, name)
        lr = args.lr if name == "full" else args.lora_lr
        t = _train(run, [f"train.init_from={base_hf}", "data.sources=[identity]", "data.weights=null",
                         f"train.max_steps={args.steps}", f"optim.lr={lr}", "optim.warmup_ratio=0.1",
                         "train.resume=never", *batch, *VARIANTS[name]])
        s = score_run(run, base_hf)
        per = s["per_source"]
        print(f"| {name} (lr {lr:g}) | {s['trainable_params']:,} | {args.steps} | {t['wall_s']:.0f} | {t['cpu_s']:.0f} "
              f"| {_last_metrics(run)['loss']:.3f} | {per.get('identity', 0):.2f} | {per.get('math', 0):.2f} "
              f"| {s['exact_match']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
