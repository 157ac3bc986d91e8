"""Deduplicate training data: exact duplicates by hash, then near-duplicates by MinHash LSH.

    python tools/dedup.py general.jsonl sharegpt.json chats.parquet --out-dir deduped/ [--threshold 0.7]

Reads what training reads (floe.data.readers and floe.data.layouts): JSONL, a JSON array,
Parquet, Arrow or a datasets save_to_disk directory, with records in any layout (messages,
ShareGPT, Alpaca, prompt/completion, text; --format forces one as data.format does).
Each input is a source; rows are compared across all sources, in the order given, and the
first occurrence is kept. A row's text is the text training renders for it (every turn's
content, tool calls and tools included), normalised (NFKC, lower case, punctuation dropped,
whitespace collapsed) and cut into word shingles (--shingle words each). Exact duplicates of
the normalised text are removed first; then a row whose MinHash Jaccard estimate with an
already kept row reaches --threshold is removed (LSH finds the candidates, the estimate
confirms them). Inputs are streamed; memory grows with the kept rows (about num_perm * 4
bytes each for the signatures). Kept rows are written to <out-dir>/<input name> in the
input's own kind: JSONL lines unchanged, a JSON array, Parquet or Arrow rows of the same
schema, a datasets directory. Records training cannot read are kept as they are and counted
(training reports them). Ends with one JSON line of counts per source.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import unicodedata
from collections.abc import Iterable

import numpy as np
from datasketch import MinHash, MinHashLSH

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from floe.data import readers  # noqa: E402
from floe.data.layouts import AUTO, BadRecord, Layout, layout_errors, parse_record  # noqa: E402
from floe.errors import ConfigError  # noqa: E402
from launch.errors import config_errors  # noqa: E402

_WORD = re.compile(r"\w+")


def record_text(obj, layout: Layout = AUTO) -> str | None:
    """The text of a record as training reads it (its turns' contents), or None when training cannot read it."""
    try:
        return "\n".join(content for _, content in parse_record(obj, layout))
    except BadRecord:
        return None


def normalise(text: str) -> list[str]:
    """Words of the text after NFKC and case folding; punctuation and spacing do not count."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def shingles(words: list[str], n: int) -> set[bytes]:
    if len(words) <= n:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)}


class Deduper:
    """Streaming exact + MinHash-LSH deduplication; `seen(text)` says whether to drop a row."""

    def __init__(self, threshold: float = 0.7, num_perm: int = 128, shingle: int = 3, seed: int = 1):
        if not 0 < threshold <= 1:
            raise ValueError(f"--threshold must be in (0, 1], got {threshold}")
        self.threshold, self.num_perm, self.shingle, self.seed = threshold, num_perm, shingle, seed
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.exact: set[bytes] = set()
        self.signatures: dict[int, np.ndarray] = {}

    def check(self, text: str) -> str | None:
        """'exact', 'near' or None (new; remembered from now on)."""
        words = normalise(text)
        digest = hashlib.blake2b(" ".join(words).encode(), digest_size=16).digest()
        if digest in self.exact:
            return "exact"
        m = MinHash(num_perm=self.num_perm, seed=self.seed)
        m.update_batch(list(shingles(words, self.shingle)))
        sig = m.hashvalues.astype(np.uint32)  # datasketch keeps values below 2**32
        for key in self.lsh.query(m):
            if np.mean(self.signatures[key] == sig) >= self.threshold:
                return "near"
        key = len(self.signatures)
        self.signatures[key] = sig
        self.lsh.insert(key, m)
        self.exact.add(digest)
        return None


def dedup_files(paths: list[str], out_dir: str, deduper: Deduper, progress: bool = True,
                layout: Layout = AUTO) -> dict:
    """Deduplicate `paths` into `out_dir`; returns counts per source."""
    names = [os.path.basename(os.path.normpath(p)) for p in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"input files must have distinct names (outputs go to {out_dir}/<name>): {names}")
    os.makedirs(out_dir, exist_ok=True)
    report = {}
    for path, name in zip(paths, names, strict=True):
        counts = {"rows": 0, "kept": 0, "exact": 0, "near": 0, "kept_unparsed": 0}
        kind = readers.kind_of(path)
        out = os.path.join(out_dir, name)
        if kind == "jsonl":
            _dedup_jsonl(path, out, deduper, counts, progress, layout)
        else:
            keep = [i for i, record in _records(path, kind) if _keep(record, deduper, counts, layout)]
            _write_kept(path, kind, keep, out)
        report[path] = counts
    return report


def _keep(record, deduper: Deduper, counts: dict, layout: Layout) -> bool:
    counts["rows"] += 1
    text = record_text(record, layout)
    if text is None:
        counts["kept_unparsed"] += 1
    verdict = None if text is None else deduper.check(text)
    if verdict:
        counts[verdict] += 1
        return False
    counts["kept"] += 1
    return True


def _dedup_jsonl(path: str, out: str, deduper: Deduper, counts: dict, progress: bool, layout: Layout) -> None:
    """Kept lines written unchanged (bytes and all), through a temporary file."""
    tmp = out + ".tmp"
    with open(path, "rb") as f, open(tmp, "wb") as w:
        for raw in _progress(f, path, progress):
            if not raw.strip():
                continue  # blank lines carry nothing; training counts them anyway
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                record = None
            if _keep(record, deduper, counts, layout):
                w.write(raw if raw.endswith(b"\n") else raw + b"\n")
    os.replace(tmp, out)


def _records(path: str, kind: str):
    """(0-based index, record) of a non-JSONL input, in order."""
    for pos, record in readers.iter_file(path, kind, None):
        yield pos - 1, (None if isinstance(record, BadRecord) else record)


def _write_kept(path: str, kind: str, keep: list[int], out: str) -> None:
    """The kept rows of `path` in its own kind (same schema for Arrow kinds), written atomically."""
    tmp = out + ".tmp"
    if kind == "json_array":
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
        with open(tmp, "w", encoding="utf-8") as w:
            json.dump([data[i] for i in keep], w, ensure_ascii=False, indent=1)
    elif kind == "dataset" and not keep:  # datasets cannot save an empty dataset
        print(f"{path}: every row is a duplicate; {out} not written", file=sys.stderr)
        return
    elif kind == "dataset":
        import shutil

        import datasets

        datasets.disable_progress_bars()  # its bars would write carriage returns into a log
        ds = datasets.load_from_disk(path)
        ds = ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
        shutil.rmtree(tmp, ignore_errors=True)
        ds.select(keep).save_to_disk(tmp)
        shutil.rmtree(out, ignore_errors=True)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        keep = pa.array(keep, type=pa.int64())  # typed: an empty list would be a null array
        if kind == "parquet":
            pq.write_table(pq.read_table(path).take(keep), tmp)
        else:
            with pa.memory_map(path) as source:
                try:
                    table = pa.ipc.open_file(source).read_all()
                except pa.ArrowInvalid:
                    table = pa.ipc.open_stream(source).read_all()
            with pa.ipc.new_stream(tmp, table.schema) as w:
                w.write_table(table.take(keep))
    os.replace(tmp, out)


def _progress(f, path: str, enabled: bool) -> Iterable[bytes]:
    try:
        from tqdm import tqdm
    except ImportError:
        enabled = False
    if not enabled or not sys.stderr.isatty():  # no carriage-return redraws in a log file
        yield from f
        return
    with tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, desc=os.path.basename(path),
              leave=False, file=sys.stderr) as bar:
        for raw in f:
            bar.update(len(raw))
            yield raw


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="data files or datasets directories, one source each, compared in "
                    "this order")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--threshold", type=float, default=0.7, help="Jaccard similarity that counts as duplicate")
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--shingle", type=int, default=3, help="words per shingle")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--format", default="auto", help="the record layout, as data.format (default: auto)")
    args = ap.parse_args(argv)
    layout = Layout(format=args.format)
    problems = layout_errors(layout) + [f"{p}: no such file or directory" for p in args.inputs if not os.path.exists(p)]
    with config_errors():  # bad arguments or an unreadable input: one floe: message, exit 2 (as training)
        try:
            if problems:
                raise ValueError("; ".join(problems))
            report = dedup_files(args.inputs, args.out_dir, Deduper(args.threshold, args.num_perm, args.shingle),
                                 progress=not args.no_progress, layout=layout)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    for path, c in report.items():
        print(f"{path}: {c['rows']} rows, kept {c['kept']}, removed {c['exact']} exact + {c['near']} near "
              f"duplicates ({c['kept_unparsed']} records training cannot read kept as they are)", file=sys.stderr)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
