"""build_dataset: sources -> examples -> tokens and labels -> mixture -> packed rows, cached once.

The result is a `PackedDataset` of fixed-length rows held in numpy memmaps:
    tokens   [R, L]  token ids, pad_id in the padding tail
    trained  [R, L]  1 where the token is a loss target
    position [R, L]  restarting at 0 at every example and at the padding tail
    lengths  [R]     non-padding tokens of each row
plus a segment table (which example, from which source, sits where) for tools and tests.

The mixture is fixed at build time from (seed, data config): source i contributes
round(w_i * N) examples of the N in an epoch (a seeded subset when that is fewer than it
has, whole repeats plus a seeded subset when more). The loader reshuffles rows per epoch.

Cache: <cache_dir>/data/<key>/, key = hash of the inputs' bytes, the tokenizer file, the
config fields that change rows, the seed and this package's source code. The first process
to take <key>.lock builds into a temporary directory and renames it into place, so
concurrent torchrun ranks never read a half-written cache; the others wait and load it.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moe.data import formats, synthetic
from moe.data.config import DEFAULT_EMBEDDED_EXAMPLES, EMBEDDED, DataConfig
from moe.data.formats import BadRecord, ReadResult
from moe.data.packing import best_fit_pack
from moe.data.template import Encoded, encode_examples
from moe.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)
CHUNK = 4096  # examples per tokenizer call (one progress-bar tick)
_ARRAYS = ("tokens", "trained", "position", "lengths", "seg_offsets", "seg_example", "seg_source")


@dataclass
class PackedDataset:
    """Packed rows (memmapped) and the statistics of how they were made."""
    tokens: np.ndarray
    trained: np.ndarray
    position: np.ndarray
    lengths: np.ndarray
    seg_offsets: np.ndarray  # [R+1] row r holds segments seg_offsets[r]:seg_offsets[r+1]
    seg_example: np.ndarray  # [S] index of the example in the epoch's mixture
    seg_source: np.ndarray   # [S] index into source_names
    source_names: list[str]
    stats: dict
    pad_id: int
    path: str = ""           # the cache directory it was loaded from
    cache_hit: bool = False  # True when this call found the cache already built

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    def row_examples(self, r: int) -> list[int]:
        """Mixture indices of the examples packed into row r, in row order."""
        return self.seg_example[self.seg_offsets[r]:self.seg_offsets[r + 1]].tolist()

    def batch(self, rows) -> dict[str, torch.Tensor]:
        """Tensors for the given row indices, in that order (see moe.data docstring)."""
        rows = np.asarray(rows, dtype=np.int64)
        tokens = torch.from_numpy(self.tokens[rows].astype(np.int64))            # (B, L)
        trained = torch.from_numpy(self.trained[rows].astype(bool))              # (B, L)
        lengths = torch.from_numpy(self.lengths[rows].astype(np.int64))          # (B,)
        return {
            "input_ids": tokens,
            "labels": torch.where(trained, tokens, torch.full_like(tokens, -100)),
            "position_ids": torch.from_numpy(self.position[rows].astype(np.int64)),
            "attention_mask": torch.arange(self.seq_len)[None, :] < lengths[:, None],
        }


def build_dataset(cfg: DataConfig, seed: int) -> tuple[Tokenizer, PackedDataset]:
    """Tokenizer and packed rows for `cfg`; deterministic given (cfg, seed), cached, rank-agnostic."""
    tok = Tokenizer(cfg.tokenizer)
    files = _resolve_paths(cfg) if cfg.name not in EMBEDDED else []
    key = _cache_key(cfg, seed, tok, files)
    root = Path(cfg.cache_dir or os.environ.get("FLOE_CACHE") or Path.home() / ".cache" / "floe") / "data"
    final = root / key
    if not (final / "meta.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        with _FileLock(root / f"{key}.lock"):
            if not (final / "meta.json").is_file():  # another rank may have built it meanwhile
                t0 = time.perf_counter()
                arrays, meta = _build(cfg, seed, tok, files)
                meta["build_seconds"] = round(time.perf_counter() - t0, 3)
                _write_atomic(final, arrays, meta)
                ds = _load(final, cache_hit=False)
                _log_stats(ds, built=True)
                return tok, ds
    ds = _load(final, cache_hit=True)
    _log_stats(ds, built=False)
    return tok, ds


# ------------------------------------------------------------------------------ build
def _resolve_paths(cfg: DataConfig) -> list[list[str]]:
    """Each entry of data.paths -> its sorted files; errors name the entry."""
    out, problems = [], []
    for i, p in enumerate(cfg.paths):
        matches = sorted(glob.glob(os.path.expanduser(p), recursive=True)) if glob.has_magic(p) else [p]
        files = [m for m in matches if os.path.isfile(m)]
        if not files:
            problems.append(f"data.paths[{i}]: no file matches {p!r}")
        parquet = [f for f in files if f.endswith(".parquet")]
        if parquet:  # not read as JSONL: that would report every line as invalid UTF-8
            problems.append(f"data.paths[{i}]: {parquet[0]} is Parquet, which floe does not read; convert it "
                            "to JSONL, e.g. pandas.read_parquet(p).to_json(out, orient='records', lines=True)")
        out.append(files)
    if problems:
        raise ValueError("\n".join(problems))
    return out


def _read_sources(cfg: DataConfig, seed: int, files: list[list[str]]) -> list[ReadResult]:
    if cfg.name in EMBEDDED:
        targets = _shares(cfg.weights or [1.0] * len(cfg.sources), cfg.num_examples or DEFAULT_EMBEDDED_EXAMPLES)
        return [formats.read_records(synthetic.generate(s, n, seed)) for s, n in zip(cfg.sources, targets, strict=True)]
    return [formats.read_jsonl_files(fs, cfg.strict) for fs in files]


def _shares(weights: list[float], total: int) -> list[int]:
    """Split `total` by weight, rounding by largest remainder so the parts sum to `total`."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    parts = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - parts), kind="stable")[: total - int(parts.sum())]:
        parts[i] += 1
    return parts.tolist()


def _encode_source(cfg: DataConfig, tok: Tokenizer, src: ReadResult, name: str) -> tuple[Encoded, list[int]]:
    """Tokenise one source, apply data.overlong; returns the encoding and the kept example ids."""
    from tqdm import tqdm

    threads = cfg.num_workers or os.cpu_count() or 1
    parts = []
    bar = tqdm(total=len(src.examples), desc=f"tokenising {Path(name).name}", unit="ex",
               disable=len(src.examples) < 4 * CHUNK, leave=False)
    for i in range(0, len(src.examples), CHUNK):
        parts.append(encode_examples(tok, src.examples[i:i + CHUNK], threads))
        bar.update(len(parts[-1].lengths))
    bar.close()
    enc = Encoded(np.concatenate([p.tokens for p in parts]) if parts else np.zeros(0, np.int32),
                  np.concatenate([p.trained for p in parts]) if parts else np.zeros(0, bool),
                  np.concatenate([p.lengths for p in parts]) if parts else np.zeros(0, np.int64))
    offsets = enc.offsets
    keep, lengths = [], enc.lengths.copy()
    truncated = 0
    for i in range(len(lengths)):
        n = int(lengths[i])
        trained = enc.trained[offsets[i]:offsets[i] + min(n, cfg.seq_len)]
        if n > cfg.seq_len and cfg.overlong == "drop":
            src.skip(src.where(i), BadRecord(formats.OVERLONG, f"{n} tokens > data.seq_len={cfg.seq_len}"),
                     cfg.strict)
            continue
        if not trained.any():
            reason = formats.TRUNCATED_AWAY if n > cfg.seq_len else formats.NOTHING_TO_TRAIN
            src.skip(src.where(i), BadRecord(reason, "no token left to put a loss on"), cfg.strict)
            continue
        if n > cfg.seq_len:
            lengths[i] = cfg.seq_len  # truncate: keep the first seq_len tokens
            truncated += 1
        keep.append(i)
    src.truncated = truncated
    return Encoded(enc.tokens, enc.trained, lengths), keep


def _mixture(n_avail: list[int], weights: list[float] | None, total: int | None, seed: int) -> list[np.ndarray]:
    """Per source, the (kept-)example indices that make up one epoch's mix, in source order."""
    if weights is None and total is None:
        return [np.arange(n) for n in n_avail]
    weights = weights or [float(n) for n in n_avail]
    targets = _shares(weights, total if total is not None else sum(n_avail))
    rng = np.random.default_rng([seed, 0x5EED])
    out = []
    for n, k in zip(n_avail, targets, strict=True):
        if n == 0 and k > 0:
            raise ValueError("data.weights gives a share to a source with no usable examples")
        reps, rest = divmod(k, n) if n else (0, 0)
        out.append(np.concatenate([np.tile(np.arange(n), reps), np.sort(rng.permutation(n)[:rest])]))
    return out


def _build(cfg: DataConfig, seed: int, tok: Tokenizer, files: list[list[str]]) -> tuple[dict, dict]:
    names = cfg.source_names
    reads = _read_sources(cfg, seed, files)
    encs, keeps = [], []
    for name, src in zip(names, reads, strict=True):
        enc, keep = _encode_source(cfg, tok, src, name)
        encs.append(enc)
        keeps.append(keep)
    embedded = cfg.name in EMBEDDED  # embedded sources were generated at their mixture size
    picks = _mixture([len(k) for k in keeps], None if embedded else cfg.weights,
                     None if embedded else cfg.num_examples, seed)

    # The epoch's mixture as (source, example) pairs; the packer sees only their lengths.
    mix_src = np.concatenate([np.full(len(p), s, np.int64) for s, p in enumerate(picks)])
    mix_ex = np.concatenate([np.asarray(keeps[s], np.int64)[p] for s, p in enumerate(picks)]).astype(np.int64)
    if len(mix_ex) == 0:
        raise ValueError(f"data: no usable examples in {names} ({formats.format_skipped(_skipped(reads))})")
    mix_len = np.array([encs[s].lengths[e] for s, e in zip(mix_src, mix_ex, strict=True)], dtype=np.int64)
    rows = best_fit_pack(mix_len, cfg.seq_len)

    L, R = cfg.seq_len, len(rows)
    tok_dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.int32
    pos_dtype = np.uint16 if L <= 1 << 16 else np.int32
    tokens = np.full((R, L), tok.pad_id, dtype=tok_dtype)
    trained = np.zeros((R, L), dtype=np.uint8)
    position = np.zeros((R, L), dtype=pos_dtype)
    lengths = np.zeros(R, dtype=np.int32)
    seg_offsets = np.zeros(R + 1, dtype=np.int64)
    seg_example = np.zeros(len(mix_ex), dtype=np.int64)
    ramp = np.arange(L, dtype=pos_dtype)
    offsets = [e.offsets for e in encs]
    j = 0
    for r, row in enumerate(rows):
        c = 0
        for m in row:
            s, e, n = mix_src[m], mix_ex[m], mix_len[m]
            o = offsets[s][e]
            tokens[r, c:c + n] = encs[s].tokens[o:o + n]
            trained[r, c:c + n] = encs[s].trained[o:o + n]
            position[r, c:c + n] = ramp[:n]
            seg_example[j] = m
            c += n
            j += 1
        position[r, c:] = ramp[:L - c]  # the padding tail is its own segment
        lengths[r] = c
        seg_offsets[r + 1] = j
    seg_source = mix_src[seg_example].astype(np.int16)

    skipped = _skipped(reads)
    real = int(lengths.sum())
    stats = {
        "examples": int(len(mix_ex)),
        "skipped": dict(sorted(skipped.items())),
        "truncated": int(sum(r.truncated for r in reads)),
        "rows": R,
        "tokens": real,
        "loss_tokens": int(trained.sum()),
        "pad_fraction": round(1.0 - real / (R * L), 6),
        "lines": int(sum(r.lines for r in reads)),
        "sources": {n: {"available": len(k), "examples": int(len(p))}
                    for n, k, p in zip(names, keeps, picks, strict=True)},
    }
    meta = {"stats": stats, "source_names": names, "pad_id": tok.pad_id,
            "first_skips": [s for r in reads for s in r.first_skips][:10]}
    arrays = dict(tokens=tokens, trained=trained, position=position, lengths=lengths,
                  seg_offsets=seg_offsets, seg_example=seg_example, seg_source=seg_source)
    return arrays, meta


def _skipped(reads: list[ReadResult]) -> Counter:
    total = Counter()
    for r in reads:
        total.update(r.skipped)
    return total


# ------------------------------------------------------------------------------ cache
def _cache_key(cfg: DataConfig, seed: int, tok: Tokenizer, files: list[list[str]]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"cfg": cfg.cache_fields(), "seed": seed, "tokenizer": tok.fingerprint},
                        sort_keys=True).encode())
    for py in sorted(Path(__file__).parent.glob("*.py")):  # the code that makes the rows
        h.update(py.read_bytes())
    for group in files:
        for f in group:
            h.update(f.encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return f"{cfg.name}-{h.hexdigest()[:20]}"


def _write_atomic(final: Path, arrays: dict, meta: dict) -> None:
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir(parents=True)
    try:
        for name, a in arrays.items():
            np.save(tmp / f"{name}.npy", a)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: marks completeness
        try:
            os.replace(tmp, final)
        except OSError:  # another process renamed a complete copy into place first
            if not (final / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(path: Path, cache_hit: bool) -> PackedDataset:
    meta = json.loads((path / "meta.json").read_text())
    arrays = {n: np.load(path / f"{n}.npy", mmap_mode="r") for n in _ARRAYS}
    return PackedDataset(**arrays, source_names=meta["source_names"], stats=meta["stats"],
                         pad_id=meta["pad_id"], path=str(path), cache_hit=cache_hit)


class _FileLock:
    """An exclusive flock on a file (POSIX); elsewhere the atomic rename alone keeps caches whole."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)  # waits while another rank builds
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            import fcntl
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


def _log_stats(ds: PackedDataset, built: bool) -> None:
    s = ds.stats
    log.info("data: %s %d examples -> %d rows of %d (%d tokens, %d trained, %.2f%% padding, %d truncated)%s",
             "built" if built else "cached", s["examples"], s["rows"], ds.seq_len, s["tokens"],
             s["loss_tokens"], 100 * s["pad_fraction"], s["truncated"], "" if built else f" from {ds.path}")
    if s["skipped"]:
        log.warning("data: %s", formats.format_skipped(s["skipped"]))
        meta = json.loads((Path(ds.path) / "meta.json").read_text())
        for line in meta.get("first_skips", []):
            log.warning("data:   %s", line)
