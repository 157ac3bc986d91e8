"""Export a training checkpoint as a Hugging Face Arctic directory, or a LoRA run's adapters for PEFT.

    python tools/export.py runs/tiny/default --out exported/tiny    # the run's latest checkpoint
    python tools/export.py runs/tiny/default/checkpoints/step_00000060 --out exported/tiny --dtype bfloat16
    python tools/export.py runs/tiny/lora --adapter --out exported/tiny-adapter   # a LoRA run: PEFT adapter

A LoRA run (lora.rank > 0) exports its base (train.init_from, or the fresh init of train.seed) with the
adapters merged into it, as a full directory like any other run (a QLoRA run, lora.quantize_base, merges
them into its dequantized base: the weights it trained against); with --adapter it writes only the
adapters in PEFT's format: adapter_config.json and adapter_model.safetensors, Hugging Face Arctic module
names, one lora_A/lora_B pair per expert (PeftModel.from_pretrained(arctic_model, out) loads it).

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
from floe.files import readable_as_umask
from floe.config import ModelConfig
from floe.data.tokenizer import Tokenizer
from floe.hf import hf_config_from, load_hf_weights, peft_target_modules, save_hf, to_peft
from floe.lora import LoRAConfig, apply_lora, merged_state_dict, trainable_parameters
from floe.quantize import apply_quantize_base
from floe.model import ArcticForCausalLM
from floe.run.init_from import base_identity, base_problem

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


def run_lora(run_cfg: dict) -> LoRAConfig:
    """The run's lora.* (rank 0 for runs from before LoRA existed)."""
    return LoRAConfig(**run_cfg.get("lora", {}))


def load_checkpoint_model(ckpt_dir: str, run_dir: str) -> tuple[ArcticForCausalLM, dict]:
    """Rebuild the full model (every expert) from a checkpoint, on the CPU. A LoRA run's model is its
    base (train.init_from, or the fresh init of train.seed: the one the checkpoint names) with the
    checkpoint's adapters applied, unmerged."""
    model_cfg, run_cfg = read_run_config(run_dir)
    checkpoint.read_meta(ckpt_dir)  # a floe checkpoint, before any weights are allocated
    lora, train_cfg = run_lora(run_cfg), run_cfg.get("train", {})
    with torch.device("meta"):
        model = ArcticForCausalLM(model_cfg)
    if lora.enabled:
        init_from, seed = train_cfg.get("init_from"), int(train_cfg.get("seed", 0))
        problem = base_problem(checkpoint.read_client_state(ckpt_dir).get("base"), base_identity(init_from, seed))
        if problem:
            raise ValueError(f"{ckpt_dir}: {problem}")
        if init_from:
            load_hf_weights(model, init_from, "cpu")
        else:
            model.to_empty(device="cpu")
            model.reset_parameters(seed=seed)  # the keyed init the run started from
        apply_lora(model, lora, seed=seed)
        apply_quantize_base(model, lora.quantize_base, lora.targets)  # a QLoRA run's base, as it trained on it
    else:
        model.to_empty(device="cpu")  # every tensor is overwritten by the checkpoint below
    checkpoint.load_weights(model, ckpt_dir)  # safetensors only: dense by name, experts by global id
    return model, run_cfg


def export(path: str, out_dir: str, dtype: str = "float32", max_shard_gb: float = 5.0,
           drop_expert_bias: bool = False, adapter: bool = False) -> list[str]:
    """Write the checkpoint at `path` to `out_dir`; returns the file names written.
    drop_expert_bias: export a model trained with model.balance_bias_rate > 0 without its bias.
    adapter: write a LoRA run's adapters in PEFT's format instead of the merged model."""
    ckpt_dir, run_dir = resolve_checkpoint(path)
    model_cfg, run_cfg = read_run_config(run_dir)
    hf_config_from(model_cfg, drop_expert_bias=drop_expert_bias)  # refuse an inexpressible model before reading
    if adapter and not run_lora(run_cfg).enabled:
        raise ValueError(f"{run_dir} is not a LoRA run (lora.rank is 0): --adapter has no adapters to write; "
                         "export the full model without --adapter")
    tokenizer = Tokenizer(run_cfg.get("data", {}).get("tokenizer"))
    model, _ = load_checkpoint_model(ckpt_dir, run_dir)
    if adapter:
        return save_peft_adapter(model, run_cfg, out_dir, getattr(torch, dtype))
    return save_hf(merged_state_dict(model), model.config, out_dir, tokenizer, dtype, int(max_shard_gb * 2**30),
                   drop_expert_bias=drop_expert_bias, chat_template=run_chat_template(run_cfg))


def run_template(run_cfg: dict):
    """The model's own ChatTemplate the run trained with (data.chat_template, e.g. train.init_from's), or
    None for floe's ChatML; ValueError when its file is gone."""
    from floe.data.chat_template import ChatTemplate

    path = run_cfg.get("data", {}).get("chat_template")
    if not path:
        return None
    if not os.path.isfile(path):
        raise ValueError(f"the run trained with data.chat_template={path}, which is gone: an export would carry "
                         "another template than the one the model learned, and generation would write other "
                         "prompts")
    return ChatTemplate(path)


def run_chat_template(run_cfg: dict) -> str:
    """The template the run trained with: its own (run_template) with the bos/eos strings it was rendered
    with set inside it (the export's eos_token is floe's end-of-turn token), else floe's ChatML."""
    from floe.data.template import CHAT_TEMPLATE

    template = run_template(run_cfg)
    return CHAT_TEMPLATE if template is None else template.standalone_source()


def save_peft_adapter(model: ArcticForCausalLM, run_cfg: dict, out_dir: str, dtype: torch.dtype) -> list[str]:
    """adapter_config.json + adapter_model.safetensors: what PeftModel.from_pretrained reads."""
    import json

    from safetensors.torch import save_file

    lora = run_lora(run_cfg)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": run_cfg["train"].get("init_from"),
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "use_rslora": lora.rslora,
        "target_modules": peft_target_modules(lora.targets), "bias": "none", "fan_in_fan_out": False,
        "modules_to_save": ([*(["block_sparse_moe.gate"] if lora.train_router else []),
                             *(["embed_tokens", "lm_head"] if lora.train_embeddings else [])] or None),
        "inference_mode": True,
        "init_lora_weights": True,
    }
    tensors = to_peft({n: p.detach() for n, p in trainable_parameters(model).items()}, model.config)
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()},
              os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    readable_as_umask(os.path.join(out_dir, "adapter_model.safetensors"))  # safetensors writes 0600
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return ["adapter_config.json", "adapter_model.safetensors"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a run dir (its latest checkpoint) or a checkpoint dir")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.add_argument("--drop-expert-bias", action="store_true",
                   help="export a model trained with model.balance_bias_rate > 0 without its balancing bias "
                        "(Arctic cannot express it; some tokens then route differently than in training)")
    p.add_argument("--adapter", action="store_true", help="a LoRA run: write only its adapters, in PEFT's format")
    args = p.parse_args()
    try:
        files = export(args.path, args.out, args.dtype, args.max_shard_gb, args.drop_expert_bias, args.adapter)
    except ValueError as e:  # bad input (a path, a run without adapters for --adapter): one message, exit 2
        print(f"export: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {', '.join(files)} to {args.out}")


if __name__ == "__main__":
    main()
