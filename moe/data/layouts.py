"""Record layouts: one decoded record (any supported layout) -> one canonical conversation.

    messages           {"messages": [{"role", "content", "tool_calls"?}, ...], "tools"?: [...]}
    sharegpt           {"conversations": [{"from": "human"|"gpt"|"system"|"tool"|..., "value"}], "system"?, "tools"?}
    alpaca             {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
    prompt_completion  {"prompt": str, "completion": str}, or TRL's conversational form where both are
                       message lists ({"prompt": [{"role": "user", ...}], "completion": [{"role": "assistant", ...}]})
    text               {"text": str}: plain text, every token trained

Every layout reads to the same canonical conversation as the equivalent `messages` record:
    ShareGPT   from human/gpt/system/tool -> role user/assistant/system/tool (data.roles adds names)
    Alpaca     user = instruction, or instruction + "\\n\\n" + input; assistant = output; history turns first
    content    a string, or a list of parts of which only text parts are read ({"type": "text", "text": ...}),
               joined with nothing between them; any other part (image, audio) is refused by name
    tool calls an assistant turn's `tool_calls` are rendered into its content as
               <tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call> (one per call, "\\n" between parts);
               a record's `tools` list is rendered into the system turn (template.tools_block)
The rendering of tool calls and tools lives here and in floe.data.template.CHAT_TEMPLATE, which
tests hold equal to transformers' apply_chat_template character for character.

`data.format` forces one layout (auto: recognised by the record's keys). Other key names are mapped
in the spirit of Axolotl: `data.field_messages` names the key holding the message list,
`data.message_property_mappings` the role/content keys of each message, `data.roles` extra role
names, and `data.columns` renames flat fields (prompt, completion, text, instruction, input, output,
system). A record in no known layout raises BadRecord with what it looks like and the key that reads it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

LAYOUTS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
FORMATS = ("auto", *LAYOUTS)
ROLES = ("system", "user", "assistant", "tool")
TEXT = "text"  # pseudo-role of a plain-text example
COLUMNS = ("prompt", "completion", "text", "instruction", "input", "output", "system")
MESSAGE_PROPERTIES = ("role", "content")
# Role names other tools write, mapped to floe's (ShareGPT, LLaMA-Factory, Gemini-style "model").
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system",
                "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
                "function_call": "assistant"}

Example = tuple[tuple[str, str], ...]

# Skip reasons raised here (formats.py re-exports them; keys of stats["skipped"]).
NOT_OBJECT = "not a JSON object"
NO_FIELDS = "no known fields"
BAD_TYPE = "bad field type"
UNKNOWN_ROLE = "unknown role"
UNSUPPORTED_CONTENT = "unsupported content part"
EMPTY_ASSISTANT = "empty assistant content"
NO_ASSISTANT = "no assistant turn"
EMPTY_TEXT = "empty text"


class BadRecord(ValueError):
    """A record that cannot be used; `reason` is one of the reason constants of floe.data.formats."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Layout:
    """How to read records: data.format plus the key mappings (DataConfig.layout())."""
    format: str = "auto"
    field_messages: str | None = None
    message_property_mappings: dict = field(default_factory=dict)  # role/content -> the message's key
    roles: dict = field(default_factory=dict)                      # floe role -> [names used in the data]
    columns: dict = field(default_factory=dict)                    # flat field -> the record's key

    def role_names(self) -> dict[str, str]:
        names = dict(ROLE_ALIASES)
        for role, aliases in self.roles.items():
            names.update({str(a): role for a in ([aliases] if isinstance(aliases, str) else aliases)})
        return names

    def column(self, name: str) -> str:
        return self.columns.get(name, name)


AUTO = Layout()


def layout_errors(layout: Layout) -> list[str]:
    """Config problems of the layout keys (DataConfig calls this), each naming its key."""
    problems = []
    if layout.format not in FORMATS:
        problems.append(f"data.format must be one of {', '.join(FORMATS)}, got {layout.format!r}")
    if bad := sorted(set(layout.message_property_mappings) - set(MESSAGE_PROPERTIES)):
        problems.append(f"data.message_property_mappings: unknown {bad}; it maps {', '.join(MESSAGE_PROPERTIES)}")
    if bad := sorted(set(layout.roles) - set(ROLES)):
        problems.append(f"data.roles: unknown floe role(s) {bad}; it maps names onto {', '.join(ROLES)}")
    if bad := sorted(set(layout.columns) - set(COLUMNS)):
        hint = " (the message list's key is data.field_messages)" if "messages" in bad else ""
        problems.append(f"data.columns: unknown {bad}; it renames {', '.join(COLUMNS)}{hint}")
    if layout.field_messages is not None and layout.format not in ("auto", "messages", "sharegpt"):
        problems.append(f"data.field_messages is for the messages or sharegpt layout, not data.format={layout.format}")
    return problems


def detect(obj: dict, layout: Layout = AUTO) -> str:
    """The layout of one record: data.format when forced, else by its keys; BadRecord when none fits."""
    if layout.format != "auto":
        return layout.format
    if layout.field_messages is not None:
        return "messages"
    col = layout.column
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "sharegpt"
    if col("instruction") in obj and col("output") in obj:
        return "alpaca"
    if col("prompt") in obj or col("completion") in obj:
        return "prompt_completion"
    if col("text") in obj:
        return "text"
    raise BadRecord(NO_FIELDS, _hint(obj, layout))


def parse_record(obj, layout: Layout = AUTO) -> Example:
    """Turn one decoded record into an Example (tuple of (role, content)), or raise BadRecord."""
    if not isinstance(obj, dict):
        raise BadRecord(NOT_OBJECT, f"got {type(obj).__name__}")
    kind = detect(obj, layout)
    return {"messages": _read_messages_record, "sharegpt": _read_sharegpt, "alpaca": _read_alpaca,
            "prompt_completion": _read_prompt_completion, "text": _read_text}[kind](obj, layout)


# ------------------------------------------------------------------------------ layouts
def _read_messages_record(obj: dict, layout: Layout) -> Example:
    key = layout.field_messages or "messages"
    if key not in obj:
        raise BadRecord(NO_FIELDS, f"data.format={layout.format} reads the message list from {key!r}; "
                        f"found keys: {_keys(obj)}")
    return _conversation(obj[key], key, layout, tools=obj.get("tools"))


def _read_sharegpt(obj: dict, layout: Layout) -> Example:
    key = layout.field_messages or "conversations"
    if key not in obj:
        raise BadRecord(NO_FIELDS, f"data.format=sharegpt reads the turns from {key!r}; found keys: {_keys(obj)}")
    turns = obj[key]
    system = obj.get(layout.column("system"))
    if isinstance(system, str) and system and isinstance(turns, list):
        turns = [{"role": "system", "content": system}, *turns]
    return _conversation(turns, key, layout, tools=obj.get("tools"))


def _read_alpaca(obj: dict, layout: Layout) -> Example:
    col = layout.column
    instruction, extra, output = obj.get(col("instruction")), obj.get(col("input")), obj.get(col("output"))
    for name, value in ((col("instruction"), instruction), (col("output"), output)):
        if not isinstance(value, str):
            raise BadRecord(BAD_TYPE, f"{name} must be a string")
    if extra is not None and not isinstance(extra, str):
        raise BadRecord(BAD_TYPE, f"{col('input')} must be a string")
    messages = []
    system = obj.get(col("system"))
    if isinstance(system, str) and system:
        messages.append({"role": "system", "content": system})
    history = obj.get("history") or []
    if not isinstance(history, list) or any(not (isinstance(h, list) and len(h) == 2) for h in history):
        raise BadRecord(BAD_TYPE, "history must be a list of [user, assistant] pairs")
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    user = f"{instruction}\n\n{extra}" if extra else instruction
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return _conversation(messages, "alpaca", layout)


def _read_prompt_completion(obj: dict, layout: Layout) -> Example:
    p, c = layout.column("prompt"), layout.column("completion")
    prompt, completion = obj.get(p), obj.get(c)
    if isinstance(prompt, list) or isinstance(completion, list):  # TRL's conversational form
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            raise BadRecord(BAD_TYPE, f"conversational {p}/{c} must both be message lists")
        return _conversation([*prompt, *completion], f"{p}+{c}", layout, tools=obj.get("tools"))
    if not isinstance(prompt, str):
        raise BadRecord(BAD_TYPE, f"{p} must be a string or a message list")
    if completion is None or (isinstance(completion, str) and not completion.strip()):
        raise BadRecord(EMPTY_ASSISTANT, f"{c} is missing or empty")
    if not isinstance(completion, str):
        raise BadRecord(BAD_TYPE, f"{c} must be a string or a message list")
    return (("user", prompt), ("assistant", completion))


def _read_text(obj: dict, layout: Layout) -> Example:
    key = layout.column("text")
    text = obj.get(key)
    if not isinstance(text, str):
        raise BadRecord(BAD_TYPE, f"{key} must be a string")
    if not text.strip():
        raise BadRecord(EMPTY_TEXT)
    return ((TEXT, text),)


# ------------------------------------------------------------------------------ conversations
def _conversation(messages, key: str, layout: Layout, tools=None) -> Example:
    """Message dicts -> canonical turns; tool calls and the record's tools rendered into the text."""
    if not isinstance(messages, list) or not messages:
        raise BadRecord(BAD_TYPE, f"{key} must be a non-empty list")
    names = layout.role_names()
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRecord(BAD_TYPE, f"{key}[{i}] must be an object with role and content")
        name, content = _message_fields(m, layout)
        role = names.get(name) if isinstance(name, str) else None
        if role is None:
            known = ", ".join(sorted(set(names)))
            raise BadRecord(UNKNOWN_ROLE, f"{key}[{i}].role={name!r} (known: {known}; data.roles adds names)")
        calls = m.get("tool_calls")
        if name == "function_call":  # LLaMA-Factory's ShareGPT: the value is the call's JSON
            calls, content = _function_call(content, f"{key}[{i}]"), ""
        text = _content_text(content, f"{key}[{i}].content")
        if calls:
            if role != "assistant":
                raise BadRecord(BAD_TYPE, f"{key}[{i}] has tool_calls but role {role!r} (only assistant turns call)")
            text = "\n".join([text] * bool(text) + [render_tool_call(c, f"{key}[{i}].tool_calls[{j}]")
                                                    for j, c in enumerate(_as_list(calls))])
        if role == "assistant" and not text.strip():
            raise BadRecord(EMPTY_ASSISTANT, f"{key}[{i}] is an assistant turn with no content")
        turns.append((role, text))
    if not any(role == "assistant" for role, _ in turns):
        raise BadRecord(NO_ASSISTANT, "a conversation needs at least one assistant turn to train on")
    return _with_tools(turns, tools)


def _message_fields(m: dict, layout: Layout) -> tuple:
    mapped = layout.message_property_mappings
    if mapped:
        return m.get(mapped.get("role", "role")), m.get(mapped.get("content", "content"))
    if "role" in m or "content" in m:
        return m.get("role"), m.get("content")
    return m.get("from"), m.get("value")  # ShareGPT's keys, in either layout


def _content_text(content, where: str) -> str:
    """A message's text: a string, None (an assistant turn that only calls tools), or text parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise BadRecord(BAD_TYPE, f"{where} must be a string or a list of content parts")
    out = []
    for j, part in enumerate(content):
        kind = part.get("type", "text" if "text" in part else None) if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            what = f"a {kind!r} part" if kind else "not a text part"
            raise BadRecord(UNSUPPORTED_CONTENT, f"{where}[{j}] is {what}; floe trains on text parts only")
        out.append(part["text"])
    return "".join(out)


def render_tool_call(call, where: str) -> str:
    """'<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>'; string arguments are written as given."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise BadRecord(BAD_TYPE, f"{where} must be an object with a function name")
    args = fn.get("arguments", {})
    args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return f'<tool_call>\n{{"name": {json.dumps(fn["name"], ensure_ascii=False)}, "arguments": {args}}}\n</tool_call>'


def tools_block(tools: list) -> str:
    """The text a record's `tools` adds to its system turn (after the system prompt and a blank line)."""
    return "# Tools\n\n<tools>\n" + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools) + "\n</tools>"


def _with_tools(turns: list, tools) -> Example:
    if isinstance(tools, str) and tools.strip():  # LLaMA-Factory stores them as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise BadRecord(BAD_TYPE, f"tools is a string but not JSON ({e.msg})") from None
    if not tools:
        return tuple(turns)
    if not isinstance(tools, list):
        raise BadRecord(BAD_TYPE, "tools must be a list of tool definitions")
    if turns[0][0] == "system":
        return (("system", f"{turns[0][1]}\n\n{tools_block(tools)}"), *turns[1:])
    return (("system", tools_block(tools)), *turns)


def _function_call(value, where: str):
    try:
        return [json.loads(value)] if isinstance(value, str) else [value]
    except json.JSONDecodeError as e:
        raise BadRecord(BAD_TYPE, f"{where} is a function_call whose value is not JSON ({e.msg})") from None


def _as_list(calls) -> list:
    if not isinstance(calls, list):
        raise BadRecord(BAD_TYPE, "tool_calls must be a list")
    return calls


# ------------------------------------------------------------------------------ unknown layouts
def _keys(obj: dict) -> str:
    return ", ".join(sorted(map(str, obj))) or "none"


def _hint(obj: dict, layout: Layout) -> str:
    """What an unreadable record looks like and the setting that would read it."""
    lists = [k for k, v in obj.items() if isinstance(v, list) and v and all(isinstance(m, dict) for m in v)]
    strings = [k for k, v in obj.items() if isinstance(v, str)]
    found = f"found keys: {_keys(obj)}"
    if lists:
        k = lists[0]
        props = sorted({str(p) for m in obj[k] for p in m})
        return (f"{found}. {k!r} looks like a message list (message keys: {', '.join(props)}): read it with "
                f"data.field_messages={k}, and data.message_property_mappings={{role: ..., content: ...}} "
                "when its messages name role and content differently")
    if len(strings) >= 2:
        a, b = strings[0], strings[-1]
        return (f"{found}. It looks like a prompt/response pair: read it with "
                f"data.columns={{prompt: {a}, completion: {b}}} (or instruction/input/output for Alpaca-like data)")
    if len(strings) == 1:
        return f"{found}. It looks like plain text: read it with data.columns={{text: {strings[0]}}}"
    return (f"{found}; floe reads {', '.join(LAYOUTS)} records (data.format), or other keys through "
            "data.field_messages / data.columns")
