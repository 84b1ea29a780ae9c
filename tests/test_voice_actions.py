"""Actions in the voice path over a real WebSocket on 127.0.0.1: espeak-ng speech in,
Realtime function-call events out, each validated action POSTed to a real webhook server.

The tiny model's free replies are noise that opens a ``[`` and never closes it; with
``tool_choice="required"`` the reply is decoded under the tools' grammar, so a valid call
comes every time. Both are the server's own code path: the first gives ``invalid_action``,
the second the function-call events and the webhook (answering 200, 500 or too late).
"""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError
from websockets.sync.client import connect

from moe2edge.distill.demo_domain import demo_tools
from moe2edge.runtime import Generator
from moe2edge.runtime.errors import RuntimeUserError
from moe2edge.runtime.server import ServerConfig, create_app
from moe2edge.runtime.server.tools import tool_format, validate_arguments
from moe2edge.runtime.server.voice_actions import ActionWebhook, SessionActions, parse_tools
from moe2edge.runtime.voice import SAMPLE_RATE, EspeakSynthesizer
from moe2edge.runtime.voice.history import VoiceConversation
from moe2edge.runtime.voice.reply import Reply, ReplyOptions, TurnTimes
from tests.conftest import require_tool
from tests.server_helpers import ServerThread, frames, speech
from tests.test_server_voice import AUTH, errors_for, recv, until

pytest.importorskip("llguidance")  # tool_choice "required": decoded under the tools' grammar
pytestmark = require_tool("espeak-ng", install="apt-get install espeak-ng (make system-deps)")
TOOLS = [t["function"] | {"type": "function"} for t in demo_tools()]  # the Realtime shape
SCHEMAS = {t["name"]: t["parameters"] for t in TOOLS}
TIMEOUT_MS = 400
FALLBACK = "Sorry, I could not do that."
CALL_EVENTS = (
    "response.output_item.added",
    "response.function_call_arguments.delta",
    "response.function_call_arguments.done",
    "response.output_item.done",
)


class Webhook:
    """A real HTTP server on 127.0.0.1 that records each POSTed action and answers as
    ``mode`` says: ok (200), error (500) or slow (answers after the server's timeout)."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.received: list[tuple[float, dict]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                hook.received.append((time.perf_counter(), body))
                if hook.mode == "slow":
                    time.sleep(3 * TIMEOUT_MS / 1000)
                status = 500 if hook.mode == "error" else 200
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/actions"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


@pytest.fixture(scope="module")
def generator(tiny_run) -> Generator:
    return Generator.from_bundle(tiny_run["bundle"], threads=1)


@pytest.fixture(scope="module")
def server(tiny_run, webhook, generator):
    config = ServerConfig(
        grammar=str(tiny_run["grammar"]),
        token="t0k",
        action_webhook_url=webhook.url,
        action_webhook_timeout_ms=TIMEOUT_MS,
        action_failed_reply=FALLBACK,
    )
    with ServerThread(create_app(config, generator=generator)) as srv:
        yield srv


def open_session(ws, tool_choice="required", tools=TOOLS) -> dict:
    recv(ws)  # session.created
    update = {
        "tools": tools,
        "tool_choice": tool_choice,
        "max_response_output_tokens": 40,
        "turn_detection": {"type": "server_vad", "silence_duration_ms": 250},
    }
    ws.send(json.dumps({"type": "session.update", "session": update}))
    return until(ws, "session.updated")[-1]["session"]


def turn(ws, utterance: str) -> list[dict]:
    for frame in frames(speech(utterance)):
        ws.send(frame)
    return until(ws, "response.done", timeout=30, feed_silence=True)


def audio_s(events: list[dict]) -> float:
    chunks = [e["delta"] for e in events if e["type"] == "response.audio.delta"]
    return sum(len(base64.b64decode(c)) / 2 / SAMPLE_RATE for c in chunks)


def test_validated_action_events_webhook_then_confirmation(server, webhook) -> None:
    webhook.mode, webhook.received[:] = "ok", []
    with connect(server.ws_url, additional_headers=AUTH) as ws:
        session = open_session(ws)
        assert session["tool_choice"] == "required"
        assert [t["name"] for t in session["tools"]] == [t["name"] for t in TOOLS]
        events = turn(ws, "turn off the kitchen lights")
        kinds = [e["type"] for e in events]
        assert not any(e["type"] == "error" for e in events), events
        done = events[-1]["response"]
        assert done["status"] in ("completed", "incomplete"), done
        calls = [o for o in done["output"] if o["type"] == "function_call"]
        assert calls and done["output"][-1]["type"] == "message"
        # each call: added, arguments delta and done, item done, in that order
        for index, call in enumerate(calls):
            mine = [
                e for e in events if e.get("output_index") == index and e["type"] in CALL_EVENTS
            ]
            assert [e["type"] for e in mine] == list(CALL_EVENTS), mine
            added, delta, args_done, item_done = mine
            assert added["item"]["type"] == "function_call"
            assert added["item"]["status"] == "in_progress"
            assert added["item"]["name"] == call["name"] and added["item"]["call_id"]
            assert delta["delta"] == args_done["arguments"] == call["arguments"]
            assert item_done["item"] == call and call["status"] == "completed"
            arguments = json.loads(call["arguments"])
            assert validate_arguments(arguments, SCHEMAS[call["name"]]) is None, call
        text = "".join(e["delta"] for e in events if e["type"] == "response.text.delta")
        assert text.lstrip().startswith("[" + calls[0]["name"] + " ")
        # the webhook got every validated action, before the first audio went out
        assert [(b["call_id"], b["name"], b["arguments"]) for _, b in webhook.received] == [
            (c["call_id"], c["name"], json.loads(c["arguments"])) for c in calls
        ]
        body = webhook.received[0][1]
        assert body["response_id"] == done["id"] and body["session_id"].startswith("sess_")
        assert body["transcript"] == "turn off the kitchen lights"
        first_audio = kinds.index("response.audio.delta")
        last_call = max(i for i, k in enumerate(kinds) if k == "response.output_item.done")
        assert last_call < first_audio < kinds.index("response.done")
        assert webhook.received[-1][0] < events[first_audio]["_at"]
        timings = next(e for e in events if e["type"] == "turn.timings")
        assert timings["action_webhook_ms"] >= 0
        # the client answers a call: it joins the history; a call it did not make is refused
        call_id = calls[0]["call_id"]
        item = {"type": "function_call_output", "call_id": call_id, "output": '{"ok": true}'}
        ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
        created = until(ws, "conversation.item.created")[-1]["item"]
        assert (created["call_id"], created["output"]) == (call_id, '{"ok": true}')
        err = errors_for(ws, json.dumps({"type": "conversation.item.create",
                                         "item": item | {"call_id": "call_nope"}}))  # fmt: skip
        assert err["code"] == "unknown_call_id" and "call_nope" in err["message"]
        err = errors_for(ws, json.dumps({"type": "conversation.item.create", "item": {}}))
        assert err["code"] == "invalid_item"
        # and the next turn is served after the recorded result
        again = turn(ws, "lock the garage door")
        assert again[-1]["response"]["status"] in ("completed", "incomplete")


def test_webhook_failure_and_timeout_are_error_events_and_the_session_goes_on(
    server, webhook
) -> None:
    webhook.received[:] = []
    with connect(server.ws_url, additional_headers=AUTH) as ws:
        open_session(ws)
        outcomes = {}
        for mode, expected in (("error", "HTTP 500"), ("slow", f"within {TIMEOUT_MS} ms")):
            webhook.mode = mode
            events = turn(ws, "turn off the kitchen lights")
            errors = [e["error"] for e in events if e["type"] == "error"]
            assert [e["code"] for e in errors] == ["action_webhook_failed"], errors
            assert expected in errors[0]["message"] and webhook.url in errors[0]["message"]
            done = events[-1]["response"]
            assert done["status"] == "failed", done
            assert "action_webhook_failed" in done["status_details"]["error"]["message"]
            kinds = [e["type"] for e in events]
            # the confirmation is not spoken: only the fallback phrase, after the error
            assert kinds.index("error") < kinds.index("response.audio.delta")
            outcomes[mode] = audio_s(events)
        webhook.mode = "ok"
        events = turn(ws, "turn on the kitchen lights")
        assert not any(e["type"] == "error" for e in events), events
        assert events[-1]["response"]["status"] in ("completed", "incomplete")
        assert len(webhook.received) >= 3  # one call (at least) per turn reached the webhook
    # the fallback is one short phrase (about 1.5 s of espeak at 175 wpm)
    assert all(0.5 < s < 3.0 for s in outcomes.values()), outcomes


def test_invalid_action_is_an_error_and_reaches_no_webhook(server, webhook) -> None:
    webhook.mode, webhook.received[:] = "ok", []
    with connect(server.ws_url, additional_headers=AUTH) as ws:
        # decoded freely, and the only tool is one the model never saw: whatever action it
        # writes (the tiny model: "[f room=...") is not a call of the session's tools
        wave = {"type": "function", "name": "arm.wave", "parameters": {"type": "object"}}
        open_session(ws, tool_choice="auto", tools=[wave])
        events = turn(ws, "turn off the kitchen lights")
        errors = [e["error"] for e in events if e["type"] == "error"]
        assert [e["code"] for e in errors] == ["invalid_action"], errors
        assert errors[0]["message"].startswith("the reply's action '[")  # "[f room=..."
        assert not any(e["type"] in CALL_EVENTS for e in events)
        done = events[-1]["response"]
        assert done["status"] == "failed"
        assert [o["type"] for o in done["output"]] == ["message"]
        assert 0.5 < audio_s(events) < 3.0  # the fallback phrase, not the noise
        time.sleep(0.2)
        assert webhook.received == []
        assert errors_for(ws, "nope")["code"] == "invalid_json"  # still answering


def test_bad_tools_are_refused_by_session_update(server) -> None:
    with connect(server.ws_url, additional_headers=AUTH) as ws:
        created = recv(ws)["session"]
        assert created["tools"] == [] and created["tool_choice"] == "auto"

        def refused(session: dict) -> str:
            err = errors_for(ws, json.dumps({"type": "session.update", "session": session}))
            assert err["code"] == "invalid_session", err
            return err["message"]

        assert "session.tools must be a list" in refused({"tools": {"name": "x"}})
        assert "session.tools[0].name" in refused({"tools": [{"type": "function", "name": "a b"}]})
        assert "unique" in refused({"tools": TOOLS[:1] * 2})
        assert "'nope'" in refused({"tools": TOOLS, "tool_choice": {"type": "function",
                                                                   "name": "nope"}})  # fmt: skip
        assert "needs tools" in refused({"tool_choice": "required"})
        nested = {"type": "function", "name": "arm.move",
                  "parameters": {"type": "object", "properties": {"to": {"type": "object"}}}}  # fmt: skip
        assert "arm.move" in refused({"tools": [nested]})  # the bracket format cannot write it
        ws.send(json.dumps({"type": "session.update", "session": {}}))
        assert until(ws, "session.updated")[-1]["session"]["tools"] == []  # nothing changed
        # an update is checked over the one before it, even before that one is applied
        ws.send(json.dumps({"type": "session.update", "session": {"tools": TOOLS[:2]}}))
        ws.send(json.dumps({"type": "session.update", "session": {"tool_choice": "required"}}))
        first, second = until(ws, "session.updated")[-1], until(ws, "session.updated")[-1]
        assert [t["name"] for t in first["session"]["tools"]] == [t["name"] for t in TOOLS[:2]]
        assert second["session"]["tool_choice"] == "required"


def test_a_dropped_draft_calls_no_webhook_a_released_one_does(generator, webhook) -> None:
    """A held reply (a draft made during the end silence) validates its calls but sends
    nothing; dropped, nothing reaches the webhook, released, its calls do."""
    hook = ActionWebhook(webhook.url, TIMEOUT_MS)
    actions = SessionActions(
        generator, tool_format(generator.engine.manifest), parse_tools(TOOLS), hook, FALLBACK
    )
    actions.set(None, "required")
    webhook.mode, webhook.received[:] = "ok", []
    outcomes = []
    for release in (False, True):
        events: list[dict] = []
        prompt = VoiceConversation(generator, history_turns=0)
        ids = prompt.prompt("turn off the kitchen lights")
        reply = Reply(generator, EspeakSynthesizer(), events.append, "turn off the kitchen lights",
                      "item_x", prompt.fork(), ids, ReplyOptions(max_new_tokens=24), TurnTimes(),
                      held=True, actions=actions.for_reply).start()  # fmt: skip
        assert reply.actions.decided.wait(20) and reply.actions.calls  # validated while held
        time.sleep(0.3)
        assert events == [] and webhook.received == []
        reply.release() if release else reply.discard()
        assert reply.done.wait(20)
        outcomes.append([b["call_id"] for _, b in webhook.received])
        webhook.received[:] = []
        if release:
            assert [c["call_id"] for c in reply.actions.calls] == outcomes[-1]
            assert any(e["type"] == "response.output_item.done" for e in events)
        else:
            assert events == []
    hook.close()
    assert outcomes[0] == [] and outcomes[1]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[lights.dim room=attic_2 value=30] Dimming", "arguments.room: 'attic_2' is not one of"),
        ("[lights.dim room=kitchen] Dimming", "arguments.value is required"),
        (
            "[lights.dim room=kitchen value=30 colour=red] Dimming",
            "arguments.colour is not allowed",
        ),
        ("[oven.on room=kitchen] Heating", "names 'oven.on', which is not among"),
        ("[oven.on room=kitch", "names 'oven.on', which is not among"),  # refused before its end
        ("[lights.dim room kitchen] Done", "not a well-formed bracket call"),
        ("[lights.dim room=kitchen value=30] Dimming the kitchen.", None),
        ("Okay, the lights stay as they are.", None),  # no action: nothing to check
    ],
)
def test_reply_actions_validate_each_call(generator, text, problem) -> None:
    """Replies the tiny model does not write, through a real Reply's actions (its own
    parser and validator): each invalid call is refused naming the problem."""
    actions = SessionActions(generator, "bracket", parse_tools(TOOLS))
    events: list[dict] = []
    reply = Reply(
        generator,
        EspeakSynthesizer(),
        events.append,
        "t",
        "item_x",
        None,
        [1],
        ReplyOptions(),
        TurnTimes(),
        actions=actions.for_reply,
    )  # fmt: skip (not started)
    fed = [reply.actions.feed(text[i : i + 3]) for i in range(0, len(text), 3)]
    reply.actions.close()
    errors = [e["error"] for e in events if e["type"] == "error"]
    if problem is None:
        assert errors == [] and all(fed) and reply.actions.problem is None
        assert len(reply.actions.calls) == text.startswith("[")
        assert reply.actions.settle(threading.Event())
        return
    assert [e["code"] for e in errors] == ["invalid_action"] and problem in errors[0]["message"]
    assert not any(e["type"] in CALL_EVENTS for e in events) and reply.actions.calls == []
    assert fed[-1] is False and not reply.actions.settle(threading.Event())


def test_server_default_tools_and_the_action_settings(tmp_path, tiny_run, generator) -> None:
    path = tmp_path / "tools.json"
    path.write_text(json.dumps(demo_tools()))  # the chat API's shape
    config = ServerConfig(grammar=str(tiny_run["grammar"]), voice_tools=str(path))
    with ServerThread(create_app(config, generator=generator)) as srv, connect(srv.ws_url) as ws:
        created = recv(ws)["session"]
        assert [t["name"] for t in created["tools"]] == [t["name"] for t in TOOLS]
        assert created["tools"][0]["parameters"] == TOOLS[0]["parameters"]
        assert created["tool_choice"] == "auto"
    bad = tmp_path / "bad.json"
    for text, problem in (("{", "cannot read"), ('{"name": "x"}', "must be a list"),
                          (json.dumps([{"type": "function", "name": "arm", "parameters": {
                              "type": "object", "properties": {"to": {"type": "array"}}}}]),
                           "tool 'arm' property 'to'")):  # fmt: skip
        bad.write_text(text)
        with pytest.raises(RuntimeUserError, match=problem):
            create_app(ServerConfig(voice_tools=str(bad)), generator=generator)
    for values, problem in (
        ({"voice_tools": str(tmp_path / "none.json")}, "does not exist"),
        ({"action_webhook_url": "ftp://robot/actions"}, "http:// or https://"),
        ({"action_webhook_timeout_ms": 5}, "greater than or equal to 10"),
        ({"action_webhook_timeout_ms": float("nan")}, "finite"),
    ):
        with pytest.raises(ValidationError, match=problem):
            ServerConfig(**values)
