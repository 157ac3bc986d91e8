"""floe.data: tokenizer, template labels, packing, bad input, mixture, cache and the step loader."""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import threading

import numpy as np
import pytest
import sentencepiece as spm
import torch

from floe.data import (
    DataConfig,
    StepLoader,
    Tokenizer,
    build_dataset,
    formats,
    synthetic,
)
from floe.data.packing import best_fit_pack
from floe.data.template import encode_examples, render
from floe.data.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return build_dataset(DataConfig(num_examples=600, seq_len=128, cache_dir=str(cache)), seed=3)


def write_jsonl(path, records):
    with open(path, "wb") as f:
        for r in records:
            f.write(r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n")
    return str(path)


def chat(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


# ---------------------------------------------------------------------------- tokenizer
def test_shipped_tokenizer(tok):
    assert tok.vocab_size == 1024
    assert tok.pad_id == 3 and tok.piece(tok.pad_id) == "<pad>"
    assert tok.im_start == [4] and tok.im_end == [5]
    for s in ["<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n", "def f(x):\n    return x * x\n",
              "Ünïcødé 漢字 🙂 \t two  spaces", "\n\n"]:
        assert tok.decode(tok.encode(s)) == s
    # byte fallback: an unseen character is spelled in UTF-8 byte pieces, not <unk>
    assert 0 not in tok.encode("漢")
    assert [tok.piece(i) for i in tok.encode("漢")] == ["<0xE6>", "<0xBC>", "<0xA2>"]


def test_train_load_roundtrip(tmp_path):
    texts = [render(formats.parse_record(r)) for r in synthetic.generate("math", 300, 0)]
    path = tmp_path / "t.model"
    trained = train_tokenizer(texts, path, vocab_size=400)
    loaded = Tokenizer(path)
    assert loaded.vocab_size == trained.vocab_size == 400
    assert loaded.fingerprint == trained.fingerprint
    assert loaded.pad_id == 3 and len(loaded.im_start) == 1 and len(loaded.im_end) == 1
    for s in texts[:20] + ["Zoë's 漢字 code:\n\tpass"]:
        assert loaded.decode(loaded.encode(s)) == s
    # the same text trains the same model, byte for byte
    assert train_tokenizer(texts, tmp_path / "u.model", vocab_size=400).fingerprint == trained.fingerprint


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="data.tokenizer: no SentencePiece model"):
        Tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="data.tokenizer: .* is not a SentencePiece model"):
        Tokenizer(tmp_path / "junk.model")


# ---------------------------------------------------------------------------- labels
def trained_ids(tok, enc, i):
    ids, trained = enc.example(i)
    return ids, trained, ids[trained].tolist()


def test_labels_multi_turn(tok):
    ex = formats.parse_record(chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello there."),
                                   ("user", "2 + 3?"), ("assistant", "5")))
    enc = encode_examples(tok, [ex])
    ids, trained, got = trained_ids(tok, enc, 0)
    assert tok.decode(ids.tolist()) == render(ex)
    # both assistant turns, each with the <|im_end|> that closes it, and nothing else
    assert got == tok.encode("Hello there.") + [5] + tok.encode("5") + [5]
    assert tok.decode(got) == "Hello there.<|im_end|>5<|im_end|>"
    # hand count: 5 turns, each 2 markers + role piece(s) + "\n" ... every marker but 2 untrained
    assert (ids == 4).sum() == 5 and (ids == 5).sum() == 5
    assert not trained[ids == 4].any() and trained[ids == 5].sum() == 2
    assert not trained[0]


def test_loss_on_all_trains_every_token_but_the_first(tok, tmp_path):
    """data.loss_on=all (for a model that should learn user turns, tools/magpie.py): every token of the
    conversation is a target, template markers and user turns included; only the first is not."""
    ex = formats.parse_record(chat(("user", "2 + 3?"), ("assistant", "5")))
    ids, trained = encode_examples(tok, [ex], loss_on="all").example(0)
    assert tok.decode(ids.tolist()) == render(ex) and not trained[0] and trained[1:].all()
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(chat(("user", "2 + 3?"), ("assistant", "5"))) + "\n")
    built = {on: build_dataset(DataConfig(name="jsonl", paths=[str(path)], seq_len=32, loss_on=on,
                                          cache_dir=str(tmp_path / "cache")), seed=0)[1] for on in ("assistant", "all")}
    assert built["all"].stats["loss_tokens"] == len(ids) - 1
    assert built["assistant"].stats["loss_tokens"] == len(tok.encode("5")) + 1  # "5<|im_end|>"


def test_labels_prompt_completion_and_text(tok):
    pc = formats.parse_record({"prompt": "Say hi", "completion": "hi!"})
    tx = formats.parse_record({"text": "all of this"})
    enc = encode_examples(tok, [pc, tx])
    ids, trained, got = trained_ids(tok, enc, 0)
    assert tok.decode(ids.tolist()) == "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\nhi!<|im_end|>\n"
    assert got == tok.encode("hi!") + [5]
    ids, trained, got = trained_ids(tok, enc, 1)
    assert ids.tolist() == tok.encode("all of this") + [tok.eos_id]
    assert trained.tolist() == [False] + [True] * (len(ids) - 1)  # the first token has no predecessor


def test_batch_labels_and_positions(synth, tok):
    _, ds = synth
    b = ds.batch([0, 1])
    L = ds.seq_len
    for r in range(2):
        ids, lab, pos, am = (b[k][r] for k in ("input_ids", "labels", "position_ids", "attention_mask"))
        n = int(ds.lengths[r])
        assert am.tolist() == [True] * n + [False] * (L - n)
        assert (ids[n:] == tok.pad_id).all() and (lab[n:] == -100).all()
        assert pos[n:].tolist() == list(range(L - n))  # the padding tail restarts at 0
        assert ((lab == ids) | (lab == -100)).all()
        assert (lab[pos == 0] == -100).all()  # the first token of an example is never a target
        # each segment is exactly its example of the mixture, generated and encoded alone
        starts = torch.nonzero(pos[:n] == 0).flatten().tolist() + [n]
        examples = ds.row_examples(r)
        assert len(examples) == len(starts) - 1 >= 1
        for k, (m, a, z) in enumerate(zip(examples, starts, starts[1:], strict=False)):
            src = ds.source_names[ds.seg_source[ds.seg_offsets[r] + k]]
            assert src == list(synthetic.SOURCES)[m // 150]  # 600 examples, 4 sources of 150
            record = synthetic.generate(src, 150, 3)[m % 150]
            want_ids, want_trained = encode_examples(tok, [formats.parse_record(record)]).example(0)
            assert ids[a:z].tolist() == want_ids.tolist()
            assert (lab[a:z] != -100).tolist() == want_trained.tolist()
            assert pos[a:z].tolist() == list(range(z - a))


def test_rows_match_independent_encoding(tmp_path, tok):
    records = synthetic.generate("code", 50, 7)
    path = write_jsonl(tmp_path / "c.jsonl", records)
    _, ds = build_dataset(DataConfig(name="jsonl", paths=[path], seq_len=256, cache_dir=str(tmp_path)), 0)
    enc = encode_examples(tok, [formats.parse_record(r) for r in records])
    seen = []
    for r in range(ds.num_rows):
        c = 0
        for m in ds.row_examples(r):
            ids, trained = enc.example(m)
            n = len(ids)
            assert ds.tokens[r, c:c + n].tolist() == ids.tolist()
            assert ds.trained[r, c:c + n].astype(bool).tolist() == trained.tolist()
            c += n
            seen.append(m)
        assert c == ds.lengths[r]
    assert sorted(seen) == list(range(50))
    assert ds.stats["loss_tokens"] == int(enc.trained.sum()) and ds.stats["tokens"] == int(enc.lengths.sum())


@pytest.mark.parametrize("kind", ["chat", "prompt_completion", "text"])
def test_truncated_rows_match_independent_encoding(tmp_path, tok, kind):
    """Issue 8.1: with data.overlong=truncate every example after an overlong one was read from the
    wrong offset. Every packed segment must be its own example, cut to seq_len, token for token."""
    def record(i, n_words):
        words = " ".join(f"w{i}x{j}" for j in range(n_words))
        if kind == "chat":
            return chat(("system", "be brief"), ("user", f"q{i}"), ("assistant", f"a{i} " + words))
        if kind == "prompt_completion":
            return {"prompt": f"q{i}", "completion": f"a{i} " + words}
        return {"text": f"t{i} " + words}
    records = [record(i, 2 + (37 * i) % 40) for i in range(40)]  # several far over seq_len, several under
    seq_len = 48
    path = write_jsonl(tmp_path / f"{kind}.jsonl", records)
    _, ds = build_dataset(DataConfig(name="jsonl", paths=[path], seq_len=seq_len, cache_dir=str(tmp_path)), 0)
    assert ds.stats["truncated"] >= 5 and ds.stats["examples"] == 40
    seen = []
    for r in range(ds.num_rows):
        c = 0
        for m in ds.row_examples(r):
            alone = encode_examples(tok, [formats.parse_record(records[m])])  # its own encoding
            ids, trained = alone.tokens[:seq_len], alone.trained[:seq_len]
            n = len(ids)
            assert ds.tokens[r, c:c + n].tolist() == ids.tolist(), (r, m)
            assert ds.trained[r, c:c + n].astype(bool).tolist() == trained.tolist(), (r, m)
            assert ds.position[r, c] == 0 and not ds.trained[r, c]  # the template never trains a first token
            c += n
            seen.append(m)
        assert c == ds.lengths[r]
    assert sorted(seen) == list(range(40))


# ---------------------------------------------------------------------------- packing
def naive_best_fit(lengths, L):
    rows = []  # remaining space per row
    for n in sorted(lengths, reverse=True):
        fits = [i for i, s in enumerate(rows) if s >= n]
        if fits:
            i = min(fits, key=lambda i: rows[i])
            rows[i] -= n
        else:
            rows.append(L - n)
    return sorted(L - s for s in rows)


def test_best_fit_hand_case():
    # 5 -> new row (3 left); 4 -> new row (4 left); 3 -> row 0 (exact fit); 3 -> row 1; 1 -> row 1
    assert best_fit_pack(np.array([5, 4, 3, 3, 1]), 8) == [[0, 2], [1, 3, 4]]


def test_best_fit_never_splits_and_matches_reference():
    rng = np.random.default_rng(0)
    for L in (16, 64, 4096):
        lengths = rng.integers(1, L + 1, size=300) // rng.integers(1, 6, size=300) + 1
        lengths = np.minimum(lengths, L)
        rows = best_fit_pack(lengths, L)
        flat = [i for row in rows for i in row]
        assert sorted(flat) == list(range(len(lengths)))  # every example once, whole
        assert all(sum(lengths[i] for i in row) <= L for row in rows)
        assert sorted(sum(lengths[i] for i in row) for row in rows) == naive_best_fit(lengths.tolist(), L)
        # a row is opened only for an example that fits in no earlier row (rooms only shrink)
        room = [L - sum(lengths[i] for i in row) for row in rows]
        for j in range(1, len(rows)):
            assert max(room[:j]) < lengths[rows[j][0]]
        assert best_fit_pack(lengths, L) == rows  # deterministic


# ---------------------------------------------------------------------------- bad input
BAD_LINES = [  # (line, reason); line numbers follow from the order
    (chat(("user", "hi"), ("assistant", "hello")), None),
    (b'{"prompt": "2+2?", "completion": "4"\n', formats.INVALID_JSON),
    (b'{"text": "caf\xe9"}\n', formats.INVALID_UTF8),
    ({"foo": 1}, formats.NO_FIELDS),
    (chat(("narrator", "x"), ("assistant", "y")), formats.UNKNOWN_ROLE),
    (chat(("user", "x"), ("assistant", "  ")), formats.EMPTY_ASSISTANT),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}, formats.EMPTY_ASSISTANT),
    ({"prompt": "x", "completion": ""}, formats.EMPTY_ASSISTANT),
    (chat(("user", "x")), formats.NO_ASSISTANT),
    ([1, 2], formats.NOT_OBJECT),
    ({"messages": "hi"}, formats.BAD_TYPE),
    ({"text": ""}, formats.EMPTY_TEXT),
    (b"\n", formats.BLANK),
    ({"prompt": "Say hi", "completion": "hi"}, None),
    ({"text": "plain text, all trained"}, None),
]


def test_strict_stops_at_first_bad_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [r for r, _ in BAD_LINES])
    with pytest.raises(ValueError, match=rf"^{path}:2: invalid JSON: .*data.strict=false"):
        build_dataset(DataConfig(name="jsonl", paths=[path], cache_dir=str(tmp_path)), 0)
    for i in (2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12):  # every bad kind alone is the first bad line
        one = write_jsonl(tmp_path / f"one{i}.jsonl", [BAD_LINES[0][0], BAD_LINES[i - 1][0]])
        with pytest.raises(ValueError, match=rf"^{one}:2: {BAD_LINES[i - 1][1]}"):
            build_dataset(DataConfig(name="jsonl", paths=[one], cache_dir=str(tmp_path)), 0)


def test_the_skipped_lines_report_is_printed_by_rank_0_only(tmp_path, caplog):
    from floe.run.entry import quiet_repeated_reports

    path = write_jsonl(tmp_path / "bad.jsonl", [r for r, _ in BAD_LINES])
    try:
        for rank in (1, 0):
            quiet_repeated_reports(rank)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="floe.data"):
                build_dataset(DataConfig(name="jsonl", paths=[path], strict=False,
                                         cache_dir=str(tmp_path / f"cache{rank}")), 0)
            assert (f"{path}:2: invalid JSON" in caplog.text) == (rank == 0), rank
    finally:
        quiet_repeated_reports(0)


def test_lenient_counts_every_reason(tmp_path, caplog):
    path = write_jsonl(tmp_path / "bad.jsonl", [r for r, _ in BAD_LINES])
    with caplog.at_level(logging.WARNING, logger="floe.data"):
        _, ds = build_dataset(DataConfig(name="jsonl", paths=[path], strict=False, cache_dir=str(tmp_path)), 0)
    expected = {}
    for _, reason in BAD_LINES:
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    assert ds.stats["skipped"] == dict(sorted(expected.items()))
    assert ds.stats["examples"] == 3 and ds.stats["lines"] == len(BAD_LINES)
    assert sum(ds.stats["skipped"].values()) + ds.stats["examples"] == len(BAD_LINES)
    assert f"skipped {len(BAD_LINES) - 3} lines: 3 empty assistant content, 1 " in caplog.text
    assert f"{path}:2: invalid JSON" in caplog.text


def test_nothing_to_train_and_overlong(tmp_path, tok):
    notrain = tmp_path / "n.model"  # a tokenizer without </s>: a one-token text trains nothing
    texts = [render(formats.parse_record(r)) for r in synthetic.generate("general", 200, 0)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf, vocab_size=400,
                                   eos_id=-1, pad_id=-1, byte_fallback=True, minloglevel=2,
                                   user_defined_symbols=["<|im_start|>", "<|im_end|>"])
    notrain.write_bytes(buf.getvalue())
    assert Tokenizer(notrain).eos_id == -1 and Tokenizer(notrain).pad_id == 0  # pad falls back to unk
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": "a b c"}])
    cfg = dict(name="jsonl", paths=[path], tokenizer=str(notrain), cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=rf"{path}:1: nothing to train"):
        build_dataset(DataConfig(**cfg), 0)
    _, ds = build_dataset(DataConfig(**cfg, strict=False), 0)
    assert ds.stats["skipped"] == {"nothing to train": 1} and ds.stats["examples"] == 1

    long = chat(("user", "word " * 10), ("assistant", "answer " * 80))
    short = chat(("user", "q"), ("assistant", "a"))
    only_prompt_fits = chat(("user", "word " * 80), ("assistant", "yes"))
    path = write_jsonl(tmp_path / "o.jsonl", [long, short, only_prompt_fits])
    n_long = len(encode_examples(tok, [formats.parse_record(long)]).tokens)
    assert n_long > 64
    base = dict(name="jsonl", paths=[path], seq_len=64, cache_dir=str(tmp_path))
    _, ds = build_dataset(DataConfig(**base, overlong="truncate"), 0)  # strict: policy, not an error
    assert ds.stats["truncated"] == 1 and ds.stats["examples"] == 2
    assert ds.stats["skipped"] == {"nothing to train after truncation": 1}
    assert ds.lengths.max() == 64
    _, ds = build_dataset(DataConfig(**base, overlong="drop"), 0)
    assert ds.stats["truncated"] == 0 and ds.stats["examples"] == 1
    assert ds.stats["skipped"] == {"overlong": 2}


# ---------------------------------------------------------------------------- mixture, globs, cache
def test_mixture_weights_and_globs(tmp_path, tok):
    (tmp_path / "a").mkdir()
    write_jsonl(tmp_path / "a" / "1.jsonl", [chat(("user", f"a{i}"), ("assistant", "x")) for i in range(6)])
    write_jsonl(tmp_path / "a" / "2.jsonl", [chat(("user", f"b{i}"), ("assistant", "x")) for i in range(4)])
    big = write_jsonl(tmp_path / "big.jsonl", [{"text": f"t {i}"} for i in range(30)])
    glob = str(tmp_path / "a" / "*.jsonl")
    _, ds = build_dataset(DataConfig(name="jsonl", paths=[glob, big], cache_dir=str(tmp_path)), 0)
    assert ds.stats["sources"] == {glob: {"available": 10, "examples": 10}, big: {"available": 30, "examples": 30}}
    cfg = DataConfig(name="jsonl", paths=[glob, big], weights=[3, 1], num_examples=40, cache_dir=str(tmp_path))
    _, ds = build_dataset(cfg, 0)
    # 30 of 40 from a 10-example source: each example exactly 3 times; 10 distinct of the 30 texts
    assert ds.stats["sources"][glob]["examples"] == 30 and ds.stats["sources"][big]["examples"] == 10
    assert np.bincount(ds.seg_source, minlength=2).tolist() == [30, 10]
    segments = []  # decoded text of every packed example
    for r in range(ds.num_rows):
        starts = np.flatnonzero(ds.position[r, :ds.lengths[r]] == 0).tolist() + [int(ds.lengths[r])]
        segments += [tok.decode(ds.tokens[r, a:z].tolist()) for a, z in zip(starts, starts[1:], strict=False)]
    chats = [s.split("user\n")[1].split("<|im_end|>")[0] for s in segments if s.startswith("<|im_start|>")]
    assert sorted(chats) == sorted(3 * ([f"a{i}" for i in range(6)] + [f"b{i}" for i in range(4)]))
    texts = [s for s in segments if s.startswith("t ")]
    assert len(texts) == len(set(texts)) == 10 and set(texts) <= {f"t {i}" for i in range(30)}
    assert sorted(np.concatenate([ds.row_examples(r) for r in range(ds.num_rows)]).tolist()) == list(range(40))
    with pytest.raises(ValueError, match=r"data.paths\[1\]: no file matches"):
        build_dataset(DataConfig(name="jsonl", paths=[glob, str(tmp_path / "nope*.jsonl")], cache_dir=str(tmp_path)), 0)


def test_embedded_mix_is_deterministic(tmp_path):
    cfg = DataConfig(name="arctic_mix", sources=["general", "code", "math", "identity"],
                     weights=[0.5, 0.25, 0.2, 0.05], num_examples=400, seq_len=128, cache_dir=str(tmp_path))
    _, a = build_dataset(cfg, 1)
    assert {k: v["examples"] for k, v in a.stats["sources"].items()} == \
        {"general": 200, "code": 100, "math": 80, "identity": 20}
    _, b = build_dataset(dataclasses.replace(cfg, cache_dir=str(tmp_path / "other")), 1)
    assert not b.cache_hit and np.array_equal(a.tokens, b.tokens)  # rebuilt from scratch, same rows
    _, c = build_dataset(cfg, 2)
    assert not np.array_equal(a.tokens[:5], c.tokens[:5]) or a.num_rows != c.num_rows
    assert synthetic.generate("math", 5, 0) == synthetic.generate("math", 5, 0)
    assert synthetic.generate("math", 5, 0) != synthetic.generate("math", 5, 1)
    assert len(set(synthetic.identity_questions())) >= 1000


def test_cache_reuse_and_concurrent_builders(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(("user", f"q{i}"), ("assistant", f"a{i}")) for i in range(50)])
    cfg = DataConfig(name="jsonl", paths=[path], seq_len=64, cache_dir=str(tmp_path / "c"))
    results = []
    threads = [threading.Thread(target=lambda: results.append(build_dataset(cfg, 0)[1])) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and sum(not d.cache_hit for d in results) == 1  # one builder, three readers
    assert all(np.array_equal(d.tokens, results[0].tokens) for d in results)
    assert len(list((tmp_path / "c" / "data").glob(".*tmp*"))) == 0
    # changing the file's content changes the key
    write_jsonl(tmp_path / "d.jsonl", [chat(("user", f"q{i}"), ("assistant", f"b{i}")) for i in range(50)])
    _, d = build_dataset(cfg, 0)
    assert not d.cache_hit and d.path != results[0].path


def test_config_validation():
    with pytest.raises(ValueError) as e:
        DataConfig(name="jsonl", overlong="cut", seq_len=1, weights=[1, 2])
    msg = str(e.value)
    for key in ("data.paths", "data.overlong", "data.seq_len", "data.weights"):
        assert key in msg  # all problems in one message
    with pytest.raises(ValueError, match="data.sources: unknown"):
        DataConfig(sources=["math", "poetry"])
    with pytest.raises(ValueError, match="data.name"):
        DataConfig(name="parquet")


# ---------------------------------------------------------------------------- loader
def test_loader_divisibility_message(synth):
    _, ds = synth
    with pytest.raises(ValueError, match=r"train.global_batch_size \(10\) must be divisible by "
                                         r"train.micro_batch_size \(4\) x data-parallel size \(1\)"):
        StepLoader(ds, global_batch_size=10, micro_batch_size=4)
    with pytest.raises(ValueError, match=rf"packs into {ds.num_rows} rows .* fewer than one global batch"):
        StepLoader(ds, global_batch_size=ds.num_rows + 1, micro_batch_size=1)


def test_each_row_once_per_epoch_across_two_ranks(synth):
    _, ds = synth
    G = 8
    ranks = [StepLoader(ds, global_batch_size=G, micro_batch_size=2, dp_rank=r, dp_size=2, seed=5) for r in range(2)]
    spe = ranks[0].steps_per_epoch
    assert spe == ds.num_rows // G and ranks[0].rows_left_out_per_epoch == ds.num_rows % G
    seen = {}
    for epoch in range(2):
        rows = []
        for _ in range(spe):
            for loader in ranks:
                mine = loader.step_rows(loader.epoch, loader.step)
                micro = loader.next_step()
                assert len(micro) == 2
                for key, value in ds.batch(mine).items():
                    assert torch.equal(torch.cat([m[key] for m in micro]), value)
                rows += mine.tolist()
        seen[epoch] = rows
        assert len(rows) == len(set(rows)) == spe * G  # no row twice, over both ranks together
        assert all(loader.epoch == epoch + 1 and loader.step == 0 for loader in ranks)
    assert seen[0] != seen[1]  # a new order each epoch


def test_global_loss_tokens_match_the_models_shifted_targets(synth):
    """The host-side count equals what the model's shift_targets leaves to train on, summed over
    every rank's micro-batches, across an epoch boundary."""
    from floe.model import IGNORE_INDEX, shift_targets

    _, ds = synth
    ranks = [StepLoader(ds, global_batch_size=8, micro_batch_size=2, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
    for _ in range(ranks[0].steps_per_epoch + 2):
        counted = [loader.global_loss_tokens() for loader in ranks]
        targets = sum(int((shift_targets(mb["labels"], mb["position_ids"]) != IGNORE_INDEX).sum())
                      for loader in ranks for mb in loader.next_step())
        assert counted == [targets, targets] and targets > 0


def test_examples_used_once_per_epoch_across_two_ranks(tmp_path, tok):
    records = [chat(("user", f"q{i % 10}"), ("assistant", f"a{i % 10}")) for i in range(64)]
    n = len(encode_examples(tok, [formats.parse_record(records[0])]).tokens)
    path = write_jsonl(tmp_path / "d.jsonl", records)
    _, ds = build_dataset(DataConfig(name="jsonl", paths=[path], seq_len=2 * n, cache_dir=str(tmp_path)), 0)
    assert ds.num_rows == 32  # every example has n tokens: two per row
    loaders = [StepLoader(ds, global_batch_size=8, micro_batch_size=2, dp_rank=r, dp_size=2, seed=0) for r in range(2)]
    used = {0: [], 1: []}
    for _ in range(loaders[0].steps_per_epoch):
        for r, loader in enumerate(loaders):
            used[r] += [m for row in loader.step_rows(loader.epoch, loader.step) for m in ds.row_examples(row)]
            loader.next_step()
    assert len(used[0]) == len(used[1]) == 32
    assert sorted(used[0] + used[1]) == list(range(64))


def test_world_size_invariance(synth):
    _, ds = synth
    one = StepLoader(ds, global_batch_size=8, micro_batch_size=4, dp_rank=0, dp_size=1, seed=9)
    four = [StepLoader(ds, global_batch_size=8, micro_batch_size=1, dp_rank=r, dp_size=4, seed=9) for r in range(4)]
    for _ in range(one.steps_per_epoch + 2):  # across the epoch boundary too
        whole = torch.cat([m["input_ids"] for m in one.next_step()])
        parts = torch.cat([m["input_ids"] for loader in four for m in loader.next_step()])
        assert torch.equal(whole, parts)


def test_state_dict_restores_exact_next_batch(synth):
    _, ds = synth
    a = StepLoader(ds, global_batch_size=8, micro_batch_size=4, seed=1)
    for _ in range(a.steps_per_epoch + 3):
        a.next_step()
    state = a.state_dict()
    assert state["epoch"] == 1 and state["step"] == 3
    assert all(isinstance(v, int) for v in state.values())
    expected = a.next_step()
    b = StepLoader(ds, global_batch_size=8, micro_batch_size=2, dp_rank=0, dp_size=1, seed=1)
    b.load_state_dict(json.loads(json.dumps(state)))
    got = b.next_step()
    for key in expected[0]:
        assert torch.equal(torch.cat([m[key] for m in expected]), torch.cat([m[key] for m in got]))
    with pytest.raises(ValueError, match="train.seed"):
        StepLoader(ds, global_batch_size=8, micro_batch_size=4, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="train.global_batch_size"):
        StepLoader(ds, global_batch_size=16, micro_batch_size=4, seed=1).load_state_dict(state)


# ---------------------------------------------------------------------------- through the model
def test_packed_row_logits_equal_each_example_alone(synth):
    from floe.config import PRESETS
    from floe.model import ArcticForCausalLM

    _, ds = synth
    r = next(r for r in range(ds.num_rows) if len(ds.row_examples(r)) >= 3 and ds.lengths[r] < ds.seq_len)
    b = ds.batch([r])
    # dropless, so a token's expert output cannot depend on which other tokens share the batch
    cfg = dataclasses.replace(PRESETS["tiny"], capacity_factor=None)
    torch.manual_seed(0)
    model = ArcticForCausalLM(cfg).eval()
    with torch.no_grad():
        packed = model(b["input_ids"], position_ids=b["position_ids"], attention_mask=b["attention_mask"]).logits
        pos = b["position_ids"][0]
        n = int(ds.lengths[r])
        starts = torch.nonzero(pos[:n] == 0).flatten().tolist() + [n]
        for a, z in zip(starts, starts[1:], strict=False):
            alone = model(b["input_ids"][:, a:z]).logits
            torch.testing.assert_close(packed[:, a:z], alone, rtol=1e-4, atol=1e-4)


# Lines that ended in a traceback or were read as something else (issue 24): raw bytes, the reason.
HOSTILE_LINES = [
    (b"null\n", formats.NOT_OBJECT),  # was skipped as a "blank line" even with data.strict=true
    (b'\xef\xbb\xbf{"prompt": "a", "completion": "b"}\n', formats.BOM),  # was "invalid JSON" at column 1
    (b'{"prompt": "a\\ud800b", "completion": "c"}\n', formats.SURROGATE),  # was SentencePiece's TypeError
    (b'{"prompt": "a", "completion": "\\udfffz"}\n', formats.SURROGATE),
    (b"[" * 200_000 + b"\n", formats.INVALID_JSON),  # was a RecursionError
]


def test_hostile_lines_are_bad_lines_with_path_and_line(tmp_path):
    good = json.dumps({"prompt": "Say hi", "completion": "hi"}).encode() + b"\n"
    paired = json.dumps({"prompt": "a \U0001F600 pair", "completion": "ok"}).encode() + b"\n"  # \ud83d\ude00: fine
    for i, (line, reason) in enumerate(HOSTILE_LINES):
        path = tmp_path / f"h{i}.jsonl"
        path.write_bytes((line if reason == formats.BOM else good) + paired + line)
        bad_line = 1 if reason == formats.BOM else 3
        with pytest.raises(ValueError, match=rf"^{path}:{bad_line}: {reason}"):
            build_dataset(DataConfig(name="jsonl", paths=[str(path)], cache_dir=str(tmp_path)), 0)
    lenient = tmp_path / "all.jsonl"
    lenient.write_bytes(good * 3 + paired + b"".join(line for line, _ in HOSTILE_LINES))
    _, ds = build_dataset(DataConfig(name="jsonl", paths=[str(lenient)], strict=False, cache_dir=str(tmp_path)), 0)
    assert ds.stats["skipped"] == {formats.BOM: 1, formats.INVALID_JSON: 1, formats.NOT_OBJECT: 1, formats.SURROGATE: 2}
    assert ds.stats["examples"] == 4


def test_no_carriage_returns_from_the_tokenising_bar_in_a_log_file(tmp_path, capfd):
    """A source big enough for the tokenising bar (4 chunks) writes no carriage-return redraws when
    stderr is not a terminal (a log file): they garble it into one long line."""
    from floe.data.dataset import CHUNK

    cfg = DataConfig(sources=["math"], num_examples=4 * CHUNK + 1, seq_len=256, cache_dir=str(tmp_path))
    build_dataset(cfg, 0)
    assert "\r" not in capfd.readouterr().err
