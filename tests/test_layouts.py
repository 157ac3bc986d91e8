"""Record layouts (floe.data.layouts): every layout reads to the same training text and loss mask as
the equivalent `messages` record, and that text is what transformers' apply_chat_template renders
from the messages with floe's CHAT_TEMPLATE (an independent Jinja implementation)."""
import json

import numpy as np
import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from floe.data import DataConfig, build_dataset
from floe.data.formats import read_files
from floe.data.layouts import (EMPTY_ASSISTANT, NO_FIELDS, UNKNOWN_ROLE, UNSUPPORTED_CONTENT, BadRecord, Layout,
                               parse_record)
from floe.data.template import CHAT_TEMPLATE, encode_examples, render
from floe.data.tokenizer import Tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}

# (record in some layout, the equivalent messages record)
CASES = {
    "sharegpt": (
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "2+2?"},
                           {"from": "gpt", "value": "4"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}]}),
    "sharegpt_system_key": (
        {"system": "Be brief.", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Yo"}]}),
    "sharegpt_tool": (
        {"conversations": [{"from": "human", "value": "Weather in Paris?"},
                           {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
                           {"from": "observation", "value": "22C"}, {"from": "gpt", "value": "22C in Paris."}],
         "tools": json.dumps([WEATHER])},
        {"messages": [{"role": "user", "content": "Weather in Paris?"},
                      {"role": "assistant", "content": None, "tool_calls": [
                          {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                      {"role": "tool", "content": "22C"}, {"role": "assistant", "content": "22C in Paris."}],
         "tools": [WEATHER]}),
    "alpaca": (
        {"instruction": "Translate to French", "input": "cat", "output": "chat"},
        {"messages": [{"role": "user", "content": "Translate to French\n\ncat"},
                      {"role": "assistant", "content": "chat"}]}),
    "alpaca_no_input_history": (
        {"instruction": "And dog?", "input": "", "output": "chien", "system": "Translate.",
         "history": [["cat?", "chat"]]},
        {"messages": [{"role": "system", "content": "Translate."}, {"role": "user", "content": "cat?"},
                      {"role": "assistant", "content": "chat"}, {"role": "user", "content": "And dog?"},
                      {"role": "assistant", "content": "chien"}]}),
    "trl_conversational": (
        {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
         "completion": [{"role": "assistant", "content": "A"}]},
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                      {"role": "assistant", "content": "A"}]}),
    "prompt_completion": (
        {"prompt": "Q", "completion": "A"},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}),
    "content_parts": (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}]},
        {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}]}),
    "tool_calls_string_args": (
        {"messages": [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Paris?"},
                      {"role": "assistant", "content": "Checking.", "tool_calls": [
                          {"function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                          {"name": "get_weather", "arguments": {"city": "Lyon é"}}]},
                      {"role": "tool", "content": "22C"}, {"role": "tool", "content": "19C"},
                      {"role": "assistant", "content": "22C and 19C."}], "tools": [WEATHER]},
        None),  # already a messages record: checked against apply_chat_template only
}


def equivalent(name):
    record, messages = CASES[name]
    return record, messages or record


def hf_render(messages_record) -> tuple[str, list[tuple[int, int]]]:
    out, spans = render_jinja_template(conversations=[messages_record["messages"]], tools=messages_record.get("tools"),
                                       chat_template=CHAT_TEMPLATE, return_assistant_tokens_mask=True)
    return out[0], spans[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_layout_reads_to_the_messages_records_text_and_mask(name):
    record, messages = equivalent(name)
    tok = Tokenizer()
    example = parse_record(record)
    assert example == parse_record(messages)
    text, spans = hf_render(messages)
    assert render(example) == text  # character for character against transformers' renderer
    ids, trained = encode_examples(tok, [example]).example(0)
    want_ids, want_trained = encode_examples(tok, [parse_record(messages)]).example(0)
    assert np.array_equal(ids, want_ids) and np.array_equal(trained, want_trained)
    # floe trains exactly the {% generation %} spans: each assistant body and its <|im_end|>
    assert tok.decode(ids[trained].tolist()) == "".join(text[a:b] for a, b in spans)


def test_tool_turns_are_never_trained():
    record, _ = CASES["tool_calls_string_args"]
    tok = Tokenizer()
    example = parse_record(record)
    assert [r for r, _ in example] == ["system", "user", "assistant", "tool", "tool", "assistant"]
    assert example[0][1].startswith("Use tools.\n\n# Tools\n\n<tools>\n{\"type\": \"function\"")
    assert example[2][1] == ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                             '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon é"}}\n'
                             '</tool_call>')
    enc = encode_examples(tok, [example])
    trained_text = tok.decode(enc.tokens[enc.trained.astype(bool)].tolist())
    assert "22C and 19C." in trained_text and "<tool_call>" in trained_text
    assert "19C<" not in trained_text and "get_weather\", \"description" not in trained_text


def test_forced_format_and_column_mapping():
    dialog = {"dialog": [{"speaker": "person", "text": "Hi"}, {"speaker": "bot", "text": "Hello"}]}
    layout = Layout(field_messages="dialog", message_property_mappings={"role": "speaker", "content": "text"},
                    roles={"user": ["person"], "assistant": ["bot"]})
    assert parse_record(dialog, layout) == (("user", "Hi"), ("assistant", "Hello"))
    qa = {"question": "Q", "answer": "A"}
    assert parse_record(qa, Layout(columns={"prompt": "question", "completion": "answer"})) == \
        (("user", "Q"), ("assistant", "A"))
    # data.format forces a layout: a record with both keys is read as the forced one
    both = {"text": "plain", "prompt": "Q", "completion": "A"}
    assert parse_record(both) == (("user", "Q"), ("assistant", "A"))
    assert parse_record(both, Layout(format="text")) == (("text", "plain"),)
    with pytest.raises(BadRecord, match="reads the turns from 'conversations'"):
        parse_record({"messages": []}, Layout(format="sharegpt"))


@pytest.mark.parametrize("record, reason, match", [
    ({"dialog": [{"speaker": "a", "utterance": "x"}]}, NO_FIELDS,
     r"'dialog' looks like a message list .*data.field_messages=dialog"),
    ({"question": "Q", "answer": "A", "id": 3}, NO_FIELDS, r"data.columns=\{prompt: question, completion: answer\}"),
    ({"body": "some text", "id": 3}, NO_FIELDS, r"plain text: read it with data.columns=\{text: body\}"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "url": "x"}]}, {"role": "assistant", "content": "y"}]},
     UNSUPPORTED_CONTENT, r"messages\[0\].content\[0\] is a 'image' part; floe trains on text parts only"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "narrator", "value": "y"}]}, UNKNOWN_ROLE,
     r"conversations\[1\].role='narrator'"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": " "}]}, EMPTY_ASSISTANT, "no content"),
])
def test_unreadable_records_say_what_would_read_them(record, reason, match):
    with pytest.raises(BadRecord, match=match) as e:
        parse_record(record)
    assert e.value.reason == reason


def test_a_file_in_each_layout_builds_the_same_rows(tmp_path):
    """Whole files: ShareGPT JSONL, an Alpaca JSON array and the messages JSONL pack into identical rows."""
    records = [CASES["sharegpt"], CASES["alpaca"], CASES["trl_conversational"], CASES["sharegpt_tool"]]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(m) + "\n" for _, m in records))
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r, _ in records))
    alpaca = [{"instruction": f"Say {i}", "input": "" if i % 2 else "loud", "output": str(i)} for i in range(6)]
    (tmp_path / "alpaca_data.json").write_text(json.dumps(alpaca, indent=2))
    (tmp_path / "alpaca_msgs.jsonl").write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")},
                                 {"role": "assistant", "content": r["output"]}]}) + "\n" for r in alpaca))
    for a, b in (("mixed.jsonl", "chat.jsonl"), ("alpaca_data.json", "alpaca_msgs.jsonl")):
        rows = [build_dataset(DataConfig(name="jsonl", paths=[str(tmp_path / f)], seq_len=256,
                                         cache_dir=str(tmp_path / "cache")), 0)[1] for f in (a, b)]
        assert rows[0].stats["skipped"] == {} and rows[0].stats["examples"] == len(alpaca if "alpaca" in a else records)
        for arr in ("tokens", "trained", "position", "lengths"):  # the fingerprint also covers the file names
            assert np.array_equal(getattr(rows[0], arr), getattr(rows[1], arr)), arr
    read = read_files([str(tmp_path / "alpaca_data.json")], strict=False)
    assert read.where(4) == f"{tmp_path / 'alpaca_data.json'}: record 5"


def test_data_config_checks_the_layout_keys():
    with pytest.raises(ValueError, match="data.format must be one of auto, messages, sharegpt"):
        DataConfig(format="chatml")
    with pytest.raises(ValueError, match=r"data.columns: unknown \['messages'\].*data.field_messages"):
        DataConfig(columns={"messages": "dialog"})
    with pytest.raises(ValueError, match=r"data.roles: unknown floe role\(s\) \['bot'\]"):
        DataConfig(roles={"bot": ["gpt"]})
    with pytest.raises(ValueError, match="data.message_property_mappings must be a mapping"):
        DataConfig(message_property_mappings="role")


def test_a_file_nothing_reads_says_what_would_read_it_in_lenient_mode_too(tmp_path):
    path = tmp_path / "dialogs.jsonl"
    path.write_text("".join(json.dumps({"dialog": [{"speaker": "a", "text": "x"}]}) + "\n" for _ in range(3)))
    with pytest.raises(ValueError, match=r"skipped 3 lines: 3 no known fields\); the first: .*dialogs.jsonl:1: .*"
                                         r"data.field_messages=dialog"):
        build_dataset(DataConfig(name="jsonl", paths=[str(path)], strict=False, cache_dir=str(tmp_path)), 0)
