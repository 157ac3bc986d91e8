"""Exact-match evaluation of a trained run: greedy replies to held-out questions.

    python tools/evaluate.py runs/tiny/default                          # the embedded held-out questions
    python tools/evaluate.py runs/tiny/default --data eval.jsonl --out runs/tiny/default/eval_predictions.jsonl

Each record is a chat ({"messages": [...]}: the prompt is every turn before the last assistant
turn, the reference that turn's content) or {"prompt", "completion"}; an optional "source" field
groups the summary (default: the file's name). A prediction matches exactly when it equals the
reference after stripping surrounding whitespace; `numeric_match` compares the last number of
each (null when the reference has none), the usual answer check for math. Writes one JSON line
per example (prompt, reference, prediction, exact_match, numeric_match, source) to --out
(default RUN_DIR/eval_predictions.jsonl), RUN_DIR/exact_match.json ({"exact_match": x,
"per_source": {...}, "numeric_match": {...}}, read by tools/compare.py), and prints a summary line.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from floe.data import synthetic
import floe.data.readers as readers
from floe.data.formats import BadRecord, iter_jsonl, parse_record
from floe.data.formats import where as where_in
from tools.generate import chat_for, load_model_for_inference, reply

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
HELDOUT_PER_SOURCE = 25


def last_number(text: str) -> float | None:
    found = NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def score(prediction: str, reference: str) -> dict:
    """exact_match (after stripping whitespace) and numeric_match (None: no number in the reference)."""
    ref_num = last_number(reference)
    return {"exact_match": prediction.strip() == reference.strip(),
            "numeric_match": None if ref_num is None else last_number(prediction) == ref_num}


def split_record(obj, where: str) -> tuple[tuple, str]:
    """(prompt turns, reference) of one record; ValueError naming `where` when it has no reply to check."""
    try:
        example = parse_record(obj)
    except BadRecord as e:
        raise ValueError(f"{where}: {e}") from None
    last = max((i for i, (role, _) in enumerate(example) if role == "assistant"), default=None)
    if last is None:
        raise ValueError(f"{where}: no assistant turn to compare with (plain text cannot be evaluated)")
    if last == 0:
        raise ValueError(f"{where}: nothing before the assistant turn to prompt with")
    return example[:last], example[last][1]


def read_eval_records(path: str) -> list[dict]:
    """[{prompt turns, reference, source}] from a JSONL file; every bad line named in one ValueError."""
    default_source = os.path.splitext(os.path.basename(path))[0]
    items, errors = [], []
    if not os.path.exists(path):
        raise ValueError(f"--data: {path} does not exist")
    kind = readers.kind_of(path)  # any file kind and record layout training reads
    for line_no, obj in readers.iter_file(path, kind, iter_jsonl):
        where = where_in(path, readers.unit(kind), line_no)
        if obj is None:
            continue  # blank line
        try:
            if isinstance(obj, BadRecord):
                raise ValueError(f"{where}: {obj}")
            turns, reference = split_record(obj, where)
        except ValueError as e:
            errors.append(str(e))
            continue
        items.append({"turns": turns, "reference": reference, "source": str(obj.get("source", default_source))})
    if errors:
        raise ValueError("\n".join(errors))
    if not items:
        raise ValueError(f"--data: {path} has no records")
    return items


def heldout_items(num_per_source: int, seed: int) -> list[dict]:
    return [{"turns": (("user", r["prompt"]),), "reference": r["completion"], "source": r["source"]}
            for r in synthetic.heldout_records(num_per_source, seed)]


def summarize(rows: list[dict]) -> dict:
    """{"exact_match": overall, "per_source": {...}, "numeric_match": {source: x}} (mean over examples)."""
    by_source = defaultdict(list)
    for r in rows:
        by_source[r["source"]].append(r)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    numeric = {s: mean([r["numeric_match"] for r in rs if r["numeric_match"] is not None])
               for s, rs in sorted(by_source.items()) if any(r["numeric_match"] is not None for r in rs)}
    return {"exact_match": mean([r["exact_match"] for r in rows]),
            "per_source": {s: mean([r["exact_match"] for r in rs]) for s, rs in sorted(by_source.items())},
            "numeric_match": numeric, "num_examples": len(rows)}


def evaluate(model, tokenizer, items: list[dict], batch_size: int = 16, max_new_tokens: int = 128,
             chat=None) -> list[dict]:
    """One row per item: prompt (rendered turns), reference, prediction, scores, source. `chat`: how the
    model's conversations are written (tools/generate.py's Chat; default floe's ChatML)."""
    rows = []
    for i in range(0, len(items), batch_size):
        batch = items[i:i + batch_size]
        predictions = reply(model, tokenizer, [it["turns"] for it in batch], max_new_tokens, chat)
        for it, pred in zip(batch, predictions, strict=True):
            prompt = it["turns"][-1][1] if len(it["turns"]) == 1 else [list(t) for t in it["turns"]]
            rows.append({"prompt": prompt, "reference": it["reference"], "prediction": pred,
                         **score(pred, it["reference"]), "source": it["source"]})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run dir (its latest checkpoint) or an HF export dir")
    p.add_argument("--data", help="records with an assistant reply to check, in any layout and file kind training "
                   "reads (JSONL, JSON array, Parquet, ...; default: the embedded held-out questions)")
    p.add_argument("--out", help="per-example JSONL (default: RUN_DIR/eval_predictions.jsonl)")
    p.add_argument("--num-per-source", type=int, default=HELDOUT_PER_SOURCE, help="embedded questions per source")
    p.add_argument("--seed", type=int, default=0, help="which embedded held-out questions")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    args = p.parse_args(argv)
    try:
        items = read_eval_records(args.data) if args.data else heldout_items(args.num_per_source, args.seed)
        model, tokenizer = load_model_for_inference(args.run_dir)
        rows = evaluate(model, tokenizer, items, args.batch_size, args.max_new_tokens,
                        chat_for(args.run_dir, tokenizer))
    except ValueError as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.run_dir, "eval_predictions.jsonl")
    with open(out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    summary = summarize(rows)
    with open(os.path.join(args.run_dir, "exact_match.json"), "w") as f:
        json.dump(summary, f, indent=1)
    per = " ".join(f"{s}={v:.3f}" for s, v in summary["per_source"].items())
    num = " ".join(f"{s}={v:.3f}" for s, v in summary["numeric_match"].items())
    print(f"exact_match={summary['exact_match']:.3f} ({per}) numeric_match: {num or 'n/a'} "
          f"[{len(rows)} examples, predictions in {out}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
