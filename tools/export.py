"""Export a training checkpoint as a Hugging Face Arctic directory.

    python tools/export.py runs/tiny/default --out exported/tiny    # the run's latest checkpoint
    python tools/export.py runs/tiny/default/checkpoints/step_00000060 --out exported/tiny --dtype bfloat16

Writes model.safetensors (or shards plus model.safetensors.index.json past --max-shard-gb),
config.json (model_type "arctic"), generation_config.json (eos = <|im_end|>), tokenizer.json,
tokenizer_config.json (with the ChatML chat_template), special_tokens_map.json and tokenizer.model.
Experts come from the checkpoint by global id, whatever parallel.ep_size the run used. A model
Arctic cannot express (e.g. model.dense_ffn != model.hidden_size) is refused before anything is
read or written; so is one trained with the balancing bias (model.balance_bias_rate > 0) unless
--drop-expert-bias leaves the bias out. Load the result with

    AutoTokenizer.from_pretrained(out, trust_remote_code=False)   # no remote-code question for the tokenizer
    AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)   # Arctic's modeling code
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from omegaconf import OmegaConf

from floe.run import checkpoint
from floe.config import ModelConfig
from floe.data.tokenizer import Tokenizer
from floe.hf import hf_config_from, save_hf
from floe.model import ArcticForCausalLM

META = "floe.json"  # marks a checkpoint directory (moe/run/checkpoint.py)


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """(checkpoint dir, run dir) for a run dir or a checkpoint dir; ValueError naming what is missing."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, META)):
        return path, os.path.dirname(os.path.dirname(path))
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such run or checkpoint directory")
    latest = checkpoint.latest_checkpoint(os.path.join(path, "checkpoints"))
    if latest is None:
        raise ValueError(f"{path}: no complete checkpoint (no checkpoints/latest, and no {META} here)")
    return latest, path


def read_run_config(run_dir: str) -> tuple[ModelConfig, dict]:
    """The run's ModelConfig and its whole resolved config (config.yaml)."""
    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{cfg_path}: missing (the run's resolved config names the model shape)")
    run_cfg = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=True)
    return ModelConfig(**run_cfg["model"]), run_cfg


def load_checkpoint_model(ckpt_dir: str, run_dir: str) -> tuple[ArcticForCausalLM, dict]:
    """Rebuild the full model (every expert) from a checkpoint, on the CPU."""
    model_cfg, run_cfg = read_run_config(run_dir)
    checkpoint.read_meta(ckpt_dir)  # a floe checkpoint, before any weights are allocated
    with torch.device("meta"):
        model = ArcticForCausalLM(model_cfg)
    model.to_empty(device="cpu")  # every tensor is overwritten by the checkpoint below
    checkpoint.load_weights(model, ckpt_dir)  # safetensors only: dense by name, experts by global id
    return model, run_cfg


def export(path: str, out_dir: str, dtype: str = "float32", max_shard_gb: float = 5.0,
           drop_expert_bias: bool = False) -> list[str]:
    """Write the checkpoint at `path` to `out_dir`; returns the file names written.
    drop_expert_bias: export a model trained with model.balance_bias_rate > 0 without its bias."""
    ckpt_dir, run_dir = resolve_checkpoint(path)
    model_cfg, run_cfg = read_run_config(run_dir)
    hf_config_from(model_cfg, drop_expert_bias=drop_expert_bias)  # refuse an inexpressible model before reading
    tokenizer = Tokenizer(run_cfg.get("data", {}).get("tokenizer"))
    model, _ = load_checkpoint_model(ckpt_dir, run_dir)
    return save_hf(model.state_dict(), model.config, out_dir, tokenizer, dtype, int(max_shard_gb * 2**30),
                   drop_expert_bias=drop_expert_bias)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a run dir (its latest checkpoint) or a checkpoint dir")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.add_argument("--drop-expert-bias", action="store_true",
                   help="export a model trained with model.balance_bias_rate > 0 without its balancing bias "
                        "(Arctic cannot express it; some tokens then route differently than in training)")
    args = p.parse_args()
    try:
        files = export(args.path, args.out, args.dtype, args.max_shard_gb, args.drop_expert_bias)
    except ValueError as e:
        sys.exit(f"export: {e}")
    print(f"wrote {', '.join(files)} to {args.out}")


if __name__ == "__main__":
    main()
