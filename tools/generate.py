"""Generate a reply from a trained run or a Hugging Face export, in the chat format it trained with.

    python tools/generate.py runs/tiny/default --prompt "What is 3 + 4?"            # the run's latest checkpoint
    python tools/generate.py exported/tiny --prompt "Who are you?" --temperature 0.8 --top-p 0.9 --seed 1

The prompt becomes a user turn followed by the assistant header, tokenised exactly as training
tokenised it: floe's ChatML (floe.data.template), stopping at <|im_end|>; or, for a run that trained
with a model's own template (data.chat_template, which train.init_from sets from an imported model) and
an export of it (its tokenizer_config.json), that template (floe.data.chat_template), stopping at what
it writes after an assistant's turn. Greedy unless --temperature > 0.
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


class Chat:
    """How a model's conversations are written: floe's ChatML, or `template` (a ChatTemplate) when the
    model trained with its own. prompt_ids(turns): the generation prompt as training tokenised it;
    stop: the token ids of the end of an assistant turn; end: that marker as text (None: ChatML's)."""

    def __init__(self, tokenizer: Tokenizer, template=None):
        self.tokenizer, self.template = tokenizer, template
        self.end = None if template is None else template.end_of_turn()
        if template is None:
            self.stop = tokenizer.im_end
        else:
            self.stop = tokenizer.encode(self.end) if self.end else [tokenizer.eos_id]

    def prompt_ids(self, turns) -> list[int]:
        if self.template is None:
            return chat_prompt_ids(self.tokenizer, turns)
        return [i for text in self.template.prompt(tuple(turns)) for i in self.tokenizer.encode(text)]

    def text(self, ids: list[int]) -> str:
        """A reply's text; with a template, cut at its end marker (its ids may be written otherwise inside
        a reply than alone, so the token-level stop can miss it)."""
        text = self.tokenizer.decode(ids)
        return text.split(self.end, 1)[0] if self.end else text


def chat_for(path: str, tokenizer: Tokenizer) -> Chat:
    """The Chat a run, checkpoint or export at `path` trained with (module docstring)."""
    from floe.data.chat_template import ChatTemplate
    from floe.run.init_from import own_chat_template

    if os.path.isfile(os.path.join(path, CONFIG_FILE)):  # an export: its tokenizer_config.json, unless floe's
        own = own_chat_template(path, None)
        return Chat(tokenizer, ChatTemplate(own) if own else None)
    from tools.export import read_run_config, resolve_checkpoint, run_template

    return Chat(tokenizer, run_template(read_run_config(resolve_checkpoint(path)[1])[1]))


def reply(model, tokenizer: Tokenizer, prompts: list, max_new_tokens: int = 128, chat: Chat | None = None,
          **sampling) -> list[str]:
    """The assistant's reply to each prompt (a user message, or a tuple of (role, content) turns), written
    as `chat` says (default: floe's ChatML)."""
    chat = chat or Chat(tokenizer)
    ids = [chat.prompt_ids([("user", p)] if isinstance(p, str) else p) for p in prompts]
    out = generate(model, ids, max_new_tokens, stop=chat.stop, pad_id=tokenizer.pad_id, **sampling)
    return [chat.text(row) for row in out]


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
        texts = reply(model, tokenizer, args.prompt, args.max_new_tokens, chat_for(args.path, tokenizer),
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    except ValueError as e:
        print(f"generate: {e}", file=sys.stderr)
        return 2
    for text in texts:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
