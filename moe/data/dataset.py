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

Held-out evaluation set (`build_eval_dataset`, when data.eval_fraction or data.eval_paths is
set): packed the same way from examples that training never sees, each once, no mixture. The
split happens on parsed examples, before tokenising and packing:
    jsonl     an example is held out when sha256(seed, its parsed turns) falls in the lowest
              data.eval_fraction of the hash range: duplicates go to the same side, and the
              side of an example does not change when other examples are added or removed
              (the source is not in the key, so an example in two sources is on one side)
    embedded  training never sees the held-out questions (moe/data/synthetic.py); the eval set
              draws round(data.eval_fraction * n) of them per source of n training examples
    eval_paths  the listed files, one eval source each (the training rows are unchanged)

Cache: <cache_dir>/data/<key>/, key = hash of the inputs' bytes, the tokenizer file, the
config fields that change rows, the seed, the split and this package's source code; written
atomically, checksummed and verified on load (moe/data/cache.py). Each dataset carries a
`fingerprint` of its arrays for resume checks.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import floe.data.cache as cache
import floe.data.formats as formats
import floe.data.preference as preference
import floe.data.readers as readers
import floe.data.synthetic as synthetic
from floe.data.chat_template import ChatTemplate, encode_with_template
from floe.data.config import DEFAULT_EMBEDDED_EXAMPLES, EMBEDDED, DataConfig
from floe.data.formats import BadRecord, ReadResult
from floe.data.packing import best_fit_pack
from floe.data.template import Encoded, encode_examples
from floe.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)
CHUNK = 4096  # examples per tokenizer call (one progress-bar tick)
# Part of the cache key. Bumped whenever rows built from the same inputs would differ:
# 2 = the truncation fix (format 1 read every example after an overlong one from a wrong offset);
# 3 = checksums and fingerprint in meta.json, held-out split.
CACHE_FORMAT = 3
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
    fingerprint: str = ""    # sha256 of the arrays (floe.data.cache.fingerprint): same rows <=> same value
    path: str = ""           # the cache directory it was loaded from
    cache_hit: bool = False  # True when this call found the cache already built

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def source_labels(self) -> list[str]:
        """Short names of the sources for metric keys (eval_loss/<label>): the embedded source name,
        or a file entry's stem ('data/math.jsonl' -> 'math') when the stems are unique."""
        stems = [Path(n).name.split(".")[0] or n for n in self.source_names]
        return stems if len(set(stems)) == len(stems) else list(self.source_names)

    def row_examples(self, r: int) -> list[int]:
        """Mixture indices of the examples packed into row r, in row order."""
        return self.seg_example[self.seg_offsets[r]:self.seg_offsets[r + 1]].tolist()

    def batch(self, rows) -> dict[str, torch.Tensor]:
        """Tensors for the given row indices, in that order (see floe.data docstring)."""
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

    def source_ids(self, rows) -> torch.Tensor:
        """[B, L] long: the source (index into source_names) of each token of the rows; -1 on padding.

        Aligned with `labels`: the loss of predicting labels[:, t] belongs to source_ids[:, t].
        """
        return self._per_token(rows, self.seg_source)

    def example_ids(self, rows) -> torch.Tensor:
        """[B, L] long: the mixture index of the example each token of the rows belongs to; -1 on padding.
        For data=preference example 2p is pair p's chosen sequence and 2p + 1 its rejected one."""
        return self._per_token(rows, self.seg_example)

    def _per_token(self, rows, per_segment: np.ndarray) -> torch.Tensor:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.full((len(rows), self.seq_len), -1, dtype=np.int64)
        for i, r in enumerate(rows.tolist()):
            n = int(self.lengths[r])
            seg = np.cumsum(self.position[r, :n] == 0) - 1  # segment of each real token, in row order
            out[i, :n] = per_segment[self.seg_offsets[r] + seg]
        return torch.from_numpy(out)


def build_dataset(cfg: DataConfig, seed: int) -> tuple[Tokenizer, PackedDataset]:
    """Tokenizer and packed training rows for `cfg`; deterministic given (cfg, seed), cached, rank-agnostic.

    With data.eval_fraction > 0 the held-out examples are left out (see build_eval_dataset).
    """
    tok = Tokenizer(cfg.tokenizer)
    return tok, _build_cached(cfg, seed, tok, "train")


def build_eval_dataset(cfg: DataConfig, seed: int) -> PackedDataset | None:
    """Packed rows of the held-out examples (each once; no example is also in build_dataset's rows),
    or None when neither data.eval_fraction nor data.eval_paths is set. Same seed as build_dataset.

    Rows carry the source of each example (seg_source, source_ids()), so the loss can be reported
    per source; iterate them with floe.data.eval_micro_batches.
    """
    if not cfg.has_eval:
        return None
    return _build_cached(cfg, seed, Tokenizer(cfg.tokenizer), "eval")


def _build_cached(cfg: DataConfig, seed: int, tok: Tokenizer, split: str) -> PackedDataset:
    if split == "eval" and cfg.eval_paths:
        files = _resolve_paths(cfg.eval_paths, "data.eval_paths")
    else:
        files = _resolve_paths(cfg.paths, "data.paths") if cfg.name not in EMBEDDED else []
    key = _cache_key(cfg, seed, tok, files, split)
    root = Path(cfg.cache_dir or os.environ.get("FLOE_CACHE") or Path.home() / ".cache" / "floe") / "data"
    arrays, meta, hit = cache.load_or_build(root, key, _ARRAYS, lambda: _build(cfg, seed, tok, files, split))
    ds = PackedDataset(**arrays, source_names=meta["source_names"], stats=meta["stats"], pad_id=meta["pad_id"],
                       fingerprint=meta["fingerprint"], path=str(root / key), cache_hit=hit)
    _log_stats(ds, built=not hit, first_skips=meta.get("first_skips", []), split=split)
    return ds


# ------------------------------------------------------------------------------ build
def _resolve_paths(paths: list[str], key: str) -> list[list[str]]:
    """Each entry of `paths` (config key `key`) -> its sorted files (or datasets directories); errors name
    the entry. A directory is one source only when datasets' save_to_disk wrote it."""
    out, problems = [], []
    for i, p in enumerate(paths):
        matches = sorted(glob.glob(os.path.expanduser(p), recursive=True)) if glob.has_magic(p) else [p]
        files = [m for m in matches if os.path.isfile(m) or _is_saved_dataset(m)]
        if not files:
            dirs = [m for m in matches if os.path.isdir(m)]
            problems.append(f"{key}[{i}]: {dirs[0]} is a directory but not a datasets save_to_disk one; give "
                            "its files or a glob" if dirs else f"{key}[{i}]: no file matches {p!r}")
        out.append(files)
    if problems:
        raise ValueError("\n".join(problems))
    return out


def _is_saved_dataset(path: str) -> bool:
    names = ("dataset_info.json", "state.json", "dataset_dict.json")
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n)) for n in names)


def _read_hub(cfg: DataConfig) -> ReadResult:
    out = ReadResult(files=[cfg.hf_source], units=["record"])
    streams = readers.hub_streams(cfg.hf_dataset, cfg.hf_config, cfg.hf_streaming, cfg.hf_stream_above_gb)
    formats.read_iter(out, 0, readers.iter_hub(cfg.hf_dataset, cfg.hf_split, cfg.hf_config, streams),
                      cfg.strict, cfg.layout())
    return out


def path_errors(cfg: DataConfig) -> list[str]:
    """Every data.paths / data.eval_paths entry that names no readable file (no data is read)."""
    errors = []
    for key, paths in (("data.paths", cfg.paths if cfg.name not in EMBEDDED else []),
                       ("data.eval_paths", cfg.eval_paths)):
        try:
            _resolve_paths(paths, key)
        except ValueError as e:
            errors += str(e).splitlines()
    return errors


def _read_sources(cfg: DataConfig, seed: int, files: list[list[str]], split: str) -> list[ReadResult]:
    """The examples of each source on the `split` side of the held-out split (module docstring);
    for data=preference the "examples" are preference pairs (moe/data/preference.py)."""
    def read(fs: list[str]) -> ReadResult:
        if cfg.name == "preference":
            return preference.read_pairs(fs, cfg.strict)
        return formats.read_files(fs, cfg.strict, cfg.layout())

    if split == "eval" and cfg.eval_paths:
        return [read(fs) for fs in files]
    if cfg.name in EMBEDDED:
        targets = _shares(cfg.weights or [1.0] * len(cfg.sources), cfg.num_examples or DEFAULT_EMBEDDED_EXAMPLES)
        if split == "eval":
            targets = [max(1, round(cfg.eval_fraction * n)) for n in targets]
        return [formats.read_records(synthetic.generate(s, n, seed, split))
                for s, n in zip(cfg.sources, targets, strict=True)]
    reads = [read(fs) for fs in files]
    if cfg.hf_dataset:
        reads.append(_read_hub(cfg))
    if cfg.eval_fraction > 0:
        for i, r in enumerate(reads):
            _keep_side(r, seed, cfg.eval_fraction, heldout=split == "eval")
            if split == "eval" and not r.examples:
                raise ValueError(f"data.eval_fraction={cfg.eval_fraction} holds out none of the {r.held_out} usable "
                                 f"examples of {_source_key(cfg, i)} ({cfg.source_names[i]}): raise data.eval_fraction or "
                                 "give held-out files in data.eval_paths")
    return reads


def _source_key(cfg: DataConfig, i: int) -> str:
    return f"data.paths[{i}]" if i < len(cfg.paths) else "data.hf_dataset"


def is_heldout(example: formats.Example, seed: int, eval_fraction: float) -> bool:
    """Whether a parsed example is on the held-out side of the data.eval_fraction split for `seed`."""
    h = hashlib.sha256(json.dumps([seed, example], ensure_ascii=False).encode()).digest()
    return int.from_bytes(h[:8], "big") < eval_fraction * 2.0 ** 64


def _keep_side(src: ReadResult, seed: int, eval_fraction: float, heldout: bool) -> None:
    """Keep only the examples on one side of the split (in place); count the others in src.held_out."""
    side = [is_heldout(ex, seed, eval_fraction) == heldout for ex in src.examples]
    src.held_out = len(side) - sum(side)
    src.examples = [ex for ex, keep in zip(src.examples, side, strict=True) if keep]
    src.origins = [o for o, keep in zip(src.origins, side, strict=True) if keep]


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
    template = ChatTemplate(cfg.chat_template) if cfg.chat_template else None
    parts = []
    # a bar only on a terminal: in a log file its carriage-return redraws would be one long garbled line
    bar = tqdm(total=len(src.examples), desc=f"tokenising {Path(name).name}", unit="ex",
               disable=len(src.examples) < 4 * CHUNK or not sys.stderr.isatty(), leave=False)
    for i in range(0, len(src.examples), CHUNK):
        chunk = src.examples[i:i + CHUNK]
        parts.append(encode_examples(tok, chunk, threads, cfg.loss_on) if template is None else
                     encode_with_template(tok, chunk, template, threads, cfg.loss_on))
        bar.update(len(parts[-1].lengths))
    bar.close()
    enc = Encoded.concat(parts)
    offsets = enc.starts
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
    return enc.truncated(lengths), keep


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


def _build(cfg: DataConfig, seed: int, tok: Tokenizer, files: list[list[str]], split: str) -> tuple[dict, dict]:
    names = list(cfg.eval_paths) if split == "eval" and cfg.eval_paths else cfg.source_names
    reads = _read_sources(cfg, seed, files, split)
    if cfg.name == "preference":
        as_is = split == "eval"
        arrays, meta = preference.build_pairs(
            cfg, seed, tok, reads, names, threads=cfg.num_workers or os.cpu_count() or 1,
            mixture=lambda n: _mixture(n, None if as_is else cfg.weights, None if as_is else cfg.num_examples, seed))
        return arrays, {"split": split, **meta}
    encs, keeps = [], []
    for name, src in zip(names, reads, strict=True):
        enc, keep = _encode_source(cfg, tok, src, name)
        encs.append(enc)
        keeps.append(keep)
    # Embedded sources were generated at their mixture size; an eval set takes every example once.
    as_is = cfg.name in EMBEDDED or split == "eval"
    picks = _mixture([len(k) for k in keeps], None if as_is else cfg.weights,
                     None if as_is else cfg.num_examples, seed)

    # The epoch's mixture as (source, example) pairs; the packer sees only their lengths.
    mix_src = np.concatenate([np.full(len(p), s, np.int64) for s, p in enumerate(picks)])
    mix_ex = np.concatenate([np.asarray(keeps[s], np.int64)[p] for s, p in enumerate(picks)]).astype(np.int64)
    if len(mix_ex) == 0:
        first = next((line for r in reads for line in r.first_skips), None)  # says what would read the data
        raise ValueError(f"data: no usable examples in {names} ({formats.format_skipped(_skipped(reads))})"
                         + (f"; the first: {first}" if first else ""))
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
    offsets = [e.starts for e in encs]
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
        "held_out": int(sum(r.held_out for r in reads)),  # examples on the other side of the eval split
        "sources": {n: {"available": len(k), "examples": int(len(p))}
                    for n, k, p in zip(names, keeps, picks, strict=True)},
    }
    arrays = dict(tokens=tokens, trained=trained, position=position, lengths=lengths,
                  seg_offsets=seg_offsets, seg_example=seg_example, seg_source=seg_source)
    meta = {"split": split, "stats": stats, "source_names": names, "pad_id": tok.pad_id,
            "fingerprint": cache.fingerprint(arrays, {"source_names": names, "pad_id": tok.pad_id}),
            "first_skips": [s for r in reads for s in r.first_skips][:10]}
    return arrays, meta


def _skipped(reads: list[ReadResult]) -> Counter:
    total = Counter()
    for r in reads:
        total.update(r.skipped)
    return total


# ------------------------------------------------------------------------------ cache
def _cache_key(cfg: DataConfig, seed: int, tok: Tokenizer, files: list[list[str]], split: str) -> str:
    h = hashlib.sha256()
    fields = cfg.cache_fields()
    if split == "eval":
        fields["eval_paths"] = cfg.eval_paths
    template = ChatTemplate(cfg.chat_template).fingerprint if cfg.chat_template else None  # by content, not path
    h.update(json.dumps({"format": CACHE_FORMAT, "cfg": fields, "seed": seed, "tokenizer": tok.fingerprint,
                         "split": split, "chat_template": template}, sort_keys=True).encode())
    for py in sorted(Path(__file__).parent.glob("*.py")):  # the code that makes the rows
        h.update(py.read_bytes())
    for group in files:
        for f in group:
            for part in sorted(Path(f).rglob("*")) if os.path.isdir(f) else [Path(f)]:  # a datasets dir: its files
                if part.is_file():
                    h.update(str(part).encode() + b"\0")
                    with open(part, "rb") as fh:
                        for block in iter(lambda: fh.read(1 << 20), b""):
                            h.update(block)
    if cfg.hf_dataset and not (split == "eval" and cfg.eval_paths):
        streams = readers.hub_streams(cfg.hf_dataset, cfg.hf_config, cfg.hf_streaming, cfg.hf_stream_above_gb)
        h.update(readers.hub_fingerprint(cfg.hf_dataset, cfg.hf_split, cfg.hf_config, streams).encode())
    return f"{cfg.name}{'-eval' if split == 'eval' else ''}-{h.hexdigest()[:20]}"


def _log_stats(ds: PackedDataset, built: bool, first_skips: list[str], split: str) -> None:
    s = ds.stats
    log.info("data%s: %s %d examples -> %d rows of %d (%d tokens, %d trained, %.2f%% padding, %d truncated%s)%s",
             " (eval)" if split == "eval" else "", "built" if built else "cached", s["examples"], s["rows"],
             ds.seq_len, s["tokens"], s["loss_tokens"], 100 * s["pad_fraction"], s["truncated"],
             f", {s['held_out']} held out for eval" if split == "train" and s["held_out"] else "",
             "" if built else f" from {ds.path}")
    if s["skipped"]:
        log.warning("data: %s", formats.format_skipped(s["skipped"]))
        for line in first_skips:
            log.warning("data:   %s", line)
