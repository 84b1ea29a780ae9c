"""The voice pipeline without a server: real speech through VAD, pocketsphinx, incremental
prefill, generation and espeak-ng; the KV cache bookkeeping behind incremental prefill."""

from __future__ import annotations

import base64
import math
import threading
import time

import numpy as np
import pytest

from moe2edge.runtime import Generator, SamplingParams
from moe2edge.runtime.session import common_prefix_len
from moe2edge.runtime.voice import (
    FRAME_SAMPLES,
    SAMPLE_RATE,
    EspeakSynthesizer,
    PocketsphinxRecognizer,
)
from moe2edge.runtime.voice.history import VoiceConversation
from moe2edge.runtime.voice.pipeline import VoiceSession, VoiceSettings
from moe2edge.runtime.voice.reply import SpeechText
from tests.conftest import require_tool
from tests.server_helpers import frames, speech

pytestmark = require_tool("espeak-ng", install="apt-get install espeak-ng (make system-deps)")


@pytest.fixture(scope="module")
def generator(tiny_run) -> Generator:
    return Generator.from_bundle(tiny_run["bundle"], threads=1)


def greedy(generator: Generator, text: str, n: int = 12) -> str:
    return generator.generate(text, SamplingParams(max_new_tokens=n)).text


def test_incremental_prefill_rolls_back_and_matches_a_fresh_prompt(generator) -> None:
    prompt = VoiceConversation(generator, history_turns=0)
    final = "turn on the kitchen lights"
    full = generator.encode_prompt(final)
    head = len(prompt.tokens)  # BOS and the template's head, before any word
    assert full[:head] == prompt.tokens and head >= 1
    ran = []
    for partial in ["turn", "turn off the", "turn off the kitchen", "turn on the kitchen",
                    "turn on the kitchen lights"]:  # fmt: skip
        ran.append(prompt.prefill_partial(partial))
        words = partial.split()[:-1]
        if words:  # the cache holds exactly the stable words' tokens
            assert prompt.tokens == generator.encode_prompt(" ".join(words))[: len(prompt.tokens)]
    assert sum(ran) > 0
    conversation = prompt.fork()
    assert len(full) - common_prefix_len(conversation.tokens, full) <= 4  # mostly prefilled
    conversation.sync(full)
    assert conversation.tokens == full
    reply = "".join(conversation.stream(SamplingParams(max_new_tokens=12)))
    assert reply == greedy(generator, final)
    # a transcript that disagrees from its first word rolls back to the template's head
    other = generator.encode_prompt("lock the garage door")
    conversation2 = prompt.fork()
    assert conversation2.sync(other).rewound > 0 and conversation2.tokens == other
    reply2 = "".join(conversation2.stream(SamplingParams(max_new_tokens=12)))
    assert reply2 == greedy(generator, "lock the garage door")


def test_speech_text_drops_action_tags_across_pieces() -> None:
    speech_text = SpeechText()
    pieces = ["[lig", "hts.on room", "=kitchen]", " ok,", " the [x] lights", " are on."]
    assert "".join(speech_text.push(p) for p in pieces) == " ok, the  lights are on."
    assert SpeechText(speak_brackets=True).push("[a] b") == "[a] b"


class Collector:
    def __init__(self) -> None:
        self.events: list[tuple[float, dict]] = []
        self.lock = threading.Lock()

    def __call__(self, event: dict) -> None:
        with self.lock:
            self.events.append((time.perf_counter(), event))

    def of(self, kind: str) -> list[dict]:
        with self.lock:
            return [e for _, e in self.events if e["type"] == kind]

    def first_at(self, kind: str) -> float:
        """When the first event of type ``kind`` was emitted (perf_counter)."""
        with self.lock:
            return next(t for t, e in self.events if e["type"] == kind)


@pytest.mark.parametrize("speculate", [True, False])
def test_spoken_turn_events_reply_and_timings(generator, tiny_run, speculate) -> None:
    """Frames pushed at real-time pace; the reply equals a fresh greedy reply to the text."""
    emit = Collector()
    session = VoiceSession(
        generator,
        PocketsphinxRecognizer(grammar_path=tiny_run["grammar"]),
        EspeakSynthesizer(),
        emit,
        settings=VoiceSettings(
            endpointing="fixed", speculate=speculate, max_new_tokens=12, speak_brackets=True
        ),
    ).start()
    utterance = "switch off the fan in the bedroom"
    pushed: list[float] = []  # when frame i (stream samples 320 i ..) was pushed
    try:
        start = time.perf_counter()
        for i, frame in enumerate(frames(speech(utterance, tail_s=0.5))):
            delay = start + 0.02 * i - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pushed.append(time.perf_counter())
            session.push_audio(frame, pushed[-1])
        assert session.wait_idle(20)
    finally:
        session.close()
    kinds = [e["type"] for _, e in emit.events]
    assert kinds[0] == "input_audio_buffer.speech_started"
    assert emit.of("conversation.item.input_audio_transcription.delta")
    final = emit.of("conversation.item.input_audio_transcription.completed")
    assert [e["transcript"] for e in final] == [utterance]
    done = emit.of("response.done")
    assert len(done) == 1 and done[0]["response"]["status"] in ("completed", "incomplete")
    text = "".join(e["delta"] for e in emit.of("response.text.delta"))
    assert (
        text
        == greedy(generator, utterance)
        == done[0]["response"]["output"][0]["content"][0]["text"]
    )
    timings = emit.of("turn.timings")[0]
    assert timings["drafted"] is speculate
    assert timings["prefilled_tokens"] > 1  # the partial transcripts were prefilled
    assert 300 <= timings["endpoint_ms"] - timings["audio_end_ms"] < 333
    assert timings["endpoint_delay_ms"] > 250  # the endpoint waits out the silence
    for key in ("final_transcript_ms", "response_latency_ms", "turn_latency_ms"):
        assert timings[key] is not None and timings[key] >= 0, (key, timings)
    if speculate:  # drafted during the silence: the first token came before the endpoint
        assert timings["first_token_ms"] < 0
    audio = b"".join(base64.b64decode(e["delta"]) for e in emit.of("response.audio.delta"))
    assert len(audio) > 0 and np.abs(np.frombuffer(audio, "<i2")).max() > 1000
    # the latencies, measured here from known instants: the endpoint is when speech_stopped
    # went out, the last voiced frame is the one holding audio_end_ms, pushed by this test
    first_audio = emit.first_at("response.audio.delta")
    kinds = [e["type"] for _, e in emit.events]
    assert (
        kinds.index("input_audio_buffer.speech_stopped")
        < kinds.index("conversation.item.input_audio_transcription.completed")
        < kinds.index("response.audio.delta")
        < kinds.index("turn.timings")
        < kinds.index("response.done")
    ), kinds
    endpoint = emit.first_at("input_audio_buffer.speech_stopped")
    assert abs(1000 * (first_audio - endpoint) - timings["response_latency_ms"]) < 20, timings
    end_sample = round(timings["audio_end_ms"] * SAMPLE_RATE / 1000)
    last_voiced = pushed[math.ceil(end_sample / FRAME_SAMPLES) - 1]
    assert abs(1000 * (first_audio - last_voiced) - timings["turn_latency_ms"]) < 20, timings


def test_prespawned_espeak_sounds_the_same_and_cleans_up() -> None:
    from moe2edge.runtime.voice.prespawn import PrespawnedEspeak

    text = "sure, the kitchen lights are on."
    warm = PrespawnedEspeak(spares=2)
    spares = list(warm._ready)
    assert len(spares) == 2 and all(p.poll() is None for p in spares)  # waiting on stdin
    for _ in range(3):  # each phrase uses a ready process and starts the next one
        assert np.array_equal(warm.synthesize(text), EspeakSynthesizer().synthesize(text))
    assert warm.synthesize("  ").size == 0
    warm.close()
    assert all(p.poll() is not None for p in spares + list(warm._ready))


def test_truncate_keeps_only_what_was_heard(generator, tiny_run) -> None:
    """``truncate`` (conversation.item.truncate): the latest reply's turn keeps only the words
    heard in the audio the client played; the KV cache follows. (The barge-in's own
    truncation runs through the server: tests/test_server_voice.py.)"""
    emit = Collector()
    session = VoiceSession(
        generator,
        PocketsphinxRecognizer(grammar_path=tiny_run["grammar"]),
        EspeakSynthesizer(),
        emit,
        settings=VoiceSettings(
            endpointing="fixed", max_new_tokens=24, speak_brackets=True, speculate=False
        ),
    ).start()
    errors: list[tuple] = []
    try:
        for frame in frames(speech("turn on the kitchen lights", tail_s=0.6)):
            session.push_audio(frame, time.perf_counter())
        assert session.wait_idle(30)
        done = emit.of("response.done")[0]["response"]
        item, full = done["output"][0]["id"], done["output"][0]["content"][0]["text"]
        assert [t[1] for t in session.prompt.turns] == [full]
        reply = session.memory.last_reply
        session.truncate(item, 100.0, lambda *e: errors.append(e))
        session.truncate("item_nope", 10.0, lambda *e: errors.append(e))
        session.truncate(item, 1e9, lambda *e: errors.append(e))
        assert session.wait_idle(10)
    finally:
        session.close()
    assert [code for code, *_ in errors] == [
        "item_truncate_invalid_item_id",
        "invalid_audio_end_ms",
    ]
    cut = list(session.prompt.turns)[-1][1]
    assert cut == reply.heard_text(100.0) and full.startswith(cut) and len(cut) < len(full)
    assert emit.of("conversation.item.truncated")[-1]["audio_end_ms"] == 100.0
    history = session.prompt._history
    assert session.prompt.tokens[: len(history)] == history  # the cache follows the history


def test_words_heard_and_text_through_words_keep_leading_tags() -> None:
    from moe2edge.runtime.voice.reply import text_through_words, words_heard

    phrases = [(0.0, 1.0, "sure,"), (1.0, 2.0, "the kitchen lights are on.")]
    assert [words_heard(phrases, ms) for ms in (0, 999, 1000, 1500, 2999, 3000, 9e9)] == [
        0, 0, 1, 2, 5, 6, 6
    ]  # fmt: skip

    text = "[lights.on room=kitchen] sure, the kitchen lights are on."
    assert text_through_words(text, 0) == "[lights.on room=kitchen]"
    assert text_through_words(text, 2) == "[lights.on room=kitchen] sure, the"
    assert text_through_words(text, 99) == text
    assert text_through_words("[a] b c", 1, speak_brackets=True) == "[a]"
