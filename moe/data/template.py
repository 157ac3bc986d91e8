"""ChatML template and completion-only labels, built from token spans (never by searching text).

    <|im_start|>{role}\\n{content}<|im_end|>\\n      for each turn of a conversation

Trained tokens: the content of every assistant turn and the <|im_end|> that closes it (so the
model learns to stop). A prompt/completion record is a user turn plus an assistant turn.
A plain-text example is its tokens plus </s> (when the tokenizer has one), all trained.
With loss_on="all" (data.loss_on) every token of a conversation is trained: user turns, system
turns and the template markers too, so the model learns what users ask (tools/magpie.py).
The first token of every example is never trained: nothing in the example predicts it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from floe.data.layouts import ROLES, TEXT, Example
from floe.data.tokenizer import Tokenizer

# The same ChatML as a Jinja chat template (transformers' apply_chat_template), written into every
# exported tokenizer: for any messages record, apply_chat_template(messages, tools=record's tools)
# spells exactly render(parse_record(record)) (tests hold the two equal character for character).
# Content parts, tool calls and the tools block follow floe.data.layouts; the {% generation %}
# block marks what encode_examples trains (assistant content and its <|im_end|>), so TRL's
# assistant_only_loss / return_assistant_tokens_mask train the same tokens as floe.
CHAT_TEMPLATE = """\
{%- macro text(content) -%}
{%- if content is string -%}{{ content }}
{%- elif content is iterable -%}
{%- for part in content -%}
{%- if (part.type is defined and part.type == 'text') or (part.type is not defined and part.text is defined) -%}
{{ part.text }}
{%- else -%}
{{ raise_exception('floe trains on text parts only, not a ' ~ (part.type if part.type is defined else 'typeless') ~ ' part') }}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- set first = 0 -%}
{%- if tools -%}
{%- set ns_tools = namespace(block='# Tools\n\n<tools>') -%}
{%- for tool in tools -%}{%- set ns_tools.block = ns_tools.block ~ '\n' ~ (tool | tojson) -%}{%- endfor -%}
{%- set ns_tools.block = ns_tools.block ~ '\n</tools>' -%}
{%- if messages and messages[0].role == 'system' -%}
{{ '<|im_start|>system\n' ~ text(messages[0].content) ~ '\n\n' ~ ns_tools.block ~ '<|im_end|>\n' }}
{%- set first = 1 -%}
{%- else -%}
{{ '<|im_start|>system\n' ~ ns_tools.block ~ '<|im_end|>\n' }}
{%- endif -%}
{%- endif -%}
{%- for message in messages[first:] -%}
{%- if message.role not in ['system', 'user', 'assistant', 'tool'] -%}
{{ raise_exception('floe chat roles are system, user, assistant, tool, not ' ~ message.role) }}
{%- endif -%}
{%- set ns = namespace(body=text(message.content)) -%}
{%- if message.tool_calls is defined and message.tool_calls -%}
{%- for call in message.tool_calls -%}
{%- set fn = call.function if call.function is defined else call -%}
{%- set args = fn.arguments if fn.arguments is defined else {} -%}
{%- set args = args if args is string else (args | tojson) -%}
{%- set ns.body = ns.body ~ ('\n' if ns.body else '') ~ '<tool_call>\n{"name": ' ~ (fn.name | tojson) ~ ', "arguments": ' ~ args ~ '}\n</tool_call>' -%}
{%- endfor -%}
{%- endif -%}
{%- if message.role == 'assistant' -%}
{{ '<|im_start|>assistant\n' }}{% generation %}{{ ns.body ~ '<|im_end|>' }}{% endgeneration %}{{ '\n' }}
{%- else -%}
{{ '<|im_start|>' ~ message.role ~ '\n' ~ ns.body ~ '<|im_end|>\n' }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}
"""


@dataclass
class Encoded:
    """Examples as flat arrays: example i is tokens[starts[i]:starts[i] + lengths[i]].

    `starts` are where each example was written and never change; `lengths` may be cut
    (data.overlong=truncate), so the starts must not be derived from them.
    """
    tokens: np.ndarray   # int32 [num_tokens]
    trained: np.ndarray  # bool [num_tokens]: the token is a loss target
    lengths: np.ndarray  # int64 [num_examples]: tokens used from each example
    starts: np.ndarray   # int64 [num_examples]: offset of each example in `tokens`

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        o, n = self.starts[i], self.lengths[i]
        return self.tokens[o:o + n], self.trained[o:o + n]

    def truncated(self, lengths: np.ndarray) -> "Encoded":
        """The same examples cut to `lengths` (each <= its current length), starts kept."""
        assert (lengths <= self.lengths).all()
        return Encoded(self.tokens, self.trained, lengths, self.starts)

    @staticmethod
    def concat(parts: list["Encoded"]) -> "Encoded":
        """One Encoded of several, in order (starts shifted by the tokens before each part)."""
        if not parts:
            return Encoded(np.zeros(0, np.int32), np.zeros(0, bool), np.zeros(0, np.int64), np.zeros(0, np.int64))
        shifts = np.cumsum([0] + [len(p.tokens) for p in parts[:-1]])
        return Encoded(np.concatenate([p.tokens for p in parts]), np.concatenate([p.trained for p in parts]),
                       np.concatenate([p.lengths for p in parts]),
                       np.concatenate([p.starts + s for p, s in zip(parts, shifts, strict=True)]))


def render(example: Example) -> str:
    """The exact text the tokens spell (for tokenizer training and for reading)."""
    return "".join(c if role == TEXT else f"<|im_start|>{role}\n{c}<|im_end|>\n" for role, c in example)


def encode_examples(tok: Tokenizer, examples: list[Example], num_threads: int = 1,
                    loss_on: str = "assistant") -> Encoded:
    """Tokenise examples through the template; contents are encoded in one batched call.
    loss_on: "assistant" (assistant contents and their <|im_end|>) or "all" (every token)."""
    every = loss_on == "all"
    ids = tok.encode_batch([content for ex in examples for _, content in ex], num_threads)
    header = {role: tok.im_start + tok.encode(f"{role}\n") for role in ROLES}
    footer = tok.im_end + tok.encode("\n")
    num_end = len(tok.im_end)
    eos = [tok.eos_id] if tok.eos_id >= 0 else []
    tokens: list[int] = []
    trained: list[bool] = []
    lengths = np.empty(len(examples), dtype=np.int64)
    k = 0
    for e, ex in enumerate(examples):
        start = len(tokens)
        for role, _ in ex:
            content = ids[k]
            k += 1
            if role == TEXT:
                tokens += content + eos
                trained += [True] * (len(content) + len(eos))
                continue
            is_assistant = role == "assistant"
            tokens += header[role]
            tokens += content
            tokens += footer
            trained += [every] * len(header[role])
            trained += [is_assistant or every] * (len(content) + num_end)
            trained += [every] * (len(footer) - num_end)
        trained[start] = False
        lengths[e] = len(tokens) - start
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return Encoded(np.asarray(tokens, dtype=np.int32), np.asarray(trained, dtype=bool), lengths, starts)
