"""Data pipeline benchmark: packing efficiency and tokenisation throughput (not a timed test).

    python tools/bench_data.py [--seq-len 4096] [--num-examples 50000] [--threads 2]

On the default mix (data=synthetic's sources, equal weights) it reports
  - packing efficiency: the non-padding share of the tokens in the packed rows at --seq-len,
    against one example per row (each example alone in a row of --seq-len, padded);
  - tokenisation throughput in examples/s: the chat template + SentencePiece on parsed
    examples, with 1 thread and with --threads; and the whole cold build from a JSONL file
    (read, parse, tokenise, pack, write the cache) in examples/s.
Prints a human summary to stderr and one JSON line to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from floe.data import DataConfig, Tokenizer, build_dataset, formats, synthetic  # noqa: E402
from floe.data.template import encode_examples  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--num-examples", type=int, default=50000)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    sources = DataConfig().sources
    tok = Tokenizer()

    with tempfile.TemporaryDirectory() as tmp:
        # packing on the default mix, through the real build (cold cache)
        cfg = DataConfig(sources=sources, num_examples=args.num_examples, seq_len=args.seq_len,
                         cache_dir=tmp, num_workers=args.threads)
        t0 = time.perf_counter()
        _, ds = build_dataset(cfg, seed=0)
        build_s = time.perf_counter() - t0
        s = ds.stats
        packed_eff = s["tokens"] / (s["rows"] * args.seq_len)
        single_eff = s["tokens"] / (s["examples"] * args.seq_len)

        # tokenisation alone: the same records, parsed, through the template
        per = args.num_examples // len(sources)
        records = [r for src in sources for r in synthetic.generate(src, per, 0)]
        examples = [formats.parse_record(r) for r in records]
        tok_1 = timed(lambda: encode_examples(tok, examples, 1), args.repeats)
        tok_n = timed(lambda: encode_examples(tok, examples, args.threads), args.repeats)

        # the whole cold build from a user's JSONL file
        path = Path(tmp) / "mix.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        jcfg = DataConfig(name="jsonl", paths=[str(path)], seq_len=args.seq_len, num_workers=args.threads)
        jsonl_s = timed(lambda: build_dataset(DataConfig(**{**jcfg.__dict__, "cache_dir": tempfile.mkdtemp(dir=tmp)}),
                                              seed=0), args.repeats)

    result = {
        "seq_len": args.seq_len, "examples": s["examples"], "rows": s["rows"], "tokens": s["tokens"],
        "mean_example_tokens": round(s["tokens"] / s["examples"], 1),
        "packing_efficiency": round(packed_eff, 5), "one_per_row_efficiency": round(single_eff, 5),
        "rows_saved_factor": round(s["examples"] / s["rows"], 2),
        "tokenise_examples_per_s_1_thread": round(len(examples) / tok_1),
        f"tokenise_examples_per_s_{args.threads}_threads": round(len(examples) / tok_n),
        "jsonl_cold_build_examples_per_s": round(len(records) / jsonl_s),
        "embedded_cold_build_s": round(build_s, 3), "cpus": os.cpu_count(),
    }
    print(f"packing at seq_len {args.seq_len}: {100 * packed_eff:.2f}% non-padding ({s['rows']} rows) vs "
          f"{100 * single_eff:.2f}% one example per row ({s['examples']} rows)\n"
          f"tokenise: {result['tokenise_examples_per_s_1_thread']} ex/s (1 thread), "
          f"{result[f'tokenise_examples_per_s_{args.threads}_threads']} ex/s ({args.threads} threads); "
          f"cold JSONL build: {result['jsonl_cold_build_examples_per_s']} ex/s", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
