"""A model's own chat template (floe.data.chat_template): rendered as transformers' apply_chat_template
renders it, character for character, with floe's token-level loss masks (floe's own ChatML through this
path gives exactly encode_examples' tokens and labels); train.init_from picks the directory's template."""
import json

import numpy as np
import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from floe.data import DataConfig, build_dataset, synthetic
from floe.data.chat_template import ChatTemplate, encode_with_template
from floe.data.layouts import parse_record
from floe.data.template import CHAT_TEMPLATE, encode_examples
from floe.data.tokenizer import Tokenizer
from floe.run.init_from import own_chat_template

# Zephyr-style: a BOS, <|role|> headers, eos after every turn, and a system prompt folded into the first user turn
ZEPHYR = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{% set sys = m['content'] %}"
          "{% else %}<|{{ m['role'] }}|>\n{% if loop.index0 == 1 and sys is defined %}{{ sys }}\n\n{% endif %}"
          "{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def write_config(tmp_path, template, name="tokenizer_config.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"chat_template": template, "bos_token": "<s>",
                                "eos_token": {"content": "</s>", "special": True}}))
    return str(path)


def examples():
    records = [r for s in ("math", "general", "identity") for r in synthetic.generate(s, 8, seed=4)]
    records.append({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
                                 {"role": "assistant", "content": "4"}]})
    return [parse_record(r) for r in records]


def test_floes_own_template_through_this_path_gives_encode_examples_exactly(tmp_path):
    tok, exs = Tokenizer(), examples() + [(("text", "plain text, all trained"),)]
    template = ChatTemplate(write_config(tmp_path, CHAT_TEMPLATE))
    for loss_on in ("assistant", "all"):
        got, want = encode_with_template(tok, exs, template, loss_on=loss_on), encode_examples(tok, exs, loss_on=loss_on)
        assert np.array_equal(got.tokens, want.tokens) and np.array_equal(got.trained, want.trained)
        assert np.array_equal(got.lengths, want.lengths)


def test_a_foreign_template_renders_as_transformers_and_trains_the_assistant_turns(tmp_path):
    tok = Tokenizer()
    template = ChatTemplate(write_config(tmp_path, ZEPHYR))
    for ex in examples():
        messages = [{"role": r, "content": c} for r, c in ex]
        want, _ = render_jinja_template(conversations=[messages], chat_template=ZEPHYR, bos_token="<s>",
                                        eos_token="</s>")
        spans = template.spans(ex)
        assert "".join(text for text, _ in spans) == want[0]  # character for character
        assert [text for text, trained in spans if trained] == [c + "</s>" for r, c in ex if r == "assistant"]
        enc = encode_with_template(tok, [ex], template)
        ids, trained = enc.example(0)
        assert tok.decode(ids[trained].tolist()) == "".join(c + "</s>" for r, c in ex if r == "assistant")


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    # numbers turns from the end: adding a turn changes every earlier one
    odd = "{% for m in messages %}[{{ messages|length - loop.index0 }}] {{ m['content'] }}\n{% endfor %}"
    template = ChatTemplate(write_config(tmp_path, odd))
    with pytest.raises(ValueError, match="not a prefix of the whole conversation"):
        template.spans((("user", "q"), ("assistant", "a")))


def test_init_from_uses_the_directorys_own_template_and_builds_with_it(tmp_path):
    floe_dir, own_dir = tmp_path / "floe", tmp_path / "own"
    floe_dir.mkdir(), own_dir.mkdir()
    write_config(floe_dir, CHAT_TEMPLATE)
    own = write_config(own_dir, ZEPHYR)
    assert own_chat_template(str(floe_dir), None) is None  # floe's ChatML: the usual path
    assert own_chat_template(str(own_dir), None) == own
    assert own_chat_template(str(own_dir), "mine.jinja") == "mine.jinja"  # data.chat_template wins
    assert own_chat_template(str(tmp_path), None) is None  # no tokenizer_config.json
    cfg = dict(name="synthetic", num_examples=40, seq_len=128, cache_dir=str(tmp_path / "cache"))
    plain, zephyr = (build_dataset(DataConfig(**cfg, chat_template=t), 0)[1] for t in (None, own))
    assert plain.fingerprint != zephyr.fingerprint and zephyr.stats["loss_tokens"] > 0
    (own_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": ZEPHYR.replace("\n\n", "\n") + " "}))
    again = build_dataset(DataConfig(**cfg, chat_template=own), 0)[1]
    assert not again.cache_hit  # the cache follows the template's content, not its path


def test_chat_template_config_errors(tmp_path):
    with pytest.raises(ValueError, match="data.chat_template: no file"):
        DataConfig(chat_template=str(tmp_path / "none.json"))
    (tmp_path / "t.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match="has no chat_template"):
        DataConfig(chat_template=str(tmp_path / "t.json"))
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match="data.chat_template: .*bad.jinja"):
        DataConfig(chat_template=str(tmp_path / "bad.jinja"))


def test_export_carries_the_template_the_run_trained_with(tmp_path):
    from tools.export import run_chat_template

    own = write_config(tmp_path, ZEPHYR)
    assert run_chat_template({"data": {"chat_template": own}}) == ZEPHYR
    assert run_chat_template({"data": {"chat_template": None}}) == CHAT_TEMPLATE == run_chat_template({})
    with pytest.raises(ValueError, match="gone"):
        run_chat_template({"data": {"chat_template": str(tmp_path / "moved.json")}})
