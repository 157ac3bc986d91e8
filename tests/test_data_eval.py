"""floe.data: the held-out split, eval batches, the dataset fingerprint, cache checksums, the rows check."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
from collections import Counter

import numpy as np
import pytest
import torch

from floe.data import (
    DataConfig,
    Tokenizer,
    build_dataset,
    build_eval_dataset,
    check_enough_rows,
    eval_micro_batches,
    formats,
    synthetic,
)
from floe.data.template import encode_examples


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def segments(ds):
    """[(source index, tokens bytes, trained bytes)] of every packed example, read from the rows."""
    out = []
    for r in range(ds.num_rows):
        n = int(ds.lengths[r])
        starts = np.flatnonzero(ds.position[r, :n] == 0).tolist() + [n]
        for k, (a, z) in enumerate(zip(starts, starts[1:], strict=False)):
            src = int(ds.seg_source[ds.seg_offsets[r] + k])
            out.append((src, ds.tokens[r, a:z].astype(np.int64).tobytes(), ds.trained[r, a:z].astype(bool).tobytes()))
    return out


def content_hash(tokens: bytes, trained: bytes) -> str:
    return hashlib.sha256(tokens + b"|" + trained).hexdigest()


def encoded_hash(tok, record) -> str:
    ids, trained = encode_examples(tok, [formats.parse_record(record)]).example(0)
    return content_hash(ids.astype(np.int64).tobytes(), trained.astype(bool).tobytes())


def rows_text(tok, ds) -> str:
    return "\n".join(tok.decode(ds.tokens[r, :ds.lengths[r]].tolist()) for r in range(ds.num_rows))


# ---------------------------------------------------------------------------- jsonl split
def test_jsonl_split_is_disjoint_complete_and_stable(tmp_path, tok):
    math_recs = [chat(f"What is {i} plus {i + 1}?", f"{2 * i + 1}") for i in range(200)]
    code_recs = [{"prompt": f"Name item {i}.", "completion": f"item-{i}"} for i in range(120)]
    math_recs += math_recs[:15]  # duplicates must land on one side together
    paths = [write_jsonl(tmp_path / "math.jsonl", math_recs), write_jsonl(tmp_path / "code.jsonl", code_recs)]
    cfg = DataConfig(name="jsonl", paths=paths, seq_len=64, eval_fraction=0.25, cache_dir=str(tmp_path / "c"))
    _, train = build_dataset(cfg, seed=4)
    ev = build_eval_dataset(cfg, seed=4)
    assert ev.source_names == paths and ev.source_labels == ["math", "code"]

    train_segs, eval_segs = segments(train), segments(ev)
    train_h = {content_hash(t, m) for _, t, m in train_segs}
    eval_h = Counter(content_hash(t, m) for _, t, m in eval_segs)
    assert not train_h & set(eval_h)  # no example text on both sides
    # every input record is on exactly one side, and eval rows are exactly the held-out records, each once
    by_source = [[encoded_hash(tok, r) for r in recs] for recs in (math_recs, code_recs)]
    expect_eval = Counter(h for hs in by_source for h in hs if h not in train_h)
    assert eval_h == expect_eval
    assert Counter(content_hash(t, m) for _, t, m in train_segs) == \
        Counter(h for hs in by_source for h in hs if h in train_h)
    for src, t, m in eval_segs:  # each eval segment carries the source it came from
        assert content_hash(t, m) in by_source[src]
    held = sum(expect_eval.values())
    assert 0.12 * 335 < held < 0.38 * 335  # binomial(335, 0.25) stays well inside this
    assert train.stats["held_out"] == held and ev.stats["examples"] == held

    # deterministic, and stable when other examples change: a rebuilt, edited source keeps every
    # surviving example on its side
    _, again = build_dataset(dataclasses.replace(cfg, cache_dir=str(tmp_path / "c2")), seed=4)
    assert again.fingerprint == train.fingerprint and not again.cache_hit
    edited = math_recs[50:] + [chat(f"new {i}", "x") for i in range(40)]
    write_jsonl(tmp_path / "math.jsonl", edited)
    ev2 = build_eval_dataset(cfg, seed=4)
    eval2 = {content_hash(t, m) for s, t, m in segments(ev2) if s == 0}
    for r in math_recs[50:]:
        h = encoded_hash(tok, r)
        assert (h in eval2) == (h in eval_h)
    _, other_seed = build_dataset(cfg, seed=5)
    assert other_seed.stats["held_out"] != train.stats["held_out"] or other_seed.fingerprint != train.fingerprint


def test_eval_config_errors(tmp_path):
    with pytest.raises(ValueError) as e:
        DataConfig(eval_fraction=1.5, seq_len=1)
    assert "data.eval_fraction must be a number in [0, 1)" in str(e.value) and "data.seq_len" in str(e.value)
    with pytest.raises(ValueError, match="data.eval_fraction and data.eval_paths both set"):
        DataConfig(eval_fraction=0.1, eval_paths=["x.jsonl"])
    assert DataConfig().has_eval is False and build_eval_dataset(DataConfig(), 0) is None
    path = write_jsonl(tmp_path / "one.jsonl", [chat("q", "a")])
    with pytest.raises(ValueError, match=r"holds out none of the 1 usable examples of data.paths\[0\]"):
        build_eval_dataset(DataConfig(name="jsonl", paths=[path], eval_fraction=1e-9, cache_dir=str(tmp_path)), 0)
    with pytest.raises(ValueError, match=r"data.eval_paths\[0\]: no file matches"):
        build_eval_dataset(DataConfig(eval_paths=[str(tmp_path / "missing.jsonl")], cache_dir=str(tmp_path)), 0)


def test_eval_paths_and_micro_batches_over_two_ranks(tmp_path, tok):
    a = write_jsonl(tmp_path / "ea.jsonl", [chat(f"qa{i}", f"answer a{i}") for i in range(23)])
    b = write_jsonl(tmp_path / "eb.jsonl", [{"prompt": f"qb{i}", "completion": f"b{i}"} for i in range(9)])
    cfg = DataConfig(seq_len=48, num_examples=200, eval_paths=[a, b], cache_dir=str(tmp_path))
    ev = build_eval_dataset(cfg, 0)
    assert ev.stats["examples"] == 32 and ev.num_rows >= 5
    _, train_plain = build_dataset(DataConfig(seq_len=48, num_examples=200, cache_dir=str(tmp_path / "x")), 0)
    _, train = build_dataset(cfg, 0)
    assert train.fingerprint == train_plain.fingerprint  # eval files do not touch the training rows

    m = 2
    per_rank = [list(eval_micro_batches(ev, m, dp_rank=r, dp_size=2)) for r in range(2)]
    want = math.ceil(math.ceil(ev.num_rows / 2) / m)
    assert len(per_rank[0]) == len(per_rank[1]) == want  # matched collectives on every rank
    seen = Counter()
    for r in range(2):
        for mb in per_rank[r]:
            assert all(mb[k].shape == (m, 48) for k in mb)
            for i in range(m):
                ids = mb["input_ids"][i]
                match = [row for row in range(ev.num_rows) if torch.equal(torch.from_numpy(
                    ev.tokens[row].astype(np.int64)), ids)]
                if not mb["attention_mask"][i].any():  # a filler row: nothing to score
                    assert (mb["labels"][i] == -100).all() and (mb["source_ids"][i] == -1).all()
                    continue
                assert len(match) == 1
                row = match[0]
                seen[row] += 1
                # naive per-token source: walk the row's segments by position restarts
                n, k, naive = int(ev.lengths[row]), -1, []
                for t in range(48):
                    if t < n and ev.position[row, t] == 0:
                        k += 1
                    naive.append(int(ev.seg_source[ev.seg_offsets[row] + k]) if t < n else -1)
                assert mb["source_ids"][i].tolist() == naive
    assert seen == Counter(range(ev.num_rows))  # every eval row exactly once over both ranks
    text = rows_text(tok, ev)
    assert all(f"user\nqa{i}<|im_end|>" in text for i in range(23))


# ---------------------------------------------------------------------------- embedded held-out questions
FACT = re.compile(r"(\d+) ([-+*/]) (\d+) = ")


def test_embedded_heldout_questions_never_in_training(tmp_path, tok):
    _, train = build_dataset(DataConfig(num_examples=4000, seq_len=256, cache_dir=str(tmp_path)), seed=0)
    text = rows_text(tok, train)
    train_facts = set()
    for x, op, y in FACT.findall(text):
        train_facts.add((x, op, y))
        if op in "+*":
            train_facts.add((y, op, x))
    held = synthetic.heldout_records(40, seed=0)
    assert Counter(r["source"] for r in held) == {s: 40 for s in synthetic.SOURCES}
    for r in held:
        assert formats.parse_record(r)  # a valid prompt/completion record
        assert f"<|im_start|>user\n{r['prompt']}<|im_end|>" not in text, r
    arithmetic = [r for r in held if r["source"] == "math"]
    for r in arithmetic:  # the held-out fact(s): a two-step problem may also use a trained one
        facts = FACT.findall(r["completion"])
        assert facts and any(f not in train_facts for f in facts), r
    two_operand = [r for r in arithmetic if len(FACT.findall(r["completion"])) == 1]
    assert len(two_operand) >= 25  # 5 of the 6 kinds are two-operand
    assert all(FACT.findall(r["completion"])[0] not in train_facts for r in two_operand)
    # identity: other paraphrases of the same intents; every intent's answer is still trained
    identity = [r for r in held if r["source"] == "identity"]
    assert len({r["prompt"] for r in identity}) > 20
    assert all(r["completion"] in text for r in identity)
    # held-out sets of other seeds are held out too (the split does not depend on the seed)
    for r in synthetic.heldout_records(10, seed=7, sources=["identity"]):
        assert f"<|im_start|>user\n{r['prompt']}<|im_end|>" not in text
    # and the held-out share of the identity paraphrases is about HELDOUT_SHARE
    qs = synthetic.identity_questions()
    share = sum(synthetic.is_heldout_key("identity", q) for q, _ in qs) / len(qs)
    assert 0.05 < share < 0.16


def test_embedded_eval_rows_are_exactly_the_heldout_examples(tmp_path, tok):
    cfg = DataConfig(num_examples=800, seq_len=128, eval_fraction=0.05, cache_dir=str(tmp_path))
    ev = build_eval_dataset(cfg, seed=2)
    n = round(0.05 * 200)
    assert ev.source_names == list(synthetic.SOURCES) and ev.stats["examples"] == 4 * n
    got = Counter((s, content_hash(t, m)) for s, t, m in segments(ev))
    want = Counter((i, encoded_hash(tok, r)) for i, s in enumerate(synthetic.SOURCES)
                   for r in synthetic.generate(s, n, 2, split="eval"))
    assert got == want
    _, train = build_dataset(cfg, seed=2)
    assert not {h for _, h in got} & {content_hash(t, m) for _, t, m in segments(train)}
    _, without = build_dataset(dataclasses.replace(cfg, eval_fraction=0.0), seed=2)
    assert without.fingerprint == train.fingerprint  # the embedded training rows never hold eval questions


# ---------------------------------------------------------------------------- fingerprint and checksums
def test_fingerprint_tracks_content_not_row_count(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [chat(f"q{i}", f"a{i}") for i in range(60)])
    cfg = DataConfig(name="jsonl", paths=[str(path)], seq_len=64, cache_dir=str(tmp_path / "c"))
    _, a = build_dataset(cfg, 0)
    meta = json.loads((tmp_path / "c" / "data" / a.path.split("/")[-1] / "meta.json").read_text())
    assert meta["fingerprint"] == a.fingerprint and len(a.fingerprint) == 64
    write_jsonl(path, [chat(f"q{i}", f"b{i}") for i in range(60)])  # same lengths, other tokens
    _, b = build_dataset(cfg, 0)
    assert b.num_rows == a.num_rows and not np.array_equal(a.tokens, b.tokens)
    assert b.fingerprint != a.fingerprint
    _, c = build_dataset(dataclasses.replace(cfg, cache_dir=str(tmp_path / "other")), 0)
    assert c.fingerprint == b.fingerprint  # the same rows built anew


def test_corrupted_cache_file_is_detected_and_rebuilt(tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(f"q{i}", f"a{i}") for i in range(40)])
    cfg = DataConfig(name="jsonl", paths=[path], seq_len=64, cache_dir=str(tmp_path / "c"))
    _, ds = build_dataset(cfg, 0)
    tokens, entry = np.array(ds.tokens), ds.path
    del ds
    f = f"{entry}/tokens.npy"
    with open(f, "r+b") as fh:  # flip one byte of the data (not the header)
        fh.seek(-3, 2)
        byte = fh.read(1)
        fh.seek(-3, 2)
        fh.write(bytes([byte[0] ^ 0x01]))
    with caplog.at_level(logging.WARNING, logger="floe.data"):
        _, again = build_dataset(cfg, 0)
    assert f"cache check failed, rebuilding: {f}: sha256" in caplog.text
    assert not again.cache_hit and np.array_equal(again.tokens, tokens)
    _, third = build_dataset(cfg, 0)
    assert third.cache_hit  # the rebuilt entry verifies
    caplog.clear()
    (tmp_path / "c" / "data" / entry.split("/")[-1] / "meta.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="floe.data"):
        _, fourth = build_dataset(cfg, 0)
    assert "meta.json: unreadable" in caplog.text and not fourth.cache_hit
    assert fourth.fingerprint == third.fingerprint


# ---------------------------------------------------------------------------- too few rows
def test_check_enough_rows_names_the_numbers_and_fix(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(f"q{i}", f"a{i}") for i in range(30)])
    _, ds = build_dataset(DataConfig(name="jsonl", paths=[path], seq_len=64, cache_dir=str(tmp_path)), 0)
    R = ds.num_rows
    check_enough_rows(ds, R)  # exactly one global batch is enough
    with pytest.raises(ValueError) as e:
        check_enough_rows(ds, 4 * R)
    msg = str(e.value)
    need = math.ceil(30 * 4 * R / R)  # 30 examples fill R rows; 4R rows need 4x as many
    assert f"packs into {R} rows of data.seq_len=64 tokens (30 examples)" in msg
    assert f"train.global_batch_size={4 * R}" in msg and f"at most {R}" in msg
    assert f"data.num_examples={need}" in msg
