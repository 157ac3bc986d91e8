"""Input records: JSONL lines (or embedded records) -> conversations, with a reason for every reject.

A record is one of
    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    {"prompt": str, "completion": str}      -> a user turn and an assistant turn
    {"text": str}                            -> plain text, every token trained
and becomes an `Example`: a tuple of (role, content) turns, role "text" for plain text.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")
TEXT = "text"  # pseudo-role of a plain-text example

# Skip reasons (keys of stats["skipped"]); the bad-line ones stop a strict build.
INVALID_UTF8 = "invalid UTF-8"
INVALID_JSON = "invalid JSON"
NOT_OBJECT = "not a JSON object"
NO_FIELDS = "no known fields"
BAD_TYPE = "bad field type"
UNKNOWN_ROLE = "unknown role"
EMPTY_ASSISTANT = "empty assistant content"
NO_ASSISTANT = "no assistant turn"
EMPTY_TEXT = "empty text"
NOTHING_TO_TRAIN = "nothing to train"
# Policy outcomes, counted but never fatal: they follow from the config, not from a bad line.
BLANK = "blank line"
OVERLONG = "overlong"
TRUNCATED_AWAY = "nothing to train after truncation"
POLICY_REASONS = (BLANK, OVERLONG, TRUNCATED_AWAY)

Example = tuple[tuple[str, str], ...]


class BadRecord(ValueError):
    """A record that cannot be used; `reason` is one of the reason constants above."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def parse_record(obj) -> Example:
    """Turn one decoded JSON value into an Example, or raise BadRecord."""
    if not isinstance(obj, dict):
        raise BadRecord(NOT_OBJECT, f"got {type(obj).__name__}")
    if "messages" in obj:
        return _parse_messages(obj["messages"])
    if "prompt" in obj or "completion" in obj:
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if not isinstance(prompt, str):
            raise BadRecord(BAD_TYPE, "prompt must be a string")
        if completion is None or (isinstance(completion, str) and not completion.strip()):
            raise BadRecord(EMPTY_ASSISTANT, "completion is missing or empty")
        if not isinstance(completion, str):
            raise BadRecord(BAD_TYPE, "completion must be a string")
        return (("user", prompt), ("assistant", completion))
    if "text" in obj:
        text = obj["text"]
        if not isinstance(text, str):
            raise BadRecord(BAD_TYPE, "text must be a string")
        if not text.strip():
            raise BadRecord(EMPTY_TEXT)
        return ((TEXT, text),)
    keys = ", ".join(sorted(map(str, obj))) or "none"
    raise BadRecord(NO_FIELDS, f"expected messages, prompt/completion or text; found keys: {keys}")


def _parse_messages(messages) -> Example:
    if not isinstance(messages, list) or not messages:
        raise BadRecord(BAD_TYPE, "messages must be a non-empty list")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRecord(BAD_TYPE, f"messages[{i}] must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise BadRecord(UNKNOWN_ROLE, f"messages[{i}].role={role!r} (expected one of {', '.join(ROLES)})")
        if role == "assistant" and (content is None or (isinstance(content, str) and not content.strip())):
            raise BadRecord(EMPTY_ASSISTANT, f"messages[{i}] is an assistant turn with no content")
        if not isinstance(content, str):
            raise BadRecord(BAD_TYPE, f"messages[{i}].content must be a string")
        turns.append((role, content))
    if not any(role == "assistant" for role, _ in turns):
        raise BadRecord(NO_ASSISTANT, "a conversation needs at least one assistant turn to train on")
    return tuple(turns)


@dataclass
class ReadResult:
    """Examples of one source, where each came from, and what was skipped."""
    examples: list[Example] = field(default_factory=list)
    origins: list[tuple[int, int]] = field(default_factory=list)  # (file index, 1-based line)
    files: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    first_skips: list[str] = field(default_factory=list)  # a few "path:line: reason" for the log
    lines: int = 0
    truncated: int = 0  # examples cut to data.seq_len
    held_out: int = 0   # examples left to the other side of the data.eval_fraction split

    def where(self, i: int) -> str:
        """'path:line' of example i."""
        f, line = self.origins[i]
        return f"{self.files[f]}:{line}" if f >= 0 else f"<embedded #{line}>"

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
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, BadRecord(INVALID_UTF8, f"byte {e.start}")
                continue
            if not line.strip():
                yield lineno, None
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:  # one line, so pos is the column
                yield lineno, BadRecord(INVALID_JSON, f"{e.msg} at column {e.pos + 1}")


def read_jsonl_files(files: list[str], strict: bool) -> ReadResult:
    """Parse every line of `files` (one source); strict raises at the first unusable line."""
    out = ReadResult(files=list(files))
    for fi, path in enumerate(files):
        for lineno, value in iter_jsonl(path):
            out.lines += 1
            if value is None:
                out.skip(f"{path}:{lineno}", BadRecord(BLANK), strict)
                continue
            try:
                if isinstance(value, BadRecord):
                    raise value
                out.examples.append(parse_record(value))
                out.origins.append((fi, lineno))
            except BadRecord as err:
                out.skip(f"{path}:{lineno}", err, strict)
    return out


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
