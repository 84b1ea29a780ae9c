"""Actions in the voice path: a spoken reply's tool calls as Realtime function-call events,
validated against the session's tools, optionally sent to a webhook before the reply speaks.

A voice session has tools (``session.update`` ``tools``, Realtime shape, or the server's
``voice_tools`` file) and a ``tool_choice``: ``auto`` decodes the reply freely and checks the
calls it starts with; ``required`` or a tool's name decodes under the tools' grammar (the
text API's, runtime/server/tools.py), so a well-formed call always comes; ``none`` leaves
``[brackets]`` as plain text. Parsing and validation are runtime/server/tools.py's
(``ToolStream``, ``validate_arguments``): one implementation for text and voice.

Per reply (``ReplyActions``), on the generation thread: each call, once its closing bracket
or tag arrives, is checked; a valid one is announced (``response.output_item.added``,
``response.function_call_arguments.delta`` / ``.done``, ``response.output_item.done``), an
invalid or malformed one is an ``invalid_action`` error and ends the reply's generation.
With a webhook, a thread of the reply's own POSTs its calls once the reply is released (a
draft that is dropped sends nothing anywhere) and its calls are known, while the first
phrase is synthesized. Before the reply's first audio the speech thread's ``settle`` waits
for the calls to be known (no wait beyond that: the spoken text comes after the calls
anyway) and, with a webhook, for its 2xx. If anything failed the confirmation is not
spoken: the fallback phrase (``action_failed_reply``) is, and the reply ends ``failed``.
See docs/voice-protocol.md.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from moe2edge.runtime.constrained import lark_grammar
from moe2edge.runtime.errors import RuntimeUserError
from moe2edge.runtime.server.structured import MAX_TOOLS, FunctionDef
from moe2edge.runtime.server.tools import (
    ToolCall,
    ToolError,
    ToolStream,
    format_calls,
    reply_grammar,
    tool_format,
    validate_arguments,
)
from moe2edge.runtime.voice.reply import new_id

log = logging.getLogger(__name__)
CHOICES = ("auto", "none", "required")
MAX_OUTPUT_CHARS = 16384  # a function_call_output's output
MAX_CALL_CHARS = 2048  # an action still open after this many characters is malformed
_BRACKET_NAME = re.compile(r"\[([^\s\[\]=]*)[\s\]=]")  # a bracket call's name, once complete


def parse_tools(raw: Any, where: str = "session.tools") -> list[FunctionDef]:
    """Tools in the Realtime shape (``{type: function, name, description, parameters}``) or
    the chat API's (``{type: function, function: {...}}``); ValueError naming the bad one."""
    if not isinstance(raw, list):
        raise ValueError(f"{where} must be a list of function tools")
    if len(raw) > MAX_TOOLS:
        raise ValueError(f"{where}: at most {MAX_TOOLS} tools")
    tools = []
    for i, tool in enumerate(raw):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ValueError(f"{where}[{i}] must be an object of type 'function'")
        body = tool.get("function", tool)
        try:
            tools.append(FunctionDef.model_validate(body))
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise ValueError(f"{where}[{i}].{loc}: {err['msg']}") from None
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: tool names must be unique (got {names})")
    return tools


def parse_tool_choice(raw: Any) -> str:
    """``auto`` / ``none`` / ``required`` or ``{type: function, name}`` -> the choice or name."""
    if isinstance(raw, str) and raw in CHOICES:
        return raw
    if isinstance(raw, dict) and raw.get("type") == "function":
        name = raw.get("name", (raw.get("function") or {}).get("name"))
        if isinstance(name, str) and name:
            return name
    raise ValueError(
        f"session.tool_choice must be one of {list(CHOICES)} or "
        f"{{'type': 'function', 'name': NAME}}, not {raw!r}"
    )


def load_tools_file(path: str) -> list[FunctionDef]:
    """The server's default voice tools (``voice_tools``): a JSON list of tools."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read a JSON list of tools ({exc})") from None
    return parse_tools(raw, where=path)


def realtime_tool(tool: FunctionDef) -> dict[str, Any]:
    out = {"type": "function", "name": tool.name, "description": tool.description}
    return out | {"parameters": tool.spec().parameters}


class ActionWebhook:
    """POSTs validated actions to ``url``; ``post`` returns what went wrong (None: a 2xx).
    httpx's timeout bounds each phase (connect, write, read) of the request."""

    def __init__(self, url: str, timeout_ms: float) -> None:
        self.url, self.timeout_ms = url, timeout_ms
        self.client = httpx.Client(timeout=timeout_ms / 1000, follow_redirects=False)

    def post(self, payload: dict[str, Any]) -> str | None:
        try:
            answer = self.client.post(self.url, json=payload)
        except httpx.TimeoutException:
            return f"the action webhook {self.url} did not answer within {self.timeout_ms:g} ms"
        except httpx.HTTPError as exc:
            return (
                f"the action webhook {self.url} could not be reached: {exc or type(exc).__name__}"
            )
        if not 200 <= answer.status_code < 300:
            return f"the action webhook {self.url} answered HTTP {answer.status_code}"
        return None

    def close(self) -> None:
        self.client.close()


class VoiceActions:
    """What the server's voice sessions share: the default tools (``voice_tools``, checked
    against the bundle's format at start-up) and the webhook (``action_webhook_url``)."""

    def __init__(self, config: Any, generator: Any) -> None:
        self.config, self.webhook = config, None
        try:  # a tool the bundle's format cannot write: start-up fails, naming it
            self.tools = load_tools_file(config.voice_tools) if config.voice_tools else []
            self.session(generator, "")
        except (ValueError, ToolError) as exc:
            raise RuntimeUserError(f"voice_tools: {exc}") from None
        if config.action_webhook_url:
            url, timeout_ms = config.action_webhook_url, config.action_webhook_timeout_ms
            self.webhook = ActionWebhook(url, timeout_ms)

    def session(self, generator: Any, session_id: str) -> SessionActions:
        """A new voice session's actions (the default tools, tool_choice auto)."""
        fmt = tool_format(generator.engine.manifest)
        fallback = self.config.action_failed_reply
        return SessionActions(generator, fmt, self.tools, self.webhook, fallback, session_id)

    def close(self) -> None:
        if self.webhook is not None:
            self.webhook.close()


class SessionActions:
    """One voice session's tools, tool choice and webhook; ``for_reply`` gives each reply
    its ``ReplyActions`` (None: actions are off, the reply is plain text)."""

    def __init__(
        self,
        generator: Any,
        fmt: str,
        tools: list[FunctionDef],
        webhook: ActionWebhook | None = None,
        fallback: str = "",
        session_id: str = "",
    ) -> None:
        self.generator, self.fmt = generator, fmt
        self.webhook, self.fallback, self.session_id = webhook, fallback, session_id
        self.tools: list[FunctionDef] = []
        self.choice = "auto"
        self._grammar: str | None = None
        self.accepted: tuple[list, str, Any] = ([], "auto", None)  # the latest session.update's
        self.call_ids: set[str] = set()  # calls made in this session (function_call_output)
        self.set(tools, "auto")

    def check(self, tools: list[FunctionDef] | None, choice: str | None) -> tuple[list, str, Any]:
        """(tools, choice, grammar) after a ``session.update`` (over the last one accepted,
        which may not be applied yet); ValueError if they cannot be used together or
        written in the bundle's format (nothing changes then)."""
        tools = self.accepted[0] if tools is None else tools
        choice = self.accepted[1] if choice is None else choice
        if choice not in CHOICES and choice not in [t.name for t in tools]:
            raise ValueError(f"session.tool_choice names {choice!r}, which is not among the tools")
        if choice == "required" and not tools:
            raise ValueError("session.tool_choice 'required' needs tools")
        specs = [t.spec() for t in tools]
        try:  # a tool the format cannot write is refused here, whatever the choice
            grammar = reply_grammar(specs, self.fmt, choice if choice != "none" else "auto")
        except ToolError as exc:
            raise ValueError(f"session.tools: {exc}") from None
        if choice in ("auto", "none") or not tools:
            return tools, choice, None
        try:  # decoded under the grammar: compile it now (llguidance), not per reply
            source = lark_grammar(grammar)
            self.generator.grammars.constraint(source)
        except Exception as exc:
            raise ValueError(f"session.tool_choice {choice!r}: cannot decode under the "
                             f"tools' grammar ({exc})") from None  # fmt: skip
        return tools, choice, source

    def set(self, tools: list[FunctionDef] | None, choice: str | None) -> None:
        self.accepted = self.check(tools, choice)
        self.apply(self.accepted)

    def apply(self, checked: tuple[list, str, Any]) -> None:
        """Use what ``check`` returned (on the session's input thread, in order with audio)."""
        self.tools, self.choice, self._grammar = checked
        self.specs = [t.spec() for t in self.tools]  # what each reply's parser takes

    def view(self) -> dict[str, Any]:
        choice = self.choice
        shown = choice if choice in CHOICES else {"type": "function", "name": choice}
        return {"tools": [realtime_tool(t) for t in self.tools], "tool_choice": shown}

    def for_reply(self, reply: Any) -> ReplyActions | None:
        if not self.tools or self.choice == "none":
            return None
        constraint = None
        if self._grammar is not None:
            constraint = self.generator.grammars.constraint(self._grammar)
        return ReplyActions(self, reply, constraint)


class ReplyActions:
    """The calls one reply makes; see the module docstring. ``feed`` / ``close`` run on the
    generation thread, ``settle`` on the speech thread."""

    def __init__(self, owner: SessionActions, reply: Any, constraint: Any = None) -> None:
        self.owner, self.reply, self.constraint = owner, reply, constraint
        self.tools = {t.name: t for t in owner.tools}
        self.stream = ToolStream(owner.specs, owner.fmt)
        self.opener = "[" if owner.fmt == "bracket" else "<tool_call>"
        self.calls: list[dict[str, Any]] = []  # the validated calls, as function_call items
        self._args: list[dict[str, Any]] = []
        self.problem: str | None = None  # "code: message" of what failed
        self.fallback = owner.fallback
        self.decided = threading.Event()  # every call of the reply is known (or one failed)
        self._settled: bool | None = None
        self._posted = threading.Event()  # the webhook has answered every call (or failed)
        if owner.webhook is not None:
            threading.Thread(target=self._post, name=f"act-{reply.id}", daemon=True).start()

    # --- generation thread ----------------------------------------------------------------

    def feed(self, piece: str) -> bool:
        """A piece of the reply's text; False: an action failed, stop generating."""
        if self.decided.is_set():
            return self.problem is None
        for kind, value in self.stream.feed(piece):
            self._call(value) if kind == "call" else self._text(value)
            if self.decided.is_set():
                break
        if not self.decided.is_set():
            self._early(self.stream.buffer.lstrip(" \n"))
        return self.problem is None

    def _early(self, head: str) -> None:
        """A call still open that cannot become a valid one: refused now, not at its end
        (the fallback is spoken without waiting for the rest of the reply)."""
        if not head.startswith(self.opener):
            return
        if len(head) > MAX_CALL_CHARS:
            self._text(head)  # malformed
            return
        named = _BRACKET_NAME.match(head) if self.owner.fmt == "bracket" else None
        if named and named.group(1) not in self.tools:
            known = ", ".join(sorted(self.tools))
            self.fail("invalid_action", f"the reply's action {head[:40]!r}... names "
                      f"{named.group(1)!r}, which is not among the session's tools ({known})")  # fmt: skip

    def close(self, cancelled: bool = False) -> None:
        """The reply's generation ended (``cancelled``: cut short, nothing is judged)."""
        if not self.decided.is_set() and not cancelled:
            for _, value in self.stream.close():
                self._text(value)
        self.decided.set()

    def _text(self, text: str) -> None:
        if self.decided.is_set():
            return
        head = text.lstrip(" \n")
        if head.startswith(self.opener):  # an action that is not a call of the format
            shown = head[:80] + ("..." if len(head) > 80 else "")
            self.fail("invalid_action", f"the reply's action {shown!r} is not a well-formed "
                      f"{self.owner.fmt} call of the session's tools")  # fmt: skip
        self.decided.set()

    def _call(self, call: ToolCall) -> None:
        written = format_calls([call], self.owner.fmt)
        tool = self.tools.get(call.name)
        if tool is None:
            known = ", ".join(sorted(self.tools))
            self.fail("invalid_action", f"the reply's action {written!r} names {call.name!r}, "
                      f"which is not among the session's tools ({known})")  # fmt: skip
            return
        problem = validate_arguments(call.arguments, tool.spec().parameters)
        if problem is not None:
            self.fail("invalid_action", f"the reply's action {written!r} does not fit the "
                      f"schema of {call.name!r}: {problem}")  # fmt: skip
            return
        index, item_id = len(self.calls), new_id("item")
        call_id = "call_" + uuid.uuid4().hex[:24]
        args = json.dumps(call.arguments)
        item = {"id": item_id, "object": "realtime.item", "type": "function_call",
                "status": "in_progress", "name": call.name, "call_id": call_id}  # fmt: skip
        where = {"response_id": self.reply.id, "item_id": item_id, "output_index": index}
        emit = self.reply._emit
        emit({"type": "response.output_item.added", "response_id": self.reply.id,
              "output_index": index, "item": item | {"arguments": ""}})  # fmt: skip
        emit({"type": "response.function_call_arguments.delta", **where, "call_id": call_id,
              "delta": args})  # fmt: skip
        emit({"type": "response.function_call_arguments.done", **where, "call_id": call_id,
              "name": call.name, "arguments": args})  # fmt: skip
        done = item | {"status": "completed", "arguments": args}
        emit({"type": "response.output_item.done", "response_id": self.reply.id,
              "output_index": index, "item": done})  # fmt: skip
        self.calls.append(done)
        self._args.append(call.arguments)
        self.owner.call_ids.add(call_id)

    def fail(self, code: str, message: str) -> None:
        self.problem = f"{code}: {message}"
        self.decided.set()
        self.reply._emit({"type": "error", "error": {"type": "action_error", "code": code,
                          "message": message, "param": None}})  # fmt: skip

    # --- speech thread --------------------------------------------------------------------

    def settle(self, cancel: threading.Event) -> bool:
        """Whether the reply may speak its confirmation: its calls are known and valid and,
        with a webhook, each one was acknowledged (2xx). Called by the speech thread once
        the reply is released; waits for nothing else."""
        if self.owner.webhook is None:
            return self._valid(cancel)
        while not self._posted.wait(0.02):
            if cancel.is_set():
                return False
        return bool(self._settled)

    def _valid(self, cancel: threading.Event) -> bool:
        while not self.decided.wait(0.02) and not cancel.is_set():
            pass
        # cut (or a dropped draft) before its calls were carried out: none is
        return not cancel.is_set() and self.problem is None

    def _post(self) -> None:
        """(Its own thread, from the reply's start.) Once the reply is released and its calls
        are known, POST them in order: in parallel with the synthesis of its first phrase."""
        reply = self.reply
        reply.gate.wait()  # set on release, or on cancel (a dropped draft)
        ok = self._valid(reply.cancel_event)
        started = time.perf_counter()
        for item, args in zip(self.calls, self._args, strict=True) if ok else ():
            problem = self.owner.webhook.post(self._payload(item, args))
            if problem is not None:
                log.warning("voice action %s failed: %s", item["call_id"], problem)
                self.fail("action_webhook_failed",
                          f"{problem} (call {item['call_id']}, {item['name']})")  # fmt: skip
                ok = False
                break
        if ok and self.calls:
            reply.times.extra["action_webhook_ms"] = round(
                1000 * (time.perf_counter() - started), 1
            )
        self._settled = ok
        self._posted.set()

    def _payload(self, item: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "function_call",
            "call_id": item["call_id"],
            "name": item["name"],
            "arguments": args,
            "item_id": item["id"],
            "response_id": self.reply.id,
            "session_id": self.owner.session_id,
            "transcript": self.reply.transcript,
        }


def tools_update(session: dict, actions: SessionActions) -> tuple | None:
    """A ``session.update``'s ``tools`` / ``tool_choice``, checked for ``actions.apply``
    (None: neither is there); ValueError naming what is wrong."""
    if "tools" not in session and "tool_choice" not in session:
        return None
    tools = parse_tools(session["tools"]) if "tools" in session else None
    choice = parse_tool_choice(session["tool_choice"]) if "tool_choice" in session else None
    return actions.check(tools, choice)


def record_call_output(
    session: Any, item: Any, actions: SessionActions, emit: Callable[[dict], None]
) -> tuple[str, str, str] | None:
    """``conversation.item.create`` of a ``function_call_output`` (Realtime shape): the
    result of a call this session made joins the voice history as a turn the next prompts
    are rendered after, then ``conversation.item.created``. Returns (code, message, param)
    of what is wrong with the item (nothing is recorded then)."""
    if not isinstance(item, dict) or item.get("type") != "function_call_output":
        return ("invalid_item", "conversation.item.create takes an item of type "
                "'function_call_output' ({'type': 'function_call_output', 'call_id': ..., "
                "'output': ...}) on this server", "item")  # fmt: skip
    call_id, output = item.get("call_id"), item.get("output")
    if not isinstance(call_id, str) or call_id not in actions.call_ids:
        return ("unknown_call_id", f"item.call_id {call_id!r} is not the call_id of a "
                "function call made in this session", "item.call_id")  # fmt: skip
    if not isinstance(output, str) or len(output) > MAX_OUTPUT_CHARS:
        return ("invalid_item", f"item.output must be a string of at most {MAX_OUTPUT_CHARS} "
                "characters", "item.output")  # fmt: skip
    item_id = item.get("id") if isinstance(item.get("id"), str) else new_id("item")
    created = {"id": item_id[:64], "object": "realtime.item", "type": "function_call_output"}

    def record() -> None:  # on the session's input thread, in order with the audio
        reserve = session.settings.max_new_tokens
        session.prompt.add_turn(f"tool result ({call_id}): {output}", "", reserve=reserve)
        item = created | {"call_id": call_id, "output": output}
        emit({"type": "conversation.item.created", "item": item})

    session.call(record)
    return None
