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
