"""Preference pairs from the embedded synthetic sources: chosen = the right answer, rejected = a wrong one.

    python tools/synthetic_pairs.py --num 4000 --out pairs.jsonl                 # training pairs
    python tools/synthetic_pairs.py --num 200 --out pairs_eval.jsonl --split eval  # held-out questions
    python launch/train.py data=preference data.paths=[pairs.jsonl] data.eval_paths=[pairs_eval.jsonl] \
        train.objective=dpo train.init_from=<an SFT model exported with tools/export.py>

Wrong answers, per source: `math`, the final result changed by a non-zero offset (in the
equation and in "The answer is N."), so the rejected answer reads like the right one with a wrong
sum; `identity`, the answer to another question about the model. The `eval` split draws from the
questions training never sees (moe/data/synthetic.py), so held-out reward accuracy measures
whether the preference generalises. Output: {"prompt": [messages], "chosen": [assistant],
"rejected": [assistant]} lines (TRL's conversational layout, data=preference).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from floe.data import synthetic

SOURCES = ("math", "identity")
_ANSWER = re.compile(r"The answer is (-?\d+)\.$")


def wrong_math(answer: str, rng: random.Random) -> str | None:
    """The answer with its final result N replaced by N + d (d != 0) wherever it is stated as a result."""
    m = _ANSWER.search(answer)
    if m is None:
        return None
    right = m.group(1)
    wrong = str(int(right) + rng.choice([d for d in range(-9, 10) if d]))
    return re.sub(rf"= {right}(\n|\.|$)", rf"= {wrong}\1", answer[:m.start()]) + f"The answer is {wrong}."


def wrong_identity(answer: str, rng: random.Random) -> str | None:
    answers = sorted({a for _, a in synthetic._IDENTITY.values()})
    if answer not in answers:
        return None
    return rng.choice([a for a in answers if a != answer])


WRONG = {"math": wrong_math, "identity": wrong_identity}


def pairs(source: str, num: int, seed: int, split: str) -> list[dict]:
    """`num` pairs from `source`: the records' last assistant turn and a wrong replacement of it."""
    rng = random.Random(f"floe:pairs:{source}:{seed}:{split}")
    out = []
    for record in synthetic.generate(source, 2 * num + 10, seed, split):
        messages = record["messages"]
        wrong = WRONG[source](messages[-1]["content"], rng)
        if wrong is not None:
            out.append({"prompt": messages[:-1], "chosen": [messages[-1]],
                        "rejected": [{"role": "assistant", "content": wrong}]})
        if len(out) == num:
            return out
    raise RuntimeError(f"{source}: fewer than {num} usable records in {2 * num + 10} draws")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, required=True, help="pairs per source")
    p.add_argument("--out", required=True)
    p.add_argument("--split", choices=("train", "eval"), default="train")
    p.add_argument("--sources", default=",".join(SOURCES), help=f"comma-separated, of {', '.join(SOURCES)}")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    sources = args.sources.split(",")
    if bad := [s for s in sources if s not in SOURCES]:
        p.error(f"--sources: unknown {bad}; known: {', '.join(SOURCES)}")
    if args.num < 1:
        p.error("--num must be >= 1")
    rows = [r for s in sources for r in pairs(s, args.num, args.seed, args.split)]
    random.Random(args.seed).shuffle(rows)
    with open(args.out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(json.dumps({"pairs": len(rows), "out": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
