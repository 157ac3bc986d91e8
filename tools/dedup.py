"""Deduplicate JSONL training data: exact duplicates by hash, then near-duplicates by MinHash LSH.

    python tools/dedup.py general.jsonl code.jsonl --out-dir deduped/ [--threshold 0.7]

Each input is a source; rows are compared across all sources, in the order given, and the
first occurrence is kept. A row's text is the content of its messages, its prompt and
completion, or its text, normalised (NFKC, lower case, punctuation dropped, whitespace
collapsed) and cut into word shingles (--shingle words each). Exact duplicates of the
normalised text are removed first; then a row whose MinHash Jaccard estimate with an
already kept row reaches --threshold is removed (LSH finds the candidates, the estimate
confirms them). Files are streamed line by line; memory grows with the kept rows (about
num_perm * 4 bytes each for the signatures). Kept lines are written unchanged to
<out-dir>/<input file name>. Lines that are not JSON records with a known field are kept
as they are and counted (training reports them). Ends with one JSON line of counts per source.
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

_WORD = re.compile(r"\w+")


def record_text(obj) -> str | None:
    """The trainable text of a record, or None when it has no known field."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("messages"), list):
        return "\n".join(str(m.get("content", "")) for m in obj["messages"] if isinstance(m, dict))
    if "prompt" in obj or "completion" in obj:
        return f"{obj.get('prompt', '')}\n{obj.get('completion', '')}"
    if isinstance(obj.get("text"), str):
        return obj["text"]
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


def dedup_files(paths: list[str], out_dir: str, deduper: Deduper, progress: bool = True) -> dict:
    """Deduplicate `paths` into `out_dir`; returns counts per source."""
    names = [os.path.basename(p) for p in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"input files must have distinct names (outputs go to {out_dir}/<name>): {names}")
    os.makedirs(out_dir, exist_ok=True)
    report = {}
    for path, name in zip(paths, names, strict=True):
        counts = {"rows": 0, "kept": 0, "exact": 0, "near": 0, "kept_unparsed": 0}
        out = os.path.join(out_dir, name)
        tmp = out + ".tmp"
        with open(path, "rb") as f, open(tmp, "wb") as w:
            for raw in _progress(f, path, progress):
                if not raw.strip():
                    continue  # blank lines carry nothing; training counts them anyway
                counts["rows"] += 1
                try:
                    text = record_text(json.loads(raw))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    text = None
                verdict = None if text is None else deduper.check(text)
                if text is None:
                    counts["kept_unparsed"] += 1
                if verdict:
                    counts[verdict] += 1
                    continue
                counts["kept"] += 1
                w.write(raw if raw.endswith(b"\n") else raw + b"\n")
        os.replace(tmp, out)
        report[path] = counts
    return report


def _progress(f, path: str, enabled: bool) -> Iterable[bytes]:
    try:
        from tqdm import tqdm
    except ImportError:
        enabled = False
    if not enabled:
        yield from f
        return
    with tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, desc=os.path.basename(path),
              leave=False, file=sys.stderr) as bar:
        for raw in f:
            bar.update(len(raw))
            yield raw


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="JSONL files, one source each, compared in this order")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--threshold", type=float, default=0.7, help="Jaccard similarity that counts as duplicate")
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--shingle", type=int, default=3, help="words per shingle")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    report = dedup_files(args.inputs, args.out_dir, Deduper(args.threshold, args.num_perm, args.shingle),
                         progress=not args.no_progress)
    for path, c in report.items():
        print(f"{path}: {c['rows']} rows, kept {c['kept']}, removed {c['exact']} exact + {c['near']} near "
              f"duplicates ({c['kept_unparsed']} unparsed lines kept as they are)", file=sys.stderr)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
