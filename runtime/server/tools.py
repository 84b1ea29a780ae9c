"""Tool calls: how a bundle writes them, the grammar that makes a reply follow them, parsing.

A bundle declares its tool-call format in ``manifest.generation.tool_format``:

* ``bracket`` (the demo student): ``[name key=value key=value]`` calls, one space apart,
  then the spoken reply, e.g. ``[lights.dim room=dining_room value=30] ok, dimming ...``.
  Arguments are flat: each property a string (one word: letters, digits, ``_ . -``), an
  integer, a number or a boolean, or an ``enum``/``const`` of those; properties are written
  in the schema's order, optional ones may be left out.
* ``json`` (the default, the style of Qwen/Hermes chat templates):
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` calls, one a line; the
  arguments follow the tool's JSON schema (nested objects and arrays too).

``reply_grammar`` builds the Lark grammar (llguidance dialect) for a request's tools,
``tool_choice`` and ``parallel_tool_calls``; ``parse_reply`` turns the reply into calls
and the text after them; ``ToolStream`` does that piece by piece for streaming (a call is
emitted once its closing bracket or tag arrives). ``validate_arguments`` checks arguments
against a schema (the subset these formats produce), for unconstrained replies.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from moe2edge.runtime.constrained import lark_json, lark_literal

FORMATS = ("bracket", "json")
WORD = r"[A-Za-z0-9_.\-]"
BRACKET_TEXT = r"/[^\[\]]+/"  # the spoken reply: anything but a bracket
JSON_TEXT = r"/[^<]+/"
MAX_ENUMERATED = 2000  # an integer range this small becomes a list of its values


class ToolError(ValueError):
    """A tool definition the format cannot write; the message names the tool and property."""


@dataclass
class Tool:
    name: str
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object"})


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]


def tool_format(manifest: dict[str, Any]) -> str:
    """The bundle's declared format; a bundle without one: ``bracket`` when it has no chat
    template (the demo's turn format, bundles exported before tool_format), else ``json``."""
    gen = manifest.get("generation", {})
    fmt = gen.get("tool_format") or ("json" if gen.get("chat_template") else "bracket")
    if fmt not in FORMATS:
        raise ToolError(f"the bundle's tool_format {fmt!r} is not one of {FORMATS}")
    return fmt


# --- grammar ------------------------------------------------------------------------------


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _bracket_value(tool: str, key: str, schema: dict[str, Any]) -> str:
    """The Lark expression of one bracket-format argument value."""
    where = f"tool {tool!r} property {key!r}"
    choices = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if choices is not None:
        if not choices or any(isinstance(c, (dict, list)) or c is None for c in choices):
            raise ToolError(f"{where}: an enum needs string, number or boolean values")
        words = [_scalar(c) for c in choices]
        bad = [w for w in words if not re.fullmatch(WORD + "+", w)]
        if bad:
            raise ToolError(f"{where}: enum value {bad[0]!r} is not one word")
        return "(" + " | ".join(lark_literal(w) for w in dict.fromkeys(words)) + ")"
    kind = schema.get("type")
    if kind == "boolean":
        return '("true" | "false")'
    if kind == "integer":
        low, high = schema.get("minimum"), schema.get("maximum")
        if "exclusiveMinimum" in schema:
            low = int(schema["exclusiveMinimum"]) + 1
        if "exclusiveMaximum" in schema:
            high = int(schema["exclusiveMaximum"]) - 1
        if low is not None and high is not None:
            if high < low:
                raise ToolError(f"{where}: minimum {low} is above maximum {high}")
            if high - low < MAX_ENUMERATED:
                values = range(int(low), int(high) + 1)
                return "(" + " | ".join(lark_literal(str(v)) for v in values) + ")"
        if low is not None or high is not None:
            raise ToolError(
                f"{where}: the bracket format bounds integers with both minimum and maximum "
                f"(at most {MAX_ENUMERATED} values) or neither"
            )
        return r"/-?[0-9]{1,18}/"
    if kind == "number":
        if {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"} & set(schema):
            raise ToolError(f"{where}: the bracket format takes no bounds on numbers")
        return r"/-?[0-9]{1,15}(\.[0-9]{1,15})?/"
    if kind == "string":
        if "pattern" in schema or "format" in schema:
            raise ToolError(f"{where}: the bracket format takes no string pattern or format")
        low = max(1, int(schema.get("minLength", 1)))
        high = int(schema.get("maxLength", 64))
        if high < low:
            raise ToolError(f"{where}: minLength is above maxLength")
        return f"/{WORD}{{{low},{high}}}/"
    raise ToolError(
        f"{where}: the bracket tool format takes flat string, integer, number or boolean "
        f"properties (or enums of them), not {kind or 'an untyped value'!r}"
    )


def _bracket_call(tool: Tool) -> str:
    params = tool.parameters or {}
    if params.get("type", "object") != "object":
        raise ToolError(f"tool {tool.name!r}: parameters must be a JSON schema of type object")
    required = set(params.get("required", []))
    props = params.get("properties", {})
    missing = required - set(props)
    if missing:
        raise ToolError(f"tool {tool.name!r}: required {sorted(missing)} not in properties")
    parts = [lark_literal("[" + tool.name)]
    for key, schema in props.items():
        if not re.fullmatch(r"[A-Za-z0-9_]+", key):
            raise ToolError(f"tool {tool.name!r}: property name {key!r} is not one word")
        item = f"{lark_literal(' ' + key + '=')} {_bracket_value(tool.name, key, schema)}"
        parts.append(item if key in required else f"({item})?")
    return " ".join(parts) + ' "]"'


def _json_call(tool: Tool) -> str:
    schema = {
        "type": "object",
        "properties": {
            "name": {"const": tool.name},
            "arguments": tool.parameters or {"type": "object"},
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
    return f'"<tool_call>" {lark_json(schema)} "</tool_call>"'


def reply_grammar(
    tools: list[Tool],
    fmt: str,
    choice: str = "auto",
    parallel: bool = True,
    text: str | None = None,
) -> str:
    """The Lark grammar of a reply: ``choice`` is auto (calls or text), required (one call
    or more) or a tool's name (that call); ``parallel``: several calls allowed; ``text``: a
    Lark expression for the text part (default: free text)."""
    if choice not in ("auto", "required"):
        tools = [t for t in tools if t.name == choice]
        if not tools:
            raise ToolError(f"tool_choice names {choice!r}, which is not among the tools")
    make = _bracket_call if fmt == "bracket" else _json_call
    rules = [f"call_{i}: {make(tool)}" for i, tool in enumerate(tools)]
    calls = "call" + (
        (' (" " call)*' if fmt == "bracket" else ' ("\\n" call)*') if parallel else ""
    )
    if fmt == "bracket":
        free = text if text is not None else "TEXT"
        after = f'(" " {free})?' if text is not None else "TAIL?"
    else:
        free = text if text is not None else "TEXT"
        after = ""
    # a reply's first token may carry a space ("Ġ[" after the demo's prompt template)
    lead = '" "? ' if fmt == "bracket" else ""
    body = f"{lead}{calls} {after}".strip()
    start = body if choice != "auto" else f"{free} | {body}"
    lines = [f"start: {start}", "call: " + " | ".join(f"call_{i}" for i in range(len(tools)))]
    lines += rules
    if fmt == "bracket":
        lines += [f"TEXT: {BRACKET_TEXT}", r"TAIL: / [^\[\]]*/"]
    else:
        lines += [f"TEXT: {JSON_TEXT}"]
    return "\n".join(lines) + "\n"


# --- parsing ------------------------------------------------------------------------------

_BRACKET_CALL = re.compile(r"\[([^\s\[\]=]+)((?: [A-Za-z0-9_]+=[^\s\[\]]*)*)\]")
_JSON_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


def _convert(raw: str, schema: dict[str, Any]) -> Any:
    for choice in schema.get("enum", [schema["const"]] if "const" in schema else []):
        if _scalar(choice) == raw:
            return choice
    kind = schema.get("type")
    try:
        if kind == "integer":
            return int(raw)
        if kind == "number":
            return float(raw)
    except ValueError:
        return raw
    if kind == "boolean" and raw in ("true", "false"):
        return raw == "true"
    return raw


def _parse_bracket(text: str, tools: dict[str, Tool]) -> tuple[list[ToolCall], str]:
    calls, at = [], len(text) - len(text.lstrip(" "))
    while True:
        match = _BRACKET_CALL.match(text, at)
        if not match:
            break
        tool = tools.get(match.group(1))
        props = (tool.parameters or {}).get("properties", {}) if tool else {}
        args = {}
        for pair in match.group(2).split():
            key, _, raw = pair.partition("=")
            args[key] = _convert(raw, props.get(key, {}))
        calls.append(ToolCall(match.group(1), args))
        at = match.end()
        if text.startswith(" [", at):
            at += 1
    return calls, text[at:].strip()


def _parse_json(text: str) -> tuple[list[ToolCall], str]:
    calls, at = [], 0
    stripped = text.lstrip()
    at = len(text) - len(stripped)
    while True:
        match = _JSON_CALL.match(text, at)
        if not match:
            break
        try:
            obj = json.loads(match.group(1))
        except json.JSONDecodeError:
            break
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            break
        args = obj.get("arguments", {})
        calls.append(ToolCall(obj["name"], args if isinstance(args, dict) else {"": args}))
        at = match.end()
        while text.startswith("\n", at):
            at += 1
    return calls, text[at:].strip()


def parse_reply(text: str, tools: list[Tool], fmt: str) -> tuple[list[ToolCall], str]:
    """(the calls a reply starts with, the text after them)."""
    if fmt == "bracket":
        return _parse_bracket(text, {t.name: t for t in tools})
    return _parse_json(text)


def validate_arguments(args: Any, schema: dict[str, Any], path: str = "arguments") -> str | None:
    """What is wrong with ``args`` under ``schema`` (None: valid). Covers type, enum, const,
    properties, required, additionalProperties, items, integer/number bounds, string
    lengths and patterns: what tool and response schemas use."""
    if "const" in schema and args != schema["const"]:
        return f"{path} must be {schema['const']!r}"
    if "enum" in schema and args not in schema["enum"]:
        return f"{path}: {args!r} is not one of {schema['enum']}"
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind else []
    checks = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
    }
    if kinds and not any(checks.get(k, lambda v: True)(args) for k in kinds):
        return f"{path}: {args!r} is not of type {kind}"
    if isinstance(args, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in args:
                return f"{path}.{key} is required"
        for key, value in args.items():
            if key in props:
                problem = validate_arguments(value, props[key], f"{path}.{key}")
                if problem:
                    return problem
            elif schema.get("additionalProperties") is False:
                return f"{path}.{key} is not allowed"
    if isinstance(args, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(args):
            problem = validate_arguments(item, schema["items"], f"{path}[{i}]")
            if problem:
                return problem
    if isinstance(args, (int, float)) and not isinstance(args, bool):
        if "minimum" in schema and args < schema["minimum"]:
            return f"{path}: {args} is below {schema['minimum']}"
        if "maximum" in schema and args > schema["maximum"]:
            return f"{path}: {args} is above {schema['maximum']}"
    if isinstance(args, str):
        if len(args) < schema.get("minLength", 0) or len(args) > schema.get("maxLength", 1 << 30):
            return f"{path}: the length of {args!r} is out of range"
        if "pattern" in schema and not re.search(schema["pattern"], args):
            return f"{path}: {args!r} does not match {schema['pattern']!r}"
    return None


def format_calls(calls: list[ToolCall], fmt: str) -> str:
    """Calls as the bundle writes them (an assistant turn of the history)."""
    if fmt == "bracket":
        return " ".join(
            "[" + " ".join([c.name] + [f"{k}={_scalar(v)}" for k, v in c.arguments.items()]) + "]"
            for c in calls
        )
    return "\n".join(
        "<tool_call>" + json.dumps({"name": c.name, "arguments": c.arguments}) + "</tool_call>"
        for c in calls
    )


class ToolStream:
    """Streamed reply text -> ("call", ToolCall) and ("text", str) events, in order."""

    def __init__(self, tools: list[Tool], fmt: str):
        self.tools, self.fmt = tools, fmt
        self.buffer, self.head = "", True  # head: still where calls may come
        self.calls = 0

    def feed(self, piece: str) -> list[tuple[str, Any]]:
        self.buffer += piece
        events: list[tuple[str, Any]] = []
        while self.head and self.buffer:
            opener, closer = (
                ("[", "]") if self.fmt == "bracket" else ("<tool_call>", "</tool_call>")
            )
            text = self.buffer.lstrip(" \n")
            if not text:
                return events
            if opener.startswith(text[: len(opener)]) and len(text) < len(opener):
                return events  # could still become a call
            if text.startswith(opener):
                end = text.find(closer)
                if end < 0:
                    return events
                calls, _ = parse_reply(text[: end + len(closer)], self.tools, self.fmt)
                if not calls:
                    self.head = False
                    break
                events.append(("call", calls[0]))
                self.calls += 1
                self.buffer = text[end + len(closer) :]
                continue
            self.head = False
            self.buffer = text if self.calls else self.buffer
        if not self.head and self.buffer:
            events.append(("text", self.buffer))
            self.buffer = ""
        return events

    def close(self) -> list[tuple[str, Any]]:
        out = [("text", self.buffer)] if self.buffer else []
        self.buffer = ""
        return out
