"""Preference pairs (data=preference): JSONL -> prompt, chosen and rejected answers -> packed pairs.

A record (a JSONL line, or a record of any file kind floe.data.readers reads) is one of TRL's
documented preference layouts:
    {"prompt": str, "chosen": str, "rejected": str}                       a user turn, two assistant answers
    {"prompt": [messages], "chosen": [messages], "rejected": [messages]}  conversational, explicit prompt
    {"chosen": [messages], "rejected": [messages]}                        conversational, implicit prompt:
                                                                           the turns both lists share
Each pair becomes two sequences, prompt + chosen and prompt + rejected, rendered with floe's chat
template (moe/data/template.py), or with the model's own (data.chat_template, which train.init_from sets
from an imported model's tokenizer_config.json; floe.data.chat_template). Only the answers' assistant
tokens are trained: the prompt's tokens (its assistant turns too) are not, so a sequence's
log-probability is that of its answer.

Layout of the packed rows (the same arrays as PackedDataset's): pair p of the epoch's mixture is
the two examples 2p (chosen) and 2p + 1 (rejected), written side by side in ONE row, chosen first,
position_ids restarting at each. So both halves are always in the same micro-batch, and the
sequence of every token is recoverable (PackedDataset.example_ids: even = chosen). A pair longer
than data.seq_len is dropped (data.overlong=drop) or cut: the longer answer first, so that both fit.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

import floe.data.cache as cache
import floe.data.formats as formats
import floe.data.readers as readers
from floe.data.formats import BAD_TYPE, EMPTY_ASSISTANT, NO_FIELDS, NOT_OBJECT, ROLES, UNKNOWN_ROLE, BadRecord
from floe.data.packing import best_fit_pack
from floe.data.template import encode_examples

IDENTICAL = "identical chosen and rejected"
NO_ANSWER = "no assistant answer"

Pair = tuple[formats.Example, formats.Example, formats.Example]  # (prompt turns, chosen turns, rejected turns)


def parse_pair(obj) -> Pair:
    """One decoded JSON value -> (prompt, chosen, rejected) turns, or raise BadRecord."""
    if not isinstance(obj, dict):
        raise BadRecord(NOT_OBJECT, f"got {type(obj).__name__}")
    if "chosen" not in obj or "rejected" not in obj:
        keys = ", ".join(sorted(map(str, obj))) or "none"
        raise BadRecord(NO_FIELDS, f"expected chosen and rejected (and prompt); found keys: {keys}")
    chosen, rejected, prompt = obj["chosen"], obj["rejected"], obj.get("prompt")
    if isinstance(chosen, str) or isinstance(rejected, str):
        if not (isinstance(chosen, str) and isinstance(rejected, str) and isinstance(prompt, str)):
            raise BadRecord(BAD_TYPE, "string chosen/rejected need a string prompt, and both must be strings")
        pair = ((("user", prompt),), (("assistant", chosen),), (("assistant", rejected),))
    else:
        chosen, rejected = _turns(chosen, "chosen"), _turns(rejected, "rejected")
        if prompt is None:  # implicit prompt: the leading turns both share
            n = 0
            while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
                n += 1
            pair = (chosen[:n], chosen[n:], rejected[n:])
        else:
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            pair = (_turns(prompt, "prompt"), chosen, rejected)
    for name, answer in (("chosen", pair[1]), ("rejected", pair[2])):
        if not any(role == "assistant" and content.strip() for role, content in answer):
            raise BadRecord(NO_ANSWER if not any(r == "assistant" for r, _ in answer) else EMPTY_ASSISTANT,
                            f"{name} has no assistant turn with content after the prompt")
    if pair[1] == pair[2]:
        raise BadRecord(IDENTICAL, "nothing to prefer")
    return pair


def _turns(messages, key: str) -> formats.Example:
    if not isinstance(messages, list) or not messages:
        raise BadRecord(BAD_TYPE, f"{key} must be a string or a non-empty list of messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRecord(BAD_TYPE, f"{key}[{i}] must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise BadRecord(UNKNOWN_ROLE, f"{key}[{i}].role={role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise BadRecord(BAD_TYPE, f"{key}[{i}].content must be a string")
        turns.append((role, content))
    return tuple(turns)


def read_pairs(files: list[str], strict: bool) -> formats.ReadResult:
    """Parse every record of `files` (one source; any file kind floe.data.readers reads) into pairs
    (ReadResult.examples holds Pair tuples); strict raises at the first unusable record."""
    out = formats.ReadResult(files=list(files))
    for fi, path in enumerate(files):
        kind = readers.kind_of(path)
        out.units.append(readers.unit(kind))
        for pos, value in readers.iter_file(path, kind, formats.iter_jsonl):
            out.lines += 1
            try:
                if value is None:
                    raise BadRecord(formats.BLANK)
                if isinstance(value, BadRecord):
                    raise value
                out.examples.append(parse_pair(value))
                out.origins.append((fi, pos))
            except BadRecord as err:
                out.skip(formats.where(path, out.units[fi], pos), err, strict)
    return out


@dataclass
class EncodedPairs:
    """Pair i: chosen tokens/trained flags `chosen[i]`, rejected `rejected[i]` (numpy arrays)."""
    chosen: list[tuple[np.ndarray, np.ndarray]]
    rejected: list[tuple[np.ndarray, np.ndarray]]
    keep: list[int]  # indices into the source's pairs that survived data.overlong
    truncated: int


def encode_pairs(cfg, tok, src: formats.ReadResult, threads: int) -> EncodedPairs:
    """Tokenise both sequences of every pair; untrain the prompt; apply data.overlong to the pair."""
    pairs = src.examples
    sequences = [p[0] + p[1] for p in pairs] + [p[0] + p[2] for p in pairs]
    prompt_len = np.zeros(len(pairs), np.int64)
    if cfg.chat_template:  # a model's own template: its prompt's assistant turns untrained by the encoder
        from floe.data.chat_template import ChatTemplate, encode_with_template

        in_prompt = [sum(role == "assistant" for role, _ in p[0]) for p in pairs]
        full = encode_with_template(tok, sequences, ChatTemplate(cfg.chat_template), threads,
                                    untrained_turns=in_prompt * 2)
    else:
        full = encode_examples(tok, sequences, threads)
        prompts = [p[0] for p in pairs]
        has_prompt = [i for i, p in enumerate(prompts) if p]
        if has_prompt:  # floe's template renders turn by turn: a prompt's tokens are a prefix of both sequences
            prompt_len[has_prompt] = encode_examples(tok, [prompts[i] for i in has_prompt], threads).lengths
    out = EncodedPairs([], [], [], 0)
    n = len(pairs)
    for i in range(n):
        seqs = []
        for j in (i, n + i):
            ids, trained = full.example(j)
            trained = trained.copy()
            trained[:prompt_len[i]] = False
            seqs.append((ids.astype(np.int32), trained))
        lengths = _fit(len(seqs[0][0]), len(seqs[1][0]), cfg.seq_len)
        total = len(seqs[0][0]) + len(seqs[1][0])
        if total > cfg.seq_len and cfg.overlong == "drop":
            src.skip(src.where(i), BadRecord(formats.OVERLONG, f"pair of {total} tokens > data.seq_len="
                                             f"{cfg.seq_len}"), cfg.strict)
            continue
        seqs = [(ids[:k], tr[:k]) for (ids, tr), k in zip(seqs, lengths, strict=True)]
        if not all(tr.any() for _, tr in seqs):
            reason = formats.TRUNCATED_AWAY if total > cfg.seq_len else formats.NOTHING_TO_TRAIN
            src.skip(src.where(i), BadRecord(reason, "an answer has no token left to put a loss on"), cfg.strict)
            continue
        out.truncated += total > cfg.seq_len
        out.chosen.append(seqs[0])
        out.rejected.append(seqs[1])
        out.keep.append(i)
    return out


def _fit(a: int, b: int, seq_len: int) -> tuple[int, int]:
    """Lengths (a', b') <= (a, b) with a' + b' <= seq_len, cutting the longer sequence first."""
    if a + b <= seq_len:
        return a, b
    half = seq_len // 2
    if a <= half:
        return a, seq_len - a
    if b <= half:
        return seq_len - b, b
    return half, seq_len - half


def pack_pairs(encs: list[EncodedPairs], picks: list[np.ndarray], seq_len: int, pad_id: int,
               tok_dtype) -> dict[str, np.ndarray]:
    """PackedDataset's arrays for the mixture `picks` (per source, indices into its kept pairs):
    mixture pair m is examples 2m (chosen) and 2m + 1 (rejected), adjacent in one row."""
    mix = [(s, int(k)) for s, p in enumerate(picks) for k in p]
    unit_len = np.array([len(encs[s].chosen[k][0]) + len(encs[s].rejected[k][0]) for s, k in mix], np.int64)
    rows = best_fit_pack(unit_len, seq_len)
    R, L = len(rows), seq_len
    pos_dtype = np.uint16 if L <= 1 << 16 else np.int32
    tokens = np.full((R, L), pad_id, dtype=tok_dtype)
    trained = np.zeros((R, L), dtype=np.uint8)
    position = np.zeros((R, L), dtype=pos_dtype)
    lengths = np.zeros(R, dtype=np.int32)
    seg_offsets = np.zeros(R + 1, dtype=np.int64)
    seg_example = np.zeros(2 * len(mix), dtype=np.int64)
    seg_source = np.zeros(2 * len(mix), dtype=np.int16)
    ramp = np.arange(L, dtype=pos_dtype)
    j = 0
    for r, row in enumerate(rows):
        c = 0
        for m in row:
            s, k = mix[m]
            for half, (ids, tr) in enumerate((encs[s].chosen[k], encs[s].rejected[k])):
                n = len(ids)
                tokens[r, c:c + n], trained[r, c:c + n], position[r, c:c + n] = ids, tr, ramp[:n]
                seg_example[j], seg_source[j] = 2 * m + half, s
                c += n
                j += 1
        position[r, c:] = ramp[:L - c]  # the padding tail is its own segment
        lengths[r] = c
        seg_offsets[r + 1] = j
    return dict(tokens=tokens, trained=trained, position=position, lengths=lengths, seg_offsets=seg_offsets,
                seg_example=seg_example, seg_source=seg_source)


def build_pairs(cfg, seed: int, tok, reads: list[formats.ReadResult], names: list[str], mixture,
                threads: int) -> tuple[dict, dict]:
    """(arrays, meta) of PackedDataset for the read pairs; `mixture(n_avail)` picks each source's pairs."""
    encs = [encode_pairs(cfg, tok, src, threads) for src in reads]
    picks = mixture([len(e.keep) for e in encs])
    if sum(len(p) for p in picks) == 0:
        skipped = sum((r.skipped for r in reads), Counter())
        raise ValueError(f"data: no usable preference pairs in {names} ({formats.format_skipped(skipped)})")
    tok_dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.int32
    arrays = pack_pairs(encs, picks, cfg.seq_len, tok.pad_id, tok_dtype)
    skipped = sum((r.skipped for r in reads), Counter())
    real = int(arrays["lengths"].sum())
    num_pairs = int(sum(len(p) for p in picks))
    stats = {
        "examples": 2 * num_pairs,  # sequences: two per pair
        "pairs": num_pairs,
        "skipped": dict(sorted(skipped.items())),
        "truncated": int(sum(e.truncated for e in encs)),
        "rows": len(arrays["lengths"]),
        "tokens": real,
        "loss_tokens": int(arrays["trained"].sum()),
        "pad_fraction": round(1.0 - real / arrays["tokens"].size, 6),
        "lines": int(sum(r.lines for r in reads)),
        "held_out": int(sum(r.held_out for r in reads)),
        "sources": {n: {"available": len(e.keep), "examples": int(len(p))}
                    for n, e, p in zip(names, encs, picks, strict=True)},
    }
    meta = {"stats": stats, "source_names": names, "pad_id": tok.pad_id,
            "fingerprint": cache.fingerprint(arrays, {"source_names": names, "pad_id": tok.pad_id}),
            "first_skips": [s for r in reads for s in r.first_skips][:10]}
    return arrays, meta
