"""Benchmark: Magpie's generation throughput at batch 1 and 32, and how many of its questions are on topic.

    python tools/bench_magpie.py runs/magpie_src --num 64          # a model trained with data.loss_on=all

Runs tools/magpie.py on MODEL once per --batch-sizes entry (a fresh output file each, the same seed)
and reports its generated tokens per second (questions and answers; every sampled token counts, the
rejected ones too) and its filter counts. Then sorts the questions of the largest batch's file by
the embedded source they resemble: the source whose training questions (moe/data/synthetic.py,
--reference-examples per source) hold the question's nearest neighbour by word-set Jaccard, when that
similarity reaches --threshold; below it the question is "other". Reported: the share of the kept
questions that are of the mix's kinds, and the share of all sampled questions (kept or rejected by a
question filter) that were kept and are of the mix's kinds.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from floe.data import synthetic

_WORD = re.compile(r"[a-z]+|\d+")


def words(text: str) -> frozenset[str]:
    # numbers are one class: "What is 3 + 4?" and "What is 51 + 9?" are the same kind of question
    return frozenset("#" if w.isdigit() else w for w in _WORD.findall(text.lower()))


def reference_questions(num: int) -> dict[str, list[frozenset[str]]]:
    """Word sets of the first user turn of `num` training records per embedded source."""
    out = {}
    for source in synthetic.SOURCES:
        qs = [next(m["content"] for m in r["messages"] if m["role"] == "user")
              for r in synthetic.generate(source, num, seed=0)]
        out[source] = list({words(q) for q in qs})
    return out


def kind_of(question: str, refs: dict[str, list[frozenset[str]]], threshold: float) -> str:
    q = words(question)
    best, best_sim = "other", 0.0
    for source, sets in refs.items():
        for s in sets:
            sim = len(q & s) / max(len(q | s), 1)
            if sim > best_sim:
                best, best_sim = source, sim
    return best if best_sim >= threshold else "other"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--num", type=int, default=64, help="conversations per batch size")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--reference-examples", type=int, default=2000)
    p.add_argument("--keep", help="copy the largest batch's output here")
    args = p.parse_args(argv)
    from tools import magpie

    results, out = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for b in [int(x) for x in args.batch_sizes.split(",")]:
            out = os.path.join(tmp, f"b{b}.jsonl")
            num = min(args.num, 8 * b)  # batch 1 is slow: a few conversations measure its rate
            t0 = time.perf_counter()
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                magpie.main([args.model, "--num", str(num), "--out", out, "--batch-size", str(b),
                             "--seed", str(args.seed)])
            summary = json.loads(buf.getvalue().strip().splitlines()[-1])
            summary["wall_s"] = round(time.perf_counter() - t0, 1)
            results[f"batch_{b}"] = summary
        with open(out) as f:
            questions = [json.loads(line)["messages"][0]["content"] for line in f]
        if args.keep:
            with open(out) as src, open(args.keep, "w") as dst:
                dst.write(src.read())
    refs = reference_questions(args.reference_examples)
    kinds = Counter(kind_of(q, refs, args.threshold) for q in questions)
    last = results[f"batch_{args.batch_sizes.split(',')[-1]}"]
    # every sampled question: the kept ones and those the question filters rejected (answer rejects count
    # as kept questions: the question itself passed)
    sampled = len(questions) + sum(n for reason, n in last["rejected"].items() if not reason.startswith("answer"))
    on_topic = len(questions) - kinds["other"]
    results["questions_kept"] = len(questions)
    results["questions_sampled"] = sampled
    results["kinds"] = dict(kinds)
    results["share_of_kept_of_mix_kinds"] = round(on_topic / len(questions), 3) if questions else None
    results["share_of_sampled_kept_and_of_mix_kinds"] = round(on_topic / sampled, 3) if sampled else None
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
