"""Voice over a real WebSocket on 127.0.0.1: espeak-ng speech in, events and audio out.

Bad messages of every kind get an error event and the connection stays usable; speech
sent while a reply is playing cancels it (barge-in).
"""

from __future__ import annotations

import base64
import json
import time

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from moe2edge.runtime import Generator
from moe2edge.runtime.server import ServerConfig, create_app
from moe2edge.runtime.voice import SAMPLE_RATE
from moe2edge.runtime.voice.pipeline import VoiceSettings
from tests.conftest import require_tool
from tests.server_helpers import ServerThread, bad_numbers, frames, numeric_fields, speech

pytestmark = require_tool("espeak-ng", install="apt-get install espeak-ng (make system-deps)")
SILENCE = bytes(640)
AUTH = {"Authorization": "Bearer t0k"}


@pytest.fixture(scope="module")
def server(tiny_run):
    generator = Generator.from_bundle(tiny_run["bundle"], threads=1)
    config = ServerConfig(grammar=str(tiny_run["grammar"]), max_ws_message_bytes=8192, token="t0k")
    with ServerThread(create_app(config, generator=generator)) as srv:
        yield srv


def recv(ws, timeout: float = 5.0) -> dict:
    """The next event, with ``_at``: when it was received (perf_counter)."""
    message = ws.recv(timeout=timeout)
    assert isinstance(message, str), "the server sends audio inside JSON events"
    return json.loads(message) | {"_at": time.perf_counter()}


def until(ws, kind: str, timeout: float = 10.0, feed_silence: bool = False) -> list[dict]:
    """Events up to and including the first of type ``kind`` (sending 20 ms of silence per
    20 ms waited when ``feed_silence``, as a live microphone would)."""
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        if feed_silence:
            ws.send(SILENCE)
        try:
            event = recv(ws, timeout=0.02 if feed_silence else deadline - time.time())
        except TimeoutError:
            continue
        seen.append(event)
        if event["type"] == kind:
            return seen
    raise AssertionError(f"no {kind} within {timeout} s; got {[e['type'] for e in seen]}")


def errors_for(ws, message) -> dict:
    ws.send(message)
    event = recv(ws)
    assert event["type"] == "error", event
    return event["error"]


def test_bad_messages_get_error_events_and_the_session_goes_on(server, tiny_run) -> None:
    with pytest.raises(ConnectionClosed) as closed, connect(server.ws_url) as ws:
        assert recv(ws)["error"]["code"] == "invalid_api_key"
        ws.recv(timeout=5)
    assert closed.value.rcvd.code == 1008

    with connect(server.ws_url, additional_headers=AUTH) as ws:
        created = recv(ws)
        assert created["type"] == "session.created"
        assert created["session"]["input_audio_sample_rate"] == SAMPLE_RATE
        assert errors_for(ws, b"\x01\x02\x03")["code"] == "invalid_audio"  # odd byte count
        err = errors_for(ws, bytes(20000))
        assert err["code"] == "message_too_large" and "8192" in err["message"]
        assert errors_for(ws, "{not json")["code"] == "invalid_json"
        assert errors_for(ws, json.dumps([1, 2]))["code"] == "invalid_event"
        err = errors_for(ws, json.dumps({"type": "conversation.frobnicate", "event_id": "e1"}))
        assert err["code"] == "unknown_event" and err["event_id"] == "e1"
        assert "session.update" in err["message"]
        truncate = {"type": "conversation.item.truncate", "item_id": "item_x", "content_index": 0}
        err = errors_for(ws, json.dumps(truncate | {"audio_end_ms": "10"}))
        assert err["code"] == "invalid_truncate" and err["param"] == "audio_end_ms"
        err = errors_for(ws, json.dumps(truncate | {"audio_end_ms": 10}))
        assert err["code"] == "item_truncate_invalid_item_id" and "none yet" in err["message"]
        err = errors_for(
            ws,
            json.dumps({"type": "session.update", "session": {"input_audio_sample_rate": 44100}}),
        )
        assert err["code"] == "unsupported_sample_rate" and "16000" in err["message"]
        err = errors_for(
            ws,
            json.dumps(
                {
                    "type": "session.update",
                    "session": {
                        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}}}
                    },
                }
            ),
        )
        assert err["code"] == "unsupported_sample_rate"
        err = errors_for(
            ws,
            json.dumps(
                {"type": "session.update", "session": {"turn_detection": {"type": "push_to_talk"}}}
            ),
        )
        assert err["code"] == "invalid_session"
        err = errors_for(ws, json.dumps({"type": "input_audio_buffer.append", "audio": "%%%"}))
        assert err["code"] == "invalid_audio"
        assert errors_for(ws, json.dumps({"type": "response.cancel"}))["code"] == (
            "response_cancel_not_active"
        )
        ws.send(
            json.dumps(
                {
                    "type": "session.update",
                    "session": {
                        "turn_detection": {"type": "server_vad", "silence_duration_ms": 250},
                        # the tiny model often answers in [brackets]: speak them so audio flows
                        "moe2edge": {"speak_brackets": True},
                    },
                }
            )
        )
        updated = until(ws, "session.updated")[-1]
        assert updated["session"]["turn_detection"]["silence_duration_ms"] == 250

        # still usable: a spoken request, half as binary frames, half as base64 appends
        utterance = "turn off the kitchen lights"
        for i, frame in enumerate(frames(speech(utterance))):
            if i % 2:
                ws.send(frame)
            else:
                ws.send(
                    json.dumps(
                        {
                            "type": "input_audio_buffer.append",
                            "audio": base64.b64encode(frame).decode(),
                        }
                    )
                )
        events = until(ws, "response.done", timeout=20, feed_silence=True)
        kinds = [e["type"] for e in events]
        final = next(e for e in events if e["type"].endswith("transcription.completed"))
        assert final["transcript"] == utterance
        assert (
            kinds.index("input_audio_buffer.speech_started")
            < kinds.index("input_audio_buffer.speech_stopped")
            < kinds.index("response.created")
        )
        stopped = next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped")
        assert 250 <= stopped["endpoint_ms"] - stopped["audio_end_ms"] < 250 + 33
        timings = next(e for e in events if e["type"] == "turn.timings")
        done = events[-1]["response"]
        assert done["status"] in ("completed", "incomplete")
        assert "response.audio.delta" in kinds, f"no reply audio: {kinds}"
        first_audio = kinds.index("response.audio.delta")
        assert (
            kinds.index("response.created")
            < first_audio
            < kinds.index("turn.timings")
            < kinds.index("response.done")
        )
        # the server's response latency (first audio - endpoint) is what the client sees
        # between speech_stopped (sent at the endpoint) and the first audio
        seen_ms = 1000 * (events[first_audio]["_at"] - stopped["_at"])
        assert timings["response_latency_ms"] > 0
        assert abs(seen_ms - timings["response_latency_ms"]) < 100, (seen_ms, timings)
        text = "".join(e["delta"] for e in events if e["type"] == "response.text.delta")
        assert text == done["output"][0]["content"][0]["text"]


VOICE_NUMBERS = numeric_fields(VoiceSettings.__pydantic_fields__)
REALTIME_PATHS = {  # settings with a Realtime API name: set there as well as under moe2edge
    "end_silence_ms": ("turn_detection", "silence_duration_ms"),
    "vad_threshold": ("turn_detection", "threshold"),
    "preroll_ms": ("turn_detection", "prefix_padding_ms"),
    "max_new_tokens": ("max_response_output_tokens",),
    "temperature": ("temperature",),
}
SETTING_PATHS = [(name, ("moe2edge", name)) for name in sorted(VOICE_NUMBERS)] + sorted(
    REALTIME_PATHS.items()
)


def _session(path: tuple[str, ...], value) -> dict:
    if path[0] == "turn_detection":
        return {"turn_detection": {"type": "server_vad", path[1]: value}}
    return {path[0]: {path[1]: value}} if len(path) == 2 else {path[0]: value}


def _shown(view: dict, name: str):
    """The setting ``name`` as session.created / session.updated show it (None: not shown)."""
    path = REALTIME_PATHS.get(name, ("moe2edge", name))
    for key in path:
        view = view.get(key) if isinstance(view, dict) else None
    return view


@pytest.mark.parametrize(
    ("name", "path"), SETTING_PATHS, ids=[".".join(p) for _, p in SETTING_PATHS]
)
def test_session_update_refuses_nan_infinity_and_out_of_range(server, name, path) -> None:
    """Each bad number is an error event naming it, nothing changes, and the session stays
    usable (NaN / Infinity go over the wire as the bare JSON literals Python reads)."""
    info = VoiceSettings.__pydantic_fields__[name]
    bad = bad_numbers(info, VOICE_NUMBERS[name])
    with connect(server.ws_url, additional_headers=AUTH) as ws:
        created = recv(ws)["session"]
        for label, value in bad:
            message = json.dumps({"type": "session.update", "session": _session(path, value)})
            err = errors_for(ws, message)
            assert err["code"] == "invalid_session", (label, err)
            assert f"session.{'.'.join(path)}" in err["message"], (label, err)
        ws.send(json.dumps({"type": "session.update", "session": {}}))
        unchanged = until(ws, "session.updated")[-1]["session"]
        assert _shown(unchanged, name) == _shown(created, name)
        (_, low), (_, high) = bad[3:]
        valid = VOICE_NUMBERS[name]((low + high) / 2)
        ws.send(json.dumps({"type": "session.update", "session": _session(path, valid)}))
        updated = until(ws, "session.updated")[-1]["session"]
        if _shown(created, name) is not None:  # first_phrase_words, max_frame_ms: not shown
            assert _shown(updated, name) == valid, updated
        assert errors_for(ws, "nope")["code"] == "invalid_json"  # still answering


def test_speech_during_a_reply_cancels_it(server) -> None:
    with connect(server.ws_url, additional_headers={"Authorization": "Bearer t0k"}) as ws:
        recv(ws)
        ws.send(
            json.dumps(
                {
                    "type": "session.update",
                    "session": {
                        "max_response_output_tokens": 90,
                        "moe2edge": {"speak_brackets": True},
                    },
                }
            )
        )
        until(ws, "session.updated")
        for frame in frames(speech("turn on the kitchen lights")):
            ws.send(frame)
        first = until(ws, "response.audio.delta", timeout=20, feed_silence=True)
        reply_id = first[-1]["response_id"]
        t_audio = time.perf_counter()
        time.sleep(0.2)  # the reply is playing
        interrupt = "set the office thermostat to twenty degrees"
        for frame in frames(speech(interrupt, voice="en-us+f3")):
            ws.send(frame)
        events = until(ws, "response.done", timeout=10, feed_silence=True)
        done = events[-1]["response"]
        assert done["id"] == reply_id
        assert done["status"] == "cancelled", done
        assert done["status_details"]["reason"] == "turn_detected"
        assert any(e["type"] == "input_audio_buffer.speech_started" for e in events)
        heard_s = sum(
            len(base64.b64decode(e["delta"])) / 2 / SAMPLE_RATE
            for e in first + events
            if e["type"] == "response.audio.delta"
        )
        timings = next(e for e in events if e["type"] == "turn.timings")
        assert timings["status"] == "cancelled"
        # the cut reply is remembered as heard: the audio played up to the barge-in
        cut = until(ws, "conversation.item.truncated", timeout=5, feed_silence=True)
        truncated = cut[-1]
        assert truncated["item_id"] == done["output"][0]["id"]
        # (events are read after the interruption is sent: their arrival times are late)
        started = next(e for e in events if e["type"] == "input_audio_buffer.speech_started")
        played_ms = 1000 * (started["_at"] - first[-1]["_at"])
        assert 150 <= truncated["audio_end_ms"] <= played_ms, (truncated, played_ms)
        assert truncated["audio_end_ms"] <= 1000 * heard_s + 1
        # what was sent stayed close to real time: cut long before the reply's end
        assert heard_s < time.perf_counter() - t_audio + 0.5
        # the interruption's turn may end before the cut turn is remembered (its audio is
        # all sent at once): its transcript comes before or after the truncation
        final = "conversation.item.input_audio_transcription.completed"
        after = list(cut)  # what came after the cancelled reply's response.done
        if not any(e["type"] == final and e["transcript"] for e in events + after):
            after += until(ws, final, timeout=10, feed_silence=True)
        heard = [e["transcript"] for e in events + after if e["type"] == final and e["transcript"]]
        assert heard == [interrupt]
        rest = after
        assert not any(
            e.get("response_id") == reply_id for e in rest if e["type"] == "response.audio.delta"
        ), "audio of the cancelled reply"
        # the second reply is long: the client cancels it (and reads what is left before closing)
        ended = [e for e in rest if e["type"] == "response.done"]
        if not any(e["type"] == "response.created" for e in rest):
            until(ws, "response.created", timeout=10, feed_silence=True)
        if not ended:
            ws.send(json.dumps({"type": "response.cancel"}))
            ended = until(ws, "response.done", timeout=10)
        done2 = ended[-1]["response"]
        assert done2["id"] != reply_id
        assert (done2["status"], done2["status_details"].get("reason")) in (
            ("cancelled", "client_cancelled"),
            ("completed", None),  # it may have finished sending just before the cancel
        ), done2


def test_client_managed_turns_with_commit(server) -> None:
    with connect(server.ws_url, additional_headers=AUTH) as ws:
        recv(ws)
        ws.send(json.dumps({"type": "session.update", "session": {"turn_detection": None}}))
        assert until(ws, "session.updated")[-1]["session"]["turn_detection"] is None
        for frame in frames(speech("lock the garage door", tail_s=0.2)):
            ws.send(frame)
        ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        events = until(ws, "response.done", timeout=20)
        final = next(e for e in events if e["type"].endswith("transcription.completed"))
        assert final["transcript"] == "lock the garage door"
        assert np.isfinite(
            next(e for e in events if e["type"] == "turn.timings")["final_transcript_ms"]
        )


def test_voice_session_limit(tiny_run) -> None:
    generator = Generator.from_bundle(tiny_run["bundle"], threads=1)
    config = ServerConfig(grammar=str(tiny_run["grammar"]), max_voice_sessions=1)
    with ServerThread(create_app(config, generator=generator)) as srv, connect(srv.ws_url) as ws1:
        assert recv(ws1)["type"] == "session.created"
        with pytest.raises(ConnectionClosed) as closed, connect(srv.ws_url) as ws2:
            err = recv(ws2)["error"]
            assert err["code"] == "server_busy" and "1 voice sessions" in err["message"]
            ws2.recv(timeout=5)
        assert closed.value.rcvd.code == 1013
        ws1.send(bytes(640))  # the first session is unaffected
        assert errors_for(ws1, "nope")["code"] == "invalid_json"
