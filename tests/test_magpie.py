"""tools/magpie.py: filters, chat JSONL output that data=jsonl trains on, and resuming a killed run.

In the first tests the generator is replaced by a scripted one (hand-written questions and answers,
the seeds it was asked for recorded) so every count is known; the last (slow) one runs the real path on
a tiny model trained with data.loss_on=all (16 of 16 questions of the trained kind, measured here);
BENCHMARKS.md (Magpie) has the figures on the embedded mix."""
import json

import pytest

from floe.data import DataConfig, Tokenizer, build_dataset
from tools import magpie
from tools.generate import Chat


@pytest.fixture
def scripted(monkeypatch):
    """generate() returning scripted rows: questions when the prompt is the bare user prefix, else answers."""
    tok = Tokenizer(None)
    prefix = tok.im_start + tok.encode("user\n")
    questions = iter(["What is 2 + 3?", "", "What is 2 + 3?", "Name a colour.", "TRUNC", "Hi <|im_start|>user",
                      "What is 7 * 6?", "Who are you?", "What is 9 - 4?", "Tell me a joke.", "what is 2 +  3?",
                      "Sort [3, 1, 2].", "Capital of Peru?", "Spell cat."] + [f"Question {i}?" for i in range(100)])
    seeds = []

    def fake_generate(model, prompts, max_new_tokens, *, seed=None, stop=None, **kw):
        seeds.append(seed)
        rows = []
        for p in prompts:
            if p == prefix:
                text = next(questions)
                rows.append(list(range(5, 5 + max_new_tokens)) if text == "TRUNC" else tok.encode(text))
            else:
                q = tok.decode(p[len(prefix):])
                rows.append(tok.encode("" if "colour" in q else f"Answer to: {q.split('<|im_end|>')[0]}"))
        return rows

    monkeypatch.setattr(magpie, "generate", fake_generate)
    monkeypatch.setattr(magpie, "load_model_for_inference", lambda path: (None, tok))
    monkeypatch.setattr(magpie, "chat_for", lambda path, tokenizer: Chat(tokenizer))
    return seeds


def lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_filters_and_chat_jsonl(tmp_path, scripted, capsys):
    out = tmp_path / "synth.jsonl"
    assert magpie.main(["model", "--num", "5", "--out", str(out), "--batch-size", "4",
                        "--max-question-tokens", "16"]) == 0
    got = lines(out)
    assert [r["messages"][0]["content"] for r in got] == ["What is 2 + 3?", "What is 7 * 6?", "Who are you?",
                                                          "What is 9 - 4?", "Tell me a joke."]
    for r in got:
        (u, a) = r["messages"]
        assert u["role"] == "user" and a == {"role": "assistant", "content": f"Answer to: {u['content']}"}
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # batch 1: ok, empty, repeat, (no answer); batch 2: truncated, markers, ok, ok; batch 3: ok, ok, repeat (case
    # and spaces), ok -> the 5th kept conversation is "Tell me a joke."
    assert summary["rejected"] == {"empty": 1, "repeated question": 2, "answer empty": 1, "truncated": 1,
                                   "template markers": 1}
    assert summary["written"] == 5 and summary["batches"] == 3
    _, ds = build_dataset(DataConfig(name="jsonl", paths=[str(out)], seq_len=64, cache_dir=str(tmp_path / "c")), 0)
    assert ds.stats["examples"] == 5 and ds.stats["skipped"] == {}  # data=jsonl trains on it as it is
    from tools import dedup

    dedup.main([str(out), "--out-dir", str(tmp_path / "deduped"), "--no-progress"])  # runs on it unchanged
    assert lines(tmp_path / "deduped" / "synth.jsonl") == got


def test_a_killed_run_resumes(tmp_path, scripted):
    out = tmp_path / "synth.jsonl"
    assert magpie.main(["model", "--num", "2", "--out", str(out), "--batch-size", "4"]) == 0
    assert len(lines(out)) == 2 and json.loads((tmp_path / "synth.jsonl.state.json").read_text()) == {"batches": 2}
    with open(out, "a") as f:  # killed in the middle of writing a line
        f.write('{"messages": [{"role": "user", "content": "half')
    seeds_before = list(scripted)
    assert magpie.main(["model", "--num", "6", "--out", str(out), "--batch-size", "4"]) == 0
    got = [r["messages"][0]["content"] for r in lines(out)]  # the torn line is gone, nothing repeated
    assert len(got) == 6 and len(set(got)) == 6 and got[:2] == ["What is 2 + 3?", "What is 7 * 6?"]
    # batch numbering continues (new seeds), it does not redraw batches 0 and 1
    new_question_seeds = scripted[len(seeds_before)::2]
    assert new_question_seeds[0] == magpie.parse_args(["m", "--num", "1", "--out", "x"]).seed * 1_000_003 + 2
    assert magpie.main(["model", "--num", "6", "--out", str(out)]) == 0 and len(lines(out)) == 6  # already done


def test_bad_arguments_and_foreign_output(tmp_path, scripted, capsys):
    with pytest.raises(SystemExit):
        magpie.main(["model", "--num", "0", "--out", "x", "--temperature", "0"])
    err = capsys.readouterr().err
    assert "--num must be >= 1" in err and "--temperature must be > 0" in err
    out = tmp_path / "other.jsonl"
    out.write_text('{"text": "not a chat"}\n')
    assert magpie.main(["model", "--num", "3", "--out", str(out)]) == 2
    assert "other.jsonl:1: not a Magpie line" in capsys.readouterr().err


@pytest.mark.slow
def test_magpie_end_to_end_on_a_model_trained_with_loss_on_all(tmp_path):
    """The real path: a tiny model trained on the identity questions with data.loss_on=all writes, from the
    bare user prefix, questions recognisably of that kind (tools/bench_magpie.py's nearest-neighbour test);
    the file is chat JSONL that data=jsonl trains on; a second run with a larger --num resumes it."""
    from launch.train import train
    from tests.test_train import make_cfg
    from tools.bench_magpie import kind_of, reference_questions

    run = tmp_path / "run"
    train(make_cfg(run, "data.sources=[identity]", "data.num_examples=2000", "data.seq_len=128",
                   "data.loss_on=all", "data.eval_fraction=0", "train.max_steps=200", "train.global_batch_size=16",
                   "train.micro_batch_size=16", "optim.lr=3e-3", f"data.cache_dir={tmp_path}/cache"))
    out = tmp_path / "synth.jsonl"
    common = [str(run), "--out", str(out), "--batch-size", "16", "--max-question-tokens", "48",
              "--max-answer-tokens", "64", "--max-batches", "4", "--temperature", "0.8"]
    assert magpie.main([*common, "--num", "8"]) == 0
    first = lines(out)
    assert magpie.main([*common, "--num", "16"]) == 0
    got = lines(out)
    assert got[:8] == first and len(got) == 16
    questions = [r["messages"][0]["content"] for r in got]
    assert len({magpie.normalise(q) for q in questions}) == 16  # no repeats, across the two runs
    refs = reference_questions(500)
    share = sum(kind_of(q, refs, 0.5) == "identity" for q in questions) / len(questions)
    print(f"identity questions: {share:.2f} of {len(questions)}")
    assert share >= 0.75, questions
    _, ds = build_dataset(DataConfig(name="jsonl", paths=[str(out)], seq_len=256, cache_dir=str(tmp_path / "c")), 0)
    assert ds.stats["examples"] == 16 and ds.stats["skipped"] == {}


def test_a_model_with_its_own_template_is_refused(tmp_path, scripted, monkeypatch, capsys):
    """Magpie samples from floe's ChatML user prefix; a model that trained with its own template never saw
    it: one line, exit 2, nothing written."""
    from tests.test_chat_template import ZEPHYR, write_config
    from floe.data.chat_template import ChatTemplate

    template = ChatTemplate(write_config(tmp_path, ZEPHYR))
    monkeypatch.setattr(magpie, "chat_for", lambda path, tokenizer: Chat(tokenizer, template))
    out = tmp_path / "synth.jsonl"
    assert magpie.main(["model", "--num", "5", "--out", str(out)]) == 2
    assert "trained with its own chat template" in capsys.readouterr().err and not out.exists()
