"""Generate a reply from a trained run or a Hugging Face export, with the ChatML template.

    python tools/generate.py runs/tiny/default --prompt "What is 3 + 4?"            # the run's latest checkpoint
    python tools/generate.py exported/tiny --prompt "Who are you?" --temperature 0.8 --top-p 0.9 --seed 1

The prompt becomes a user turn followed by the assistant header, tokenised exactly as training
tokenised it (floe.data.template); generation stops at <|im_end|>. Greedy unless --temperature > 0.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from floe.data.template import encode_examples
from floe.data.tokenizer import Tokenizer
from floe.generate import generate
from floe.hf import CONFIG_FILE, hf_tokenizer_path, load_hf_weights, read_hf_config
from floe.model import ArcticForCausalLM


def load_model_for_inference(path: str) -> tuple[ArcticForCausalLM, Tokenizer]:
    """(model in eval mode on the CPU, its tokenizer) from a run dir, a checkpoint dir or an HF export dir.

    The one place that knows the on-disk formats: a run (config.yaml + checkpoints/) goes through
    tools/export.py's checkpoint reader; a directory with config.json through floe.hf.
    """
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        config = read_hf_config(path)
        with torch.device("meta"):
            model = ArcticForCausalLM(config)
        load_hf_weights(model, path)
        tokenizer = Tokenizer(hf_tokenizer_path(path))
    else:
        from tools.export import load_checkpoint_model, resolve_checkpoint

        model, run_cfg = load_checkpoint_model(*resolve_checkpoint(path))
        tokenizer = Tokenizer(run_cfg.get("data", {}).get("tokenizer"))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{path}: tokenizer has {tokenizer.vocab_size} ids, the model only {model.config.vocab_size}")
    return model.eval(), tokenizer


def chat_prompt_ids(tokenizer: Tokenizer, turns) -> list[int]:
    """Ids of conversation `turns` ((role, content), ...) plus the assistant header, as in training."""
    encoded = encode_examples(tokenizer, [tuple(turns)])
    return encoded.tokens.tolist() + tokenizer.im_start + tokenizer.encode("assistant\n")


def reply(model, tokenizer: Tokenizer, prompts: list, max_new_tokens: int = 128, **sampling) -> list[str]:
    """The assistant's reply to each prompt (a user message, or a tuple of (role, content) turns)."""
    ids = [chat_prompt_ids(tokenizer, [("user", p)] if isinstance(p, str) else p) for p in prompts]
    out = generate(model, ids, max_new_tokens, stop=tokenizer.im_end, pad_id=tokenizer.pad_id, **sampling)
    return [tokenizer.decode(row) for row in out]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a run dir (its latest checkpoint), a checkpoint dir, or an HF export dir")
    p.add_argument("--prompt", action="append", required=True, help="a user message (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        model, tokenizer = load_model_for_inference(args.path)
        texts = reply(model, tokenizer, args.prompt, args.max_new_tokens, temperature=args.temperature,
                      top_p=args.top_p, seed=args.seed)
    except ValueError as e:
        print(f"generate: {e}", file=sys.stderr)
        return 2
    for text in texts:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
