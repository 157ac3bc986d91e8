"""floe.data.preference: TRL's preference layouts -> pairs of sequences packed side by side."""
import json

import numpy as np
import pytest

from floe.data import DataConfig, build_dataset, build_eval_dataset
from floe.data.preference import IDENTICAL, parse_pair
from floe.data.template import render

Q = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
A, B = {"role": "assistant", "content": "Paris."}, {"role": "assistant", "content": "Lyon."}


def build(tmp_path, records, **kw):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    cfg = DataConfig(name="preference", paths=[str(path)], cache_dir=str(tmp_path / "cache"), **{"seq_len": 128, **kw})
    return (*build_dataset(cfg, seed=0), str(path))


def test_the_three_layouts_parse_to_one_pair():
    explicit = parse_pair({"prompt": Q, "chosen": [A], "rejected": [B]})
    implicit = parse_pair({"chosen": Q + [A], "rejected": Q + [B]})
    assert explicit == implicit == (tuple((m["role"], m["content"]) for m in Q), (("assistant", "Paris."),),
                                    (("assistant", "Lyon."),))
    assert parse_pair({"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}) == (
        (("user", "Capital of France?"),), (("assistant", "Paris."),), (("assistant", "Lyon."),))


def test_only_answer_tokens_are_trained_and_both_follow_the_same_prompt(tmp_path):
    tok, ds, _ = build(tmp_path, [{"prompt": Q, "chosen": [A], "rejected": [B]}])
    ids = ds.example_ids([0])[0].numpy()
    tokens, trained = ds.tokens[0], ds.trained[0].astype(bool)
    chosen, rejected = tokens[ids == 0], tokens[ids == 1]
    prompt = tok.encode(render(tuple((m["role"], m["content"]) for m in Q)) + "<|im_start|>assistant\n")
    assert len(prompt) > 5
    want_c = tok.encode(render(tuple((m["role"], m["content"]) for m in Q) + (("assistant", "Paris."),)))
    assert chosen.tolist() == want_c  # floe's chat template, prompt then answer
    n = len(chosen) - len(tok.encode("Paris.<|im_end|>\n"))
    assert chosen[:n].tolist() == rejected[:n].tolist()  # the same prompt tokens
    for seq in (0, 1):
        kept = tokens[(ids == seq) & trained]
        want = "Paris.<|im_end|>" if seq == 0 else "Lyon.<|im_end|>"
        assert tok.decode(kept.tolist()) == tok.decode(tok.encode(want))


def test_pairs_share_a_row_chosen_first(tmp_path):
    recs = [{"prompt": f"Q{i} " * (1 + i % 5), "chosen": f"right {i}", "rejected": f"wrong {i} " * (1 + i % 3)}
            for i in range(40)]
    _, ds, _ = build(tmp_path, recs, seq_len=256)
    assert ds.stats["pairs"] == 40 and ds.stats["examples"] == 80 and ds.num_rows < 40
    seen = []
    for r in range(ds.num_rows):
        ex = ds.row_examples(r)
        assert len(ex) % 2 == 0 and all(c % 2 == 0 and rj == c + 1 for c, rj in zip(ex[0::2], ex[1::2])), ex
        seen += ex
    assert sorted(seen) == list(range(80))


@pytest.mark.parametrize("line,reason", [
    ('{"prompt": "q", "chosen": "same", "rejected": "same"}', IDENTICAL),
    ('{"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "p"}]}',
     "no assistant answer"),
    ('{"prompt": "q", "chosen": "a"}', "no known fields"),
    ('{"prompt": "q", "chosen": "a", "rejected": 3}', "bad field type"),
    ('{"prompt": "q", "chosen": "a", "rejected": "  "}', "empty assistant content"),
    ("not json", "invalid JSON"),
])
def test_bad_lines_strict_and_lenient(tmp_path, line, reason):
    good = {"prompt": "Capital?", "chosen": "Paris", "rejected": "Lyon"}
    with pytest.raises(ValueError) as e:
        build(tmp_path, [good, good, line])
    assert f"pairs.jsonl:3: {reason}" in str(e.value)
    _, ds, _ = build(tmp_path, [good, good, line], strict=False)
    assert ds.stats["skipped"] == {reason: 1} and ds.stats["pairs"] == 2


def test_overlong_pairs_are_cut_to_fit_or_dropped(tmp_path):
    long = {"prompt": "hi", "chosen": "word " * 200, "rejected": "short"}
    ok = {"prompt": "hi", "chosen": "yes", "rejected": "no"}
    _, ds, _ = build(tmp_path, [long, ok], seq_len=64)
    assert ds.stats["truncated"] == 1 and ds.stats["pairs"] == 2
    assert int(ds.lengths.max()) <= 64 and ds.trained.sum() > 0
    ids = ds.example_ids(range(ds.num_rows)).numpy()
    for ex in range(4):  # every sequence kept some trained tokens
        assert (ds.trained.astype(bool) & (ids == ex)).any(), ex
    _, ds, _ = build(tmp_path, [long, ok], seq_len=64, overlong="drop")
    assert ds.stats["pairs"] == 1 and ds.stats["skipped"] == {"overlong": 1}


def test_eval_fraction_holds_pairs_out(tmp_path):
    recs = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(60)]
    _, train_ds, path = build(tmp_path, recs, eval_fraction=0.25)
    cfg = DataConfig(name="preference", paths=[path], seq_len=128, cache_dir=str(tmp_path / "cache"), eval_fraction=0.25)
    eval_ds = build_eval_dataset(cfg, seed=0)
    assert train_ds.stats["pairs"] + eval_ds.stats["pairs"] == 60 and eval_ds.stats["pairs"] > 5

    def sequences(ds):
        ids = ds.example_ids(range(ds.num_rows)).numpy()
        return {bytes(ds.tokens[ids == ex]) for ex in range(ds.stats["examples"])}
    assert eval_ds.stats["held_out"] == train_ds.stats["pairs"] and train_ds.stats["held_out"] == eval_ds.stats["pairs"]
    assert len(sequences(train_ds)) == 2 * train_ds.stats["pairs"]
    assert not sequences(train_ds) & sequences(eval_ds)


def test_preference_config_errors():
    with pytest.raises(ValueError, match="data.paths must list"):
        DataConfig(name="preference")
    with pytest.raises(ValueError, match="data.loss_on=all does not apply to data=preference"):
        DataConfig(name="preference", paths=["x.jsonl"], loss_on="all")
    with pytest.raises(ValueError, match="data.format, .* are for data=jsonl; data=preference reads TRL's"):
        DataConfig(name="preference", paths=["x.jsonl"], columns={"prompt": "question"})
    with pytest.raises(ValueError, match="data.loss_on must be one of assistant, all"):
        DataConfig(loss_on="users")


def test_pairs_in_a_models_own_template_train_only_the_answer(tmp_path):
    """data.chat_template (train.init_from sets it from an imported model; a DPO run from such a model was
    refused before): both sequences rendered as transformers renders them with that template; trained,
    only the answer's content and end of turn, not the prompt's own assistant turn."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from tests.test_chat_template import ZEPHYR, write_config

    template = write_config(tmp_path, ZEPHYR)
    prompt = Q + [{"role": "assistant", "content": "Ask me."}, {"role": "user", "content": "Capital of Italy?"}]
    tok, ds, _ = build(tmp_path, [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "Rome."}],
                                   "rejected": [B]}], chat_template=template, seq_len=512)
    ids = ds.example_ids([0])[0].numpy()
    tokens, trained = ds.tokens[0], ds.trained[0].astype(bool)
    for seq, answer in ((0, "Rome."), (1, "Lyon.")):
        want, _ = render_jinja_template(conversations=[prompt + [{"role": "assistant", "content": answer}]],
                                        chat_template=ZEPHYR, bos_token="<s>", eos_token="</s>")
        assert tok.decode(tokens[ids == seq].tolist()) == want[0]
        assert tok.decode(tokens[(ids == seq) & trained].tolist()) == answer + "</s>"  # not "Ask me."
