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
    # the bos/eos strings training rendered with, set inside it: the export's eos_token is floe's <|im_end|>
    exported = run_chat_template({"data": {"chat_template": own}})
    assert exported == '{% set bos_token = "<s>" %}{% set eos_token = "</s>" %}' + ZEPHYR
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    trained, _ = render_jinja_template(conversations=[messages], chat_template=ZEPHYR, bos_token="<s>",
                                       eos_token="</s>")
    there, _ = render_jinja_template(conversations=[messages], chat_template=exported, eos_token="<|im_end|>")
    assert there == trained
    assert run_chat_template({"data": {"chat_template": None}}) == CHAT_TEMPLATE == run_chat_template({})
    with pytest.raises(ValueError, match="gone"):
        run_chat_template({"data": {"chat_template": str(tmp_path / "moved.json")}})


@pytest.mark.slow
def test_generate_writes_prompts_in_the_template_the_run_trained_with(tmp_path, capsys):
    """A run from an imported model with its own template (Zephyr-style, eos </s>): tools/generate.py and
    tools/evaluate.py render the prompt with that template as transformers does and stop at its end of
    turn, where floe's ChatML prompt would be other ids the model never saw."""
    from launch.train import train
    from tests.test_generate import recompute
    from tests.test_train import make_cfg
    from tools.evaluate import evaluate
    from tools.export import export
    from tools.generate import Chat, chat_for, chat_prompt_ids, load_model_for_inference
    from tools.generate import main as generate_main
    from floe.config import PRESETS
    from floe.hf import save_hf
    from floe.model import ArcticForCausalLM

    base = tmp_path / "base"
    model = ArcticForCausalLM(PRESETS["tiny"])
    model.reset_parameters(seed=2)
    save_hf(model.state_dict(), model.config, str(base), Tokenizer())
    config = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": ZEPHYR, "bos_token": "<s>",
                                                             "eos_token": "</s>"}))
    run = tmp_path / "run"
    train(make_cfg(run, f"train.init_from={base}", "train.max_steps=2", "train.global_batch_size=4",
                   "train.micro_batch_size=4"))
    model, tok = load_model_for_inference(str(run))
    chat = chat_for(str(run), tok)
    question = "What is 2 + 3?"
    want, _ = render_jinja_template(conversations=[[{"role": "user", "content": question}]], chat_template=ZEPHYR,
                                    add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    ids = chat.prompt_ids([("user", question)])
    assert ids == tok.encode(want[0]) != chat_prompt_ids(tok, [("user", question)])
    assert chat.end == "</s>" and chat.stop == tok.encode("</s>")
    turns = (("user", "Hi"), ("assistant", "Hello."), ("user", question))  # a later turn: training's stretches
    rendered, _ = render_jinja_template(conversations=[[{"role": r, "content": c} for r, c in turns]],
                                        chat_template=ZEPHYR, add_generation_prompt=True, bos_token="<s>",
                                        eos_token="</s>")
    assert tok.decode(chat.prompt_ids(turns)) == rendered[0]
    expected = chat.text(recompute(model, ids, 6, chat.stop))
    assert generate_main([str(run), "--prompt", question, "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    items = [{"turns": (("user", question),), "reference": "5", "source": "math"}]
    assert evaluate(model, tok, items, max_new_tokens=6, chat=chat)[0]["prediction"] == expected
    assert Chat(tok).stop == tok.im_end  # floe's ChatML, as before
    export(str(run), str(tmp_path / "hf"))  # the export carries the template and generates the same reply
    assert chat_for(str(tmp_path / "hf"), tok).prompt_ids([("user", question)]) == ids
    assert generate_main([str(tmp_path / "hf"), "--prompt", question, "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == expected + "\n"
