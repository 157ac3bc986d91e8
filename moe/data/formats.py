"""Input records: files (JSONL, JSON arrays, Parquet, Arrow, datasets) or embedded records -> conversations,
with a reason for every reject.

A record in any layout of floe.data.layouts (messages, ShareGPT, Alpaca, prompt/completion, text)
becomes an `Example`: a tuple of (role, content) turns, role "text" for plain text. Where records
are kept (which file kinds) is floe.data.readers.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import floe.data.readers as readers
from floe.data.layouts import (AUTO, BAD_TYPE, EMPTY_ASSISTANT, EMPTY_TEXT, NO_ASSISTANT, NO_FIELDS,  # noqa: F401
                               NOT_OBJECT, ROLES, TEXT, UNKNOWN_ROLE, UNSUPPORTED_CONTENT, BadRecord, Example,
                               Layout, parse_record)

# Skip reasons (keys of stats["skipped"]); the bad-line ones stop a strict build. The record-level
# ones live with the layouts (floe.data.layouts) and are re-exported here.
INVALID_UTF8 = "invalid UTF-8"
INVALID_JSON = "invalid JSON"
BOM = "UTF-8 byte-order mark"
SURROGATE = "lone UTF-16 surrogate"
NOTHING_TO_TRAIN = "nothing to train"
# Policy outcomes, counted but never fatal: they follow from the config, not from a bad line.
BLANK = "blank line"
OVERLONG = "overlong"
TRUNCATED_AWAY = "nothing to train after truncation"
POLICY_REASONS = (BLANK, OVERLONG, TRUNCATED_AWAY)


@dataclass
class ReadResult:
    """Examples of one source, where each came from, and what was skipped."""
    examples: list[Example] = field(default_factory=list)
    origins: list[tuple[int, int]] = field(default_factory=list)  # (file index, 1-based line)
    files: list[str] = field(default_factory=list)
    units: list[str] = field(default_factory=list)  # per file: what a position counts ("line" or "record")
    skipped: Counter = field(default_factory=Counter)
    first_skips: list[str] = field(default_factory=list)  # a few "path:line: reason" for the log
    lines: int = 0
    truncated: int = 0  # examples cut to data.seq_len
    held_out: int = 0   # examples left to the other side of the data.eval_fraction split

    def where(self, i: int) -> str:
        """'path:line' of example i."""
        f, line = self.origins[i]
        return where(self.files[f], self.units[f] if self.units else "line", line) if f >= 0 else f"<embedded #{line}>"

    def skip(self, where: str, err: BadRecord, strict: bool) -> None:
        """Count a rejected record; raise it as `where: reason` in strict mode unless it is policy."""
        if strict and err.reason not in POLICY_REASONS:
            raise ValueError(f"{where}: {err} (set data.strict=false to skip and count such lines)")
        self.skipped[err.reason] += 1
        if len(self.first_skips) < 5:
            self.first_skips.append(f"{where}: {err}")


def iter_jsonl(path: str) -> Iterator[tuple[int, dict | BadRecord | None]]:
    """Yield (1-based line number, decoded value | BadRecord | None for a blank line), streaming."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            yield lineno, _decode_line(raw)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # a \\uD800-\\uDFFF escape: paired, or not


def _decode_line(raw: bytes) -> dict | BadRecord | None:
    """One JSONL line -> its value, a BadRecord naming why it is unusable, or None when blank."""
    if raw.startswith(b"\xef\xbb\xbf"):
        return BadRecord(BOM, "the line starts with a byte-order mark; save the file as UTF-8 without BOM")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRecord(INVALID_UTF8, f"byte {e.start}")
    if not line.strip():
        return None
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:  # one line, so pos is the column
        return BadRecord(INVALID_JSON, f"{e.msg} at column {e.pos + 1}")
    except RecursionError:
        return BadRecord(INVALID_JSON, "nested too deeply")
    if value is None:  # the JSON value null: not a blank line
        return BadRecord(NOT_OBJECT, "got null")
    if _SURROGATE_ESCAPE.search(raw):  # json.loads joins a valid pair; a lone half cannot be encoded
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            return BadRecord(SURROGATE, f"an escaped \\u{ord(e.object[e.start]):04x} with no pair")
    return value


def where(path: str, unit: str, position: int) -> str:
    """'path:12' for a JSONL line, 'path: record 12' for a record of an array, Parquet, Arrow or datasets file."""
    return f"{path}:{position}" if unit == "line" else f"{path}: record {position}"


def read_files(files: list[str], strict: bool, layout: Layout = AUTO) -> ReadResult:
    """Parse every record of `files` (one source; floe.data.readers picks the reader by file kind);
    strict raises at the first unusable record."""
    out = ReadResult(files=list(files))
    for fi, path in enumerate(files):
        kind = readers.kind_of(path)
        out.units.append(readers.unit(kind))
        read_iter(out, fi, readers.iter_file(path, kind, iter_jsonl), strict, layout)
    return out


def read_iter(out: ReadResult, fi: int, values, strict: bool, layout: Layout) -> None:
    """Parse (position, value | BadRecord | None) pairs of file `fi` of `out` into it."""
    path, unit = (out.files[fi], out.units[fi]) if fi >= 0 else ("<records>", "record")
    for pos, value in values:
        out.lines += 1
        if value is None:
            out.skip(where(path, unit, pos), BadRecord(BLANK), strict)
            continue
        try:
            if isinstance(value, BadRecord):
                raise value
            out.examples.append(parse_record(value, layout))
            out.origins.append((fi, pos))
        except BadRecord as err:
            out.skip(where(path, unit, pos), err, strict)


def read_records(records: list[dict]) -> ReadResult:
    """Parse in-memory records (the embedded sources); they are valid by construction."""
    out = ReadResult(files=[])
    for i, r in enumerate(records):
        out.examples.append(parse_record(r))
        out.origins.append((-1, i))
    out.lines = len(records)
    return out


def format_skipped(skipped: dict) -> str:
    """'skipped 3 lines: 1 invalid JSON, 1 no known fields, 1 nothing to train' (stable order)."""
    total = sum(skipped.values())
    parts = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"skipped {total} line{'s' if total != 1 else ''}: {parts}" if total else "skipped 0 lines"
