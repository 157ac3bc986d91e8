"""Magpie: synthetic instruction data from an aligned model and nothing but its chat template.

    python tools/magpie.py runs/tiny/my_run --num 1000 --out synth.jsonl [--seed 0] [--batch-size 32]
    python launch/train.py data=jsonl data.paths=[synth.jsonl]      # train on it
    python tools/dedup.py synth.jsonl --out-dir deduped/             # or deduplicate it first

For each batch: sample from the bare user prefix `<|im_start|>user\\n` until the end of the turn
(<|im_end|>): that is a question the model thinks a user would ask. Then the same model answers it
as in a chat (tools/generate.py's prompt). Kept pairs are appended to --out as chat JSONL, one
{"messages": [user, assistant]} per line, the form data=jsonl trains on.

Filters (counted in the summary): an empty question or answer, a truncated one (no end of turn
within --max-question-tokens / --max-answer-tokens), a question that holds template markers, and
a repeated question (the same text, normalised, as one already in --out or earlier in the run).

Resumable: --out is appended to and never rewritten; a torn last line (a killed run) is cut off;
the lines already there count towards --num and their questions towards the repeat filter. The
sampling seed of batch k is (--seed, k), and k is kept in <out>.state.json beside the output, so a
resumed run draws new batches rather than the ones it already wrote.

Which models suit Magpie: only one that has learned what users ask. A model trained with
completion-only loss (data.loss_on=assistant, the default) never had a user turn as a target, so
from the bare user prefix it writes noise or an answer; train with data.loss_on=all (README, Magpie).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import unicodedata
from collections import Counter

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from floe.generate import generate
from tools.generate import chat_for, chat_prompt_ids, load_model_for_inference

MARKERS = ("<|im_start|>", "<|im_end|>")
EMPTY, TRUNCATED, MARKER, REPEATED = "empty", "truncated", "template markers", "repeated question"


def normalise(text: str) -> str:
    """The key of the repeat filter: NFKC, lower case, whitespace collapsed."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).lower()).strip()


def read_existing(path: str) -> list[str]:
    """Questions of the complete lines already in `path`; a torn last line is cut off the file."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # a run killed mid-write: drop the partial line
        with open(path, "r+b") as f:
            f.truncate(end)
    questions = []
    for lineno, line in enumerate(data[:end].splitlines(), start=1):
        try:
            questions.append(json.loads(line)["messages"][0]["content"])
        except (ValueError, KeyError, IndexError, TypeError):
            raise ValueError(f"{path}:{lineno}: not a Magpie line (chat JSONL); give a new --out") from None
    return questions


def check(text_ids: list[int], limit: int, text: str) -> str | None:
    """Why a generated question or answer is rejected, or None. A row of exactly `limit` new tokens
    never met <|im_end|> (generate cuts the stop sequence off the rows that met it)."""
    if len(text_ids) >= limit:
        return TRUNCATED
    if not text.strip():
        return EMPTY
    if any(m in text for m in MARKERS):
        return MARKER
    return None


def sample_batch(model, tok, args, k: int, seen: set[str], rejected: Counter) -> tuple[list[dict], int]:
    """Batch k: questions from the bare user prefix, then answers; (kept records, tokens generated)."""
    prefix = tok.im_start + tok.encode("user\n")
    sampling = dict(temperature=args.temperature, top_p=args.top_p, pad_id=tok.pad_id, stop=tok.im_end)
    q_ids = generate(model, [prefix] * args.batch_size, args.max_question_tokens, seed=args.seed * 1_000_003 + k,
                     **sampling)
    questions = []
    for ids in q_ids:
        text = tok.decode(ids)
        reason = check(ids, args.max_question_tokens, text)
        if reason is None and normalise(text) in seen:
            reason = REPEATED
        if reason:
            rejected[reason] += 1
            continue
        seen.add(normalise(text))
        questions.append(text.strip())
    if not questions:
        return [], sum(map(len, q_ids))
    prompts = [chat_prompt_ids(tok, [("user", q)]) for q in questions]
    answers = generate(model, prompts, args.max_answer_tokens, seed=args.seed * 1_000_003 + k + 500_000_003,
                       **{**sampling, "temperature": args.answer_temperature})
    records = []
    for q, ids in zip(questions, answers, strict=True):
        text = tok.decode(ids)
        reason = check(ids, args.max_answer_tokens, text)
        if reason:
            rejected[f"answer {reason}"] += 1
            continue
        records.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": text.strip()}]})
    return records, sum(map(len, q_ids)) + sum(map(len, answers))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a run dir (its latest checkpoint), a checkpoint dir, or an HF export dir")
    p.add_argument("--num", type=int, required=True, help="conversations wanted in --out (lines already there count)")
    p.add_argument("--out", required=True, help="chat JSONL, appended to")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0, help="for the questions (Magpie samples them)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--answer-temperature", type=float, default=0.0, help="for the answers; 0 = greedy")
    p.add_argument("--max-question-tokens", type=int, default=128)
    p.add_argument("--max-answer-tokens", type=int, default=256)
    p.add_argument("--max-batches", type=int, default=None,
                   help="stop after this many batches in this run (default: 10 * num / batch-size + 10)")
    args = p.parse_args(argv)
    errors = [f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}"
              for k in ("num", "batch_size", "max_question_tokens", "max_answer_tokens") if getattr(args, k) < 1]
    if args.temperature <= 0:
        errors.append(f"--temperature must be > 0 (greedy sampling would ask one question), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        errors.append(f"--top-p must be in (0, 1], got {args.top_p}")
    if errors:
        p.error("; ".join(errors))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    try:
        existing = read_existing(args.out)
    except ValueError as e:
        print(f"magpie: {e}", file=sys.stderr)
        return 2
    state_path = args.out + ".state.json"
    k = 0
    if existing and os.path.exists(state_path):
        with open(state_path) as f:
            k = int(json.load(f)["batches"])
    try:
        model, tok = load_model_for_inference(args.model)
        if chat_for(args.model, tok).template is not None:
            raise ValueError(f"{args.model} trained with its own chat template (data.chat_template); Magpie here "
                             "samples from floe's ChatML user prefix only, which that model never saw")
    except ValueError as e:
        print(f"magpie: {e}", file=sys.stderr)
        return 2
    seen = {normalise(q) for q in existing}
    rejected, written, tokens = Counter(), len(existing), 0
    max_batches = args.max_batches or 10 * args.num // args.batch_size + 10
    bar = tqdm(total=args.num, initial=min(written, args.num), desc="magpie", unit="conv", disable=None)
    t0, batches = time.perf_counter(), 0
    with open(args.out, "a") as out:
        while written < args.num and batches < max_batches:
            records, n = sample_batch(model, tok, args, k, seen, rejected)
            records = records[:args.num - written]
            out.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            out.flush()
            k, batches, tokens, written = k + 1, batches + 1, tokens + n, written + len(records)
            with open(state_path + ".tmp", "w") as f:  # after the lines: a crash in between repeats a batch,
                json.dump({"batches": k}, f)         # whose questions the repeat filter then rejects
            os.replace(state_path + ".tmp", state_path)
            bar.update(len(records))
    bar.close()
    elapsed = time.perf_counter() - t0
    summary = {"written": written, "new": written - len(existing), "batches": batches, "rejected": dict(rejected),
               "generated_tokens": tokens, "tokens_per_s": round(tokens / elapsed, 1) if elapsed else None}
    print(json.dumps(summary))
    if written < args.num:
        print(f"magpie: stopped after {batches} batches with {written} of {args.num} conversations: the filters "
              "rejected most samples (see 'rejected'); a model trained with data.loss_on=all suits Magpie",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
