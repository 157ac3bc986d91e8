"""A model's own chat template (data.chat_template; train.init_from sets it from the directory's
tokenizer_config.json when that template is not floe's): conversations rendered by the Jinja template
the model was trained with, loss masks still floe's.

The template is rendered as transformers' apply_chat_template renders it (a sandboxed Jinja
environment with trim_blocks and lstrip_blocks, tojson, raise_exception, bos_token / eos_token from
tokenizer_config.json; {% generation %} markers are ignored), character for character. Which
characters are trained comes from rendering prefixes of the conversation, so no template needs a
{% generation %} block: for assistant turn i,

    start = len(render(messages[:i], add_generation_prompt=True))   # its header is before this
    end   = len(render(messages[:i + 1]))                           # its text and end-of-turn marker
    trained characters: [start, end) less trailing whitespace (floe's ChatML: content and <|im_end|>)

Each trained and untrained stretch is tokenised by itself (as floe tokenises each turn's content),
so the mask is exact at token level. A template that rewrites earlier turns when later ones follow
(prefix renders that are not prefixes of the whole) is refused, naming the template.
"""
from __future__ import annotations

import hashlib
import json
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from floe.data.layouts import TEXT, Example
from floe.data.template import Encoded
from floe.data.tokenizer import Tokenizer

_GENERATION_TAG = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")


class ChatTemplate:
    """A Jinja chat template and the special-token strings it may use; `render(messages)` as transformers."""

    def __init__(self, path: str):
        self.path = path
        source = Path(path).read_text(encoding="utf-8")
        config = {}
        if path.endswith(".json"):
            try:
                config = json.loads(source)
            except json.JSONDecodeError as e:
                raise ValueError(f"data.chat_template: {path} is not JSON ({e.msg})") from None
            source = config.get("chat_template")
            if isinstance(source, list):  # several named templates: the default one
                source = next((t.get("template") for t in source if t.get("name") == "default"), None)
            if not isinstance(source, str):
                raise ValueError(f"data.chat_template: {path} has no chat_template")
        self.source = source
        self.fingerprint = hashlib.sha256(source.encode()).hexdigest()
        self.tokens = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.template = _compile(_GENERATION_TAG.sub("", source))

    def standalone_source(self) -> str:
        """The template with the special-token strings it was rendered with set inside it, for a tokenizer
        whose own bos/eos differ (an export: floe's eos_token is the end-of-turn token): rendered there it
        writes what training wrote."""
        sets = "".join(f"{{% set {k} = {json.dumps(v)} %}}" for k, v in self.tokens.items()
                       if v and re.search(rf"\b{k}\b", self.source))
        return sets + self.source

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.tokens)

    def spans(self, example: Example) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, trained) stretches (module docstring)."""
        messages = [{"role": role, "content": content} for role, content in example]
        full = self.render(messages)
        out, pos = [], 0
        for i, (role, _) in enumerate(example):
            if role != "assistant":
                continue
            head, whole = self.render(messages[:i], add_generation_prompt=True), self.render(messages[:i + 1])
            # whitespace a template writes after its last turn is not part of the conversation's prefix
            head = head if full.startswith(head) else head.rstrip()
            if not (full.startswith(head) and full.startswith(whole.rstrip()) and len(head) <= len(whole)):
                raise ValueError(f"data.chat_template: {self.path} renders a conversation's first {i + 1} turns as "
                                 "something that is not a prefix of the whole conversation, so its assistant turns "
                                 "cannot be found (set data.chat_template=null for floe's ChatML)")
            end = len(whole.rstrip())
            out += [(full[pos:len(head)], False), (full[len(head):end], True)]
            pos = end
        out.append((full[pos:], False))
        return [(text, trained) for text, trained in out if text]


    def prompt(self, turns: Example) -> list[str]:
        """A generation prompt for conversation `turns` as the stretches training would tokenise one by one:
        those of the conversation up to its last assistant turn (spans), then the rest of the render with
        the generation prompt (the following turns and the assistant header) as one."""
        stretches = self.spans(turns) if any(role == "assistant" for role, _ in turns) else []
        if stretches and not stretches[-1][1]:
            stretches.pop()  # what follows the last assistant turn: re-rendered below with the header
        done = "".join(text for text, _ in stretches)
        head = self.render([{"role": r, "content": c} for r, c in turns], add_generation_prompt=True)
        if not head.startswith(done):
            raise ValueError(f"data.chat_template: {self.path} renders the generation prompt as something that "
                             "does not start with the conversation it continues")
        return [text for text, _ in stretches] + [head[len(done):]]

    def end_of_turn(self) -> str:
        """What the template writes after an assistant's content (its end-of-turn marker, e.g. </s> or
        <|eot_id|>; trailing whitespace left out, as in training): what the model learned to stop with."""
        content = "\u2063floe\u2063"  # text no template writes itself
        trained = [text for text, is_trained in self.spans((("user", "?"), ("assistant", content))) if is_trained]
        return trained[0][trained[0].index(content) + len(content):] if trained and content in trained[0] else ""


def _token_text(value) -> str:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


@lru_cache(maxsize=8)
def _compile(source: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def encode_with_template(tok: Tokenizer, examples: list[Example], template: ChatTemplate, num_threads: int = 1,
                         loss_on: str = "assistant", untrained_turns: list[int] | None = None) -> Encoded:
    """encode_examples with the conversations rendered by `template`; plain text as encode_examples does.
    untrained_turns[i]: how many of example i's first assistant turns get no loss (a preference pair's
    prompt: floe.data.preference)."""
    eos = [tok.eos_id] if tok.eos_id >= 0 else []
    pieces = [[(ex[0][1], True)] if ex[0][0] == TEXT else template.spans(ex) for ex in examples]
    for spans, skip in zip(pieces, untrained_turns or [], strict=False):
        trained_at = [i for i, (_, trained) in enumerate(spans) if trained][:skip]
        for i in trained_at:
            spans[i] = (spans[i][0], False)
    ids = tok.encode_batch([text for spans in pieces for text, _ in spans], num_threads)
    tokens: list[int] = []
    trained: list[bool] = []
    lengths = np.empty(len(examples), dtype=np.int64)
    k = 0
    for e, (ex, spans) in enumerate(zip(examples, pieces, strict=True)):
        start = len(tokens)
        for _, is_trained in spans:
            tokens += ids[k]
            trained += [is_trained or loss_on == "all"] * len(ids[k])
            k += 1
        if ex[0][0] == TEXT:
            tokens += eos
            trained += [True] * len(eos)
        if len(tokens) > start:
            trained[start] = False  # nothing in the example predicts its first token
        lengths[e] = len(tokens) - start
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return Encoded(np.asarray(tokens, dtype=np.int32), np.asarray(trained, dtype=bool), lengths, starts)
