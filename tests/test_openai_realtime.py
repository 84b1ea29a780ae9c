"""The official client: a whole voice turn driven by the `openai` package's Realtime clients
against our server on 127.0.0.1, espeak-ng speech in, the client's typed events out.

`client.realtime` (the GA schema: `response.output_audio.delta`, ...) and
`client.beta.realtime` (the beta schema, our default names: `response.audio.delta`, ...).
The client parses events without validating them (an unknown shape becomes the union's
first member), so each event is also validated strictly against the client's own model
for its type: a field we send in a shape the schema types differently fails here.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import typing

import httpx
import pytest

from moe2edge.runtime import Generator
from moe2edge.runtime.server import ServerConfig, create_app
from tests.conftest import require_module, require_tool
from tests.server_helpers import ServerThread, frames, speech

pytestmark = [
    require_tool("espeak-ng", install="apt-get install espeak-ng (make system-deps)"),
    require_module("openai", install="pip install 'moe2edge[dev]' (openai[realtime])"),
]
UTTERANCE = "turn off the kitchen lights"
OURS = ("turn.timings", "wake")  # our additions: no model in the client for these


@pytest.fixture(scope="module")
def server(tiny_run):
    generator = Generator.from_bundle(tiny_run["bundle"], threads=1)
    # the tiny model often answers in [brackets]: speak them so audio flows
    config = ServerConfig(grammar=str(tiny_run["grammar"]), token="t0k", speak_brackets=True)
    with ServerThread(create_app(config, generator=generator)) as srv:
        yield srv


def models_by_type(union) -> dict[str, type]:
    """The client's event models, by the ``type`` each one declares."""
    if typing.get_origin(union) is typing.Annotated:
        union = typing.get_args(union)[0]
    out = {}
    for model in typing.get_args(union):
        for name in typing.get_args(model.model_fields["type"].annotation):
            out[name] = model
    return out


def talk(
    connection, session: dict, commit: bool = False, stop_after: float = 30.0
) -> list[tuple[dict, object]]:
    """One spoken turn over ``connection`` (a client's RealtimeConnection): the raw and the
    typed event of each message received until ``response.done``. ``commit``: the client
    ends the turn (``input_audio_buffer.commit``) after the speech."""
    connection.session.update(session=session)
    done = threading.Event()

    def microphone() -> None:  # the speech, then 20 ms of silence per 20 ms, until done
        for frame in frames(speech(UTTERANCE, tail_s=0.1)):
            connection.input_audio_buffer.append(audio=base64.b64encode(frame).decode())
        if commit:
            connection.input_audio_buffer.commit()
        silence = base64.b64encode(bytes(640)).decode()
        deadline = time.time() + stop_after
        while not done.wait(0.02):
            if time.time() > deadline:
                connection.close()  # ends the receiving loop: the test fails below
                return
            connection.input_audio_buffer.append(audio=silence)

    mic = threading.Thread(target=microphone, daemon=True)
    mic.start()
    seen = []
    try:
        while True:
            raw = connection.recv_bytes()
            seen.append((json.loads(raw), connection.parse_event(raw)))
            if seen[-1][0]["type"] == "response.done":
                return seen
    finally:
        done.set()
        mic.join(5)


def check_turn(
    seen: list[tuple[dict, object]], models: dict[str, type], names: dict, vad: bool = True
) -> None:
    kinds = [raw["type"] for raw, _ in seen]
    for raw, typed in seen:
        if raw["type"] in OURS:
            continue
        model = models.get(raw["type"])
        assert model is not None, f"{raw['type']} is not an event of the client's schema"
        assert isinstance(typed, model), (raw["type"], type(typed))
        model.model_validate(raw)  # strict: every field in the schema's shape
    assert not [raw for raw, _ in seen if raw["type"] == "error"], seen
    typed = {raw["type"]: event for raw, event in seen}
    final = typed["conversation.item.input_audio_transcription.completed"]
    assert final.transcript == UTTERANCE
    assert final.usage.seconds > 0.5  # the utterance's audio
    # with turn detection the server says when speech starts; without, only when it ended
    assert ("input_audio_buffer.speech_started" in kinds) == vad, kinds
    assert (
        kinds.index("input_audio_buffer.speech_started" if vad else names["first"])
        < kinds.index("input_audio_buffer.speech_stopped")
        < kinds.index("response.created")
        < kinds.index(names["audio"])
        < kinds.index("response.done")
    ), kinds
    done = typed["response.done"].response
    assert done.status in ("completed", "incomplete")
    text = "".join(e.delta for raw, e in seen if raw["type"] == names["text"])
    assert text and done.output[0].content[0].text == text
    assert done.output[0].content[0].type == names["part"]
    deltas = [e for raw, e in seen if raw["type"] == names["audio"]]
    assert {e.item_id for e in deltas} == {done.output[0].id}
    assert sum(len(base64.b64decode(e.delta)) for e in deltas) > 3200  # over 0.1 s of PCM16
    assert "turn.timings" in kinds


def test_openai_realtime_client_does_a_voice_turn(server) -> None:
    from openai import OpenAI
    from openai.types.realtime import RealtimeServerEvent

    model = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer t0k"})
    name = model.json()["data"][0]["id"]
    # the client targets {websocket_base_url or base_url}/realtime?model=NAME, bearer header
    client = OpenAI(api_key="t0k", base_url=server.url + "/v1")
    session = {
        "type": "realtime",  # the GA schema's session: our server answers in GA names
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 16000},
                "turn_detection": {"type": "server_vad", "silence_duration_ms": 250},
            }
        },
    }
    with client.realtime.connect(model=name) as connection:
        created = connection.recv()
        assert created.type == "session.created", created
        seen = talk(connection, session)
    updated = next(e for raw, e in seen if raw["type"] == "session.updated")
    assert updated.session.type == "realtime"
    assert updated.session.model_extra["turn_detection"]["silence_duration_ms"] == 250
    names = {
        "audio": "response.output_audio.delta",
        "text": "response.output_text.delta",
        "part": "output_text",
    }
    check_turn(seen, models_by_type(RealtimeServerEvent), names)


def test_openai_realtime_client_ends_its_own_turn_with_commit(server) -> None:
    from openai import OpenAI
    from openai.types.realtime import RealtimeServerEvent

    client = OpenAI(api_key="t0k", base_url=server.url + "/v1")
    # GA: turn_detection null in its place, audio.input; the client commits the turn
    session = {"type": "realtime", "audio": {"input": {"turn_detection": None}}}
    with client.realtime.connect(model="any") as connection:
        assert connection.recv().type == "session.created"
        seen = talk(connection, session, commit=True)
    updated = next(e for raw, e in seen if raw["type"] == "session.updated")
    assert updated.session.model_extra["turn_detection"] is None
    committed = next(e for raw, e in seen if raw["type"] == "input_audio_buffer.committed")
    final = next(e for raw, e in seen if raw["type"].endswith("transcription.completed"))
    assert committed.item_id == final.item_id
    names = {
        "audio": "response.output_audio.delta",
        "text": "response.output_text.delta",
        "part": "output_text",
        "first": "conversation.item.input_audio_transcription.delta",
    }
    check_turn(seen, models_by_type(RealtimeServerEvent), names, vad=False)


def test_openai_beta_realtime_client_does_a_voice_turn(server) -> None:
    from openai import OpenAI
    from openai.types.beta.realtime import RealtimeServerEvent

    # the beta client always dials wss:// from base_url: a plain ws:// server needs this
    ws_base = server.url.replace("http://", "ws://") + "/v1"
    client = OpenAI(api_key="t0k", base_url=server.url + "/v1", websocket_base_url=ws_base)
    session = {"turn_detection": {"type": "server_vad", "silence_duration_ms": 250}}
    with client.beta.realtime.connect(model="any") as connection:
        assert connection.recv().type == "session.created"
        seen = talk(connection, session)
    names = {"audio": "response.audio.delta", "text": "response.text.delta", "part": "text"}
    check_turn(seen, models_by_type(RealtimeServerEvent), names)


def test_openai_client_with_a_wrong_key_gets_a_typed_error(server) -> None:
    from openai import OpenAI
    from websockets.exceptions import ConnectionClosed

    client = OpenAI(api_key="wrong", base_url=server.url + "/v1")
    with client.realtime.connect(model="any") as connection:
        event = connection.recv()
        assert event.type == "error" and event.error.code == "invalid_api_key", event
        with pytest.raises(ConnectionClosed) as closed:
            connection.recv_bytes()
    assert closed.value.rcvd.code == 1008
