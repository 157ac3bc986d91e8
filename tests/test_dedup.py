"""tools/dedup.py: exact and MinHash near-duplicate removal with per-source counts."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import dedup  # noqa: E402

VOCAB = [f"w{i}" for i in range(2000)]


def jaccard(a: str, b: str, n: int = 3) -> float:
    sa, sb = dedup.shingles(dedup.normalise(a), n), dedup.shingles(dedup.normalise(b), n)
    return len(sa & sb) / len(sa | sb)


def test_normalise_and_record_text():
    assert dedup.normalise("Hello,  WORLD!\nFoo-bar") == ["hello", "world", "foo", "bar"]
    assert dedup.record_text({"prompt": "a", "completion": "b"}) == "a\nb"
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    assert dedup.record_text({"messages": messages}) == "x\ny"
    assert dedup.record_text({"foo": 1}) is None and dedup.record_text([1]) is None


def test_dedup_removes_near_duplicates_keeps_distinct(tmp_path):
    rng = random.Random(0)
    base = [" ".join(rng.choice(VOCAB) for _ in range(60)) for _ in range(40)]
    near, far = [], []
    for t in base[:10]:
        w = t.split()
        w[30] = "changed"  # one word of 60: 3 of 58 shingles differ
        near.append(" ".join(w))
        w = t.split()
        for i in range(0, 60, 2):  # every other word: no shingle survives
            w[i] = rng.choice(VOCAB)
        far.append(" ".join(w))
    for a, b, c in zip(base, near, far, strict=False):
        assert jaccard(a, b) > 0.85 and jaccard(a, c) < 0.1  # independent check of the cases
    src1 = tmp_path / "one.jsonl"
    src2 = tmp_path / "two.jsonl"
    src1.write_text("".join(json.dumps({"text": t}) + "\n" for t in base)
                    + json.dumps({"text": base[0].upper() + " !"}) + "\n"  # exact after normalising
                    + "not json\n")
    src2.write_text("".join(json.dumps({"prompt": "", "completion": t}) + "\n" for t in near + far)
                    + json.dumps({"text": base[5]}) + "\n")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(Path(dedup.__file__)), str(src1), str(src2),
                             "--out-dir", str(out), "--threshold", "0.7", "--no-progress"],
                            capture_output=True, text=True, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report[str(src1)] == {"rows": 42, "kept": 41, "exact": 1, "near": 0, "kept_unparsed": 1}
    assert report[str(src2)] == {"rows": 21, "kept": 10, "exact": 1, "near": 10, "kept_unparsed": 0}
    kept2 = [json.loads(line)["completion"] for line in (out / "two.jsonl").read_text().splitlines()]
    assert kept2 == far
    assert (out / "one.jsonl").read_text().splitlines()[-1] == "not json"


def test_threshold_boundary():
    rng = random.Random(1)
    words = [rng.choice(VOCAB) for _ in range(100)]
    a = " ".join(words)
    b = " ".join(words[:50] + [rng.choice(VOCAB) for _ in range(50)])  # about half the shingles shared
    j = jaccard(a, b)
    assert 0.3 < j < 0.6
    strict = dedup.Deduper(threshold=0.7)
    assert strict.check(a) is None and strict.check(b) is None  # below 0.7: both kept
    loose = dedup.Deduper(threshold=0.25)
    assert loose.check(a) is None and loose.check(b) == "near"


def test_dedup_reads_every_layout_and_kind_training_reads(tmp_path):
    """ShareGPT JSONL (the issue's case: nothing was deduplicated), an Alpaca JSON array, Parquet and a
    datasets directory: duplicates found by the text training renders, kept rows written in the input's kind."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from floe.data.formats import read_files

    share = [{"conversations": [{"from": "human", "value": f"Tell me fact number {i % 5} about owls"},
                                {"from": "gpt", "value": f"Owls fact {i % 5}: they hunt at night"}]} for i in range(10)]
    alpaca = [{"instruction": f"Tell me fact number {i} about owls", "input": "", "output": f"Owls fact {i}: they hunt "
               "at night"} for i in range(5, 9)]
    (tmp_path / "share.jsonl").write_text("".join(json.dumps(r) + "\n" for r in share))
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca))
    pq.write_table(pa.Table.from_pylist(share), tmp_path / "share.parquet")
    new = {"instruction": "Name a bird that swims", "input": "", "output": "A penguin swims."}
    datasets.Dataset.from_list(alpaca + [new]).save_to_disk(str(tmp_path / "saved"))
    inputs = [str(tmp_path / n) for n in ("share.jsonl", "alpaca.json", "share.parquet", "saved")]
    report = dedup.dedup_files(inputs, str(tmp_path / "out"), dedup.Deduper(), progress=False)
    assert [report[p]["kept"] for p in inputs] == [5, 4, 0, 1]
    assert report[inputs[0]] == {"rows": 10, "kept": 5, "exact": 5, "near": 0, "kept_unparsed": 0}
    assert report[inputs[2]]["exact"] == 10 and report[inputs[3]]["exact"] == 4  # same text as the first two
    for name, n in (("share.jsonl", 5), ("alpaca.json", 4), ("share.parquet", 0), ("saved", 1)):
        assert len(read_files([str(tmp_path / "out" / name)], strict=True).examples) == n, name


def test_dedup_bad_input_exits_2_without_a_traceback(tmp_path):
    out = subprocess.run([sys.executable, "tools/dedup.py", str(tmp_path / "missing.jsonl"), "--out-dir",
                          str(tmp_path / "o"), "--format", "chatml"], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("floe: data.format must be one of") and "missing.jsonl: no such file" in out.stderr
