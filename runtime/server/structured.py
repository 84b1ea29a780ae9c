"""Chat completions' ``tools`` / ``tool_choice`` / ``response_format``: request models, the
constraint a request's reply decodes under, and the reply in OpenAI's shapes.

``plan`` turns a request into a ``Plan``: the grammar (runtime/server/tools.py for tool
calls, a JSON schema for ``response_format``) compiled into a per-reply ``Constraint``
(runtime/constrained.py), or no constraint (``tool_choice="none"``, plain text). The
finished reply becomes ``message`` (``tool_calls`` with JSON-string arguments and the
spoken text as ``content``; ``finish_reason="tool_calls"``); streamed, ``Plan.stream``
turns text pieces into ``content`` and ``tool_calls`` deltas.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from moe2edge.runtime.constrained import Constraint, GrammarError, json_schema_grammar, lark_json
from moe2edge.runtime.server.state import APIError, ServiceState
from moe2edge.runtime.server.tools import (
    Tool,
    ToolCall,
    ToolError,
    ToolStream,
    format_calls,
    parse_reply,
    reply_grammar,
    tool_format,
)

# OpenAI allows [A-Za-z0-9_-]; dots too here (the demo's actions are named lights.dim ...)
ToolName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$", max_length=64)]
MAX_TOOLS = 128


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class FunctionDef(_Strict):
    name: ToolName
    description: str | None = Field(None, max_length=4096)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def spec(self) -> Tool:
        """The tool as the parser and the grammar take it (no parameters: any object)."""
        return Tool(self.name, self.parameters or {"type": "object"})


class ToolParam(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDef


class FunctionName(_Strict):
    name: ToolName


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JSONSchemaFormat(_Strict):
    name: str = Field("response", max_length=64)
    description: str | None = Field(None, max_length=4096)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class CallFunction(_Strict):
    name: str = Field(..., max_length=256)
    arguments: str = Field("{}", max_length=65536)


class AssistantToolCall(_Strict):
    id: str | None = Field(None, max_length=256)
    type: Literal["function"] = "function"
    function: CallFunction


@dataclass
class Plan:
    """How one chat reply is decoded and answered."""

    constraint: Constraint | None = None
    tools: list[Tool] = field(default_factory=list)
    fmt: str = "json"
    calls_wanted: bool = False  # tools are on: parse the reply into tool_calls
    _stream: ToolStream | None = None
    _calls: int = 0

    def message(self, text: str) -> tuple[dict[str, Any], bool]:
        """The assistant message for the whole reply; whether it made tool calls."""
        if not self.calls_wanted:
            return {"role": "assistant", "content": text}, False
        calls, rest = parse_reply(text, self.tools, self.fmt)
        if not calls:
            return {"role": "assistant", "content": text}, False
        return {
            "role": "assistant",
            "content": rest or None,
            "tool_calls": [_call_json(c) for c in calls],
        }, True

    def stream(self, piece: str | None) -> list[dict[str, Any]]:
        """Deltas for a streamed piece (None: the end of the reply)."""
        if not self.calls_wanted:
            return [{"content": piece}] if piece else []
        if self._stream is None:
            self._stream = ToolStream(self.tools, self.fmt)
        events = self._stream.feed(piece) if piece is not None else self._stream.close()
        out = []
        for kind, value in events:
            if kind == "text":
                out.append({"content": value})
                continue
            call = _call_json(value)
            out.append({"tool_calls": [{"index": self._calls, **call}]})
            self._calls += 1
        return out

    @property
    def streamed_calls(self) -> int:
        return self._calls


def _call_json(call: ToolCall) -> dict[str, Any]:
    return {
        "id": "call_" + uuid.uuid4().hex[:24],
        "type": "function",
        "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
    }


def history_text(message: Any, fmt: str) -> tuple[str, str]:
    """A history message as the (role, text) the prompt renders: an assistant's tool calls
    written in the bundle's format; a tool result as a user turn naming its call."""
    text = message.text()
    if message.role == "tool":
        return "user", f"tool result ({message.tool_call_id or 'call'}): {text}"
    if message.role == "assistant" and message.tool_calls:
        calls = []
        for call in message.tool_calls:
            try:
                args = json.loads(call.function.arguments or "{}")
            except json.JSONDecodeError as exc:
                raise APIError(
                    400, f"tool call {call.function.name!r}: arguments are not JSON: {exc}",
                    param="messages",
                ) from exc  # fmt: skip
            calls.append(ToolCall(call.function.name, args if isinstance(args, dict) else {}))
        written = format_calls(calls, fmt)
        text = f"{written} {text}".strip() if fmt == "bracket" else f"{written}\n{text}".strip()
    return message.role, text


def _response_grammar(fmt: ResponseFormat | None) -> str | None:
    """The JSON grammar ``response_format`` asks for (None: plain text)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return json_schema_grammar(None)
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise APIError(
            400,
            "response_format json_schema needs json_schema.schema (a JSON schema object)",
            param="response_format",
        )
    return json_schema_grammar(fmt.json_schema.schema_)


def plan(
    state: ServiceState,
    tools: list[ToolParam] | None,
    tool_choice: ToolChoice | None,
    parallel_tool_calls: bool | None,
    response_format: ResponseFormat | None,
) -> Plan:
    """The decoding plan of a chat request; a 400 naming what is wrong in its tools/schema."""
    generator = state.generator
    fmt = tool_format(generator.engine.manifest)
    tools = tools or []
    if len(tools) > MAX_TOOLS:
        raise APIError(400, f"at most {MAX_TOOLS} tools", param="tools")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise APIError(400, "tool names must be unique", param="tools")
    choice = tool_choice or ("auto" if tools else "none")
    if not isinstance(choice, str):
        choice = choice.function.name
    if choice != "none" and not tools:
        raise APIError(400, f"tool_choice {choice!r} needs tools", param="tool_choice")
    text_grammar = _checked(lambda: _response_grammar(response_format), "response_format")
    if choice == "none":
        if text_grammar is None:
            return Plan(fmt=fmt)
        return Plan(_checked(lambda: _constraint(state, text_grammar), "response_format"))
    specs = [t.function.spec() for t in tools]
    text = None
    if response_format is not None and response_format.type != "text":
        schema = (
            response_format.json_schema.schema_
            if response_format.type == "json_schema" and response_format.json_schema
            else None
        ) or {"type": "object"}
        text = lark_json(schema)

    def build() -> Constraint:
        grammar = reply_grammar(specs, fmt, choice, parallel_tool_calls is not False, text)
        return _constraint(state, grammar)

    return Plan(_checked(build, "tools"), specs, fmt, calls_wanted=True)


def _constraint(state: ServiceState, grammar: str) -> Constraint:
    from moe2edge.runtime.constrained import lark_grammar

    source = grammar if grammar.lstrip().startswith("{") else lark_grammar(grammar)
    return state.generator.grammars.constraint(source)


def _checked(make, param: str):
    try:
        return make()
    except (ToolError, GrammarError, ValueError) as exc:
        message = re.sub(r"\s+", " ", str(exc)).strip()[:600]
        raise APIError(400, f"{param}: {message}", param=param) from exc
