"""Reading speed of each record layout and file kind (not a timed test): the same conversations kept as
messages JSONL, ShareGPT JSONL, an Alpaca JSON array, ShareGPT Parquet and a ShareGPT datasets directory.

    python tools/bench_formats.py [--num-records 20000] [--repeats 3]

For each it times floe.data.formats.read_files (read, decode, recognise the layout, build the canonical
conversation: everything before tokenising) and checks that every kind yields exactly the examples of the
messages JSONL. Prints a markdown table to stdout (records/s, and relative to messages JSONL).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from floe.data import synthetic  # noqa: E402
from floe.data.formats import read_files  # noqa: E402


def write_stores(records: list[dict], root: Path) -> dict[str, str]:
    """The records (single-turn user/assistant chats) in each layout and kind; name -> path."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    turns = [[(m["role"], m["content"]) for m in r["messages"]] for r in records]
    share = [{"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(role, role), "value": c}
                                for role, c in t]} for t in turns]
    alpaca = [{"instruction": t[0][1], "input": "", "output": t[1][1]} for t in turns]
    out = {"messages JSONL": root / "messages.jsonl", "ShareGPT JSONL": root / "sharegpt.jsonl",
           "Alpaca JSON array": root / "alpaca_data.json", "ShareGPT Parquet": root / "sharegpt.parquet",
           "ShareGPT datasets dir": root / "saved"}
    out["messages JSONL"].write_text("".join(json.dumps(r) + "\n" for r in records))
    out["ShareGPT JSONL"].write_text("".join(json.dumps(r) + "\n" for r in share))
    out["Alpaca JSON array"].write_text(json.dumps(alpaca))
    pq.write_table(pa.Table.from_pylist(share), out["ShareGPT Parquet"])
    datasets.disable_progress_bars()
    datasets.Dataset.from_list(share).save_to_disk(str(out["ShareGPT datasets dir"]))
    return {k: str(v) for k, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-records", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    # one user turn and one assistant turn (no system prompt), so every layout can carry every record
    pool = (r for i in itertools.count() for r in synthetic.generate("math" if i % 2 else "code", 1000, i))
    records = list(itertools.islice((r for r in pool if [m["role"] for m in r["messages"]] == ["user", "assistant"]),
                                    args.num_records))
    with tempfile.TemporaryDirectory() as tmp:
        stores = write_stores(records, Path(tmp))
        want = read_files([stores["messages JSONL"]], strict=True).examples
        print("| layout and kind | records/s | vs messages JSONL |\n|---|---|---|")
        base = None
        for name, path in stores.items():
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                got = read_files([path], strict=True).examples
                times.append(time.perf_counter() - t0)
            if got != want:
                raise SystemExit(f"{name}: read {len(got)} examples that differ from messages JSONL's")
            rate = len(records) / statistics.median(times)
            base = base or rate
            print(f"| {name} | {rate:,.0f} | {rate / base:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
