"""Export a training checkpoint as Hugging Face Arctic safetensors.

    python tools/export.py runs/tiny --out exported/tiny            # the run's latest checkpoint
    python tools/export.py runs/tiny/checkpoints/step_00000060 --out exported/tiny --dtype bfloat16

Writes model.safetensors (or shards plus model.safetensors.index.json past --max-shard-gb),
config.json (model_type "arctic") and tokenizer.model. Experts come from the checkpoint by
global id, whatever parallel.ep_size the run used.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from omegaconf import OmegaConf

from moe import checkpoint
from moe.config import ModelConfig
from moe.hf import hf_config, to_hf
from moe.model import ArcticForCausalLM
from moe.parallel.expert_checkpoint import load_model_state

MODEL_STATES = "mp_rank_00_model_states.pt"


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """(checkpoint dir, run dir) for a run dir or a checkpoint dir; ValueError naming what is missing."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, MODEL_STATES)):
        return path, os.path.dirname(os.path.dirname(path))
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such run or checkpoint directory")
    latest = checkpoint.latest_checkpoint(os.path.join(path, "checkpoints"))
    if latest is None:
        raise ValueError(f"{path}: no complete checkpoint (no checkpoints/latest, and no {MODEL_STATES} here)")
    return latest, path


def load_checkpoint_model(ckpt_dir: str, run_dir: str) -> tuple[ArcticForCausalLM, dict]:
    """Rebuild the full model (every expert) from a checkpoint, on the CPU."""
    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{cfg_path}: missing (the run's resolved config names the model shape)")
    run_cfg = OmegaConf.load(cfg_path)
    model = ArcticForCausalLM(ModelConfig(**OmegaConf.to_container(run_cfg.model, resolve=True)))
    states_file = os.path.join(ckpt_dir, MODEL_STATES)
    if not os.path.isfile(states_file):
        raise ValueError(f"{states_file}: missing; is {ckpt_dir} a complete checkpoint?")
    module_state = torch.load(states_file, map_location="cpu", weights_only=False)["module"]
    load_model_state(model, module_state, ckpt_dir)
    return model, OmegaConf.to_container(run_cfg, resolve=True)


def save_safetensors(tensors: dict[str, torch.Tensor], out_dir: str, max_shard_bytes: int) -> list[str]:
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t.contiguous()
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {n: f for f, shard in zip(names, shards) for n in shard}}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    for fname, shard in zip(names, shards):
        save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
    return names


def export(path: str, out_dir: str, dtype: str = "float32", max_shard_gb: float = 5.0) -> list[str]:
    ckpt_dir, run_dir = resolve_checkpoint(path)
    model, run_cfg = load_checkpoint_model(ckpt_dir, run_dir)
    tensors = {k: v.to(getattr(torch, dtype)) for k, v in to_hf(model.state_dict(), model.config).items()}
    os.makedirs(out_dir, exist_ok=True)
    files = save_safetensors(tensors, out_dir, int(max_shard_gb * 2**30))
    config = hf_config(model.config) | {"torch_dtype": dtype}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tokenizer = run_cfg.get("data", {}).get("tokenizer")
    if tokenizer is None:
        from moe.data.tokenizer import DEFAULT_MODEL as tokenizer
    shutil.copyfile(tokenizer, os.path.join(out_dir, "tokenizer.model"))
    return files


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a run dir (its latest checkpoint) or a checkpoint dir")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    args = p.parse_args()
    files = export(args.path, args.out, args.dtype, args.max_shard_gb)
    print(f"wrote {', '.join(files)}, config.json and tokenizer.model to {args.out}")


if __name__ == "__main__":
    main()
