"""Wake-word mode with real speech: the pipeline's gate opens on "hey robot" (a wake
event, then the command's turn) and stays closed on other speech; noise mixing is at the
SNR asked."""

from __future__ import annotations

import numpy as np
import pytest

from moe2edge.runtime import Generator
from moe2edge.runtime.voice import EspeakSynthesizer, PocketsphinxRecognizer
from moe2edge.runtime.voice.audio import mix_at_snr, speech_bounds
from moe2edge.runtime.voice.pipeline import VoiceSession, VoiceSettings
from moe2edge.runtime.voice.wake import WakeWordSpotter
from tests.conftest import require_tool
from tests.server_helpers import frames, speech
from tests.test_voice_pipeline import Collector

pytestmark = require_tool("espeak-ng", install="apt-get install espeak-ng (make system-deps)")


@pytest.fixture(scope="module")
def generator(tiny_run) -> Generator:
    return Generator.from_bundle(tiny_run["bundle"], threads=1)


def run_session(generator, tiny_run, audio: np.ndarray, **settings) -> Collector:
    emit = Collector()
    session = VoiceSession(
        generator,
        PocketsphinxRecognizer(grammar_path=tiny_run["grammar"]),
        EspeakSynthesizer(),
        emit,
        settings=VoiceSettings(endpointing="fixed", max_new_tokens=8, **settings),
    ).start()
    try:
        for frame in frames(audio):
            session.push_audio(frame)
        assert session.wait_idle(30)
    finally:
        session.close()
    return emit


def test_gate_opens_on_the_phrase_and_stays_closed_otherwise(generator, tiny_run) -> None:
    other = speech("turn on the kitchen lights", tail_s=1.2)
    woken = speech("hey robot, turn on the kitchen lights", tail_s=1.2)
    emit = run_session(
        generator,
        tiny_run,
        np.concatenate([other, woken]),
        wake_word="Hey Robot",
        wake_threshold=1e-40,
    )
    wakes = emit.of("wake")
    assert len(wakes) == 1 and wakes[0]["phrase"] == "hey robot"
    assert wakes[0]["audio_end_ms"] > 1000 * len(other) / 16000  # in the second clip
    final = emit.of("conversation.item.input_audio_transcription.completed")
    seen = [
        (e["type"], e.get("audio_start_ms"), e.get("audio_end_ms"), e.get("transcript"))
        for _, e in emit.events
        if "delta" not in e["type"]
    ]
    assert [e["transcript"] for e in final] == ["turn on the kitchen lights"], seen
    assert len(emit.of("response.done")) == 1
    # the same audio without wake mode: two turns
    plain = run_session(generator, tiny_run, np.concatenate([other, other]))
    assert len(plain.of("conversation.item.input_audio_transcription.completed")) == 2


def test_non_wake_speech_never_wakes_and_bad_phrases_are_refused() -> None:
    spotter = WakeWordSpotter("hey robot", 1e-40)
    text = "switch off the fan in the bedroom and dim the office lights to forty percent"
    assert spotter.spot(speech(text, voice="en-us+f3")) == []
    woken = speech("hey robot, turn on the kitchen lights", tail_s=1.2)
    fresh = WakeWordSpotter("hey robot", 1e-40)
    assert (
        len(fresh.spot(np.concatenate([speech("turn on the kitchen lights", tail_s=1.2), woken])))
        == 1
    )
    with pytest.raises(ValueError, match="missing from the pronunciation dictionary"):
        WakeWordSpotter("hey zqxwvrobot")


def trimmed(tts: EspeakSynthesizer, text: str) -> np.ndarray:
    start, end = speech_bounds(tts.synthesize(text))
    return tts.synthesize(text)[start:end]


def with_floor(audio: np.ndarray, seed: int = 0) -> np.ndarray:
    """A microphone's noise floor (-54 dBFS) under ``audio``, as bench/voice.py sends."""
    return audio + np.random.default_rng(seed).normal(0, 0.002, len(audio)).astype(np.float32)


def test_the_tuned_threshold_wakes_on_the_phrase_and_not_on_other_speech() -> None:
    """The default wake_threshold (tuned by bench/voice.py --sections wake) stays quiet on a
    command and a near miss, then spots "hey robot" in time, in one stream as a session's
    gate feeds it (clips built as the benchmark builds them: trimmed speech, a 0.2 s gap)."""
    tts = EspeakSynthesizer()
    spotter = WakeWordSpotter("hey robot", VoiceSettings().wake_threshold)
    for i, text in enumerate(["switch off the fan in the bedroom", "hey there, how was your day"]):
        assert spotter.spot(with_floor(speech(text, voice="en-us+f3"), seed=i)) == [], text
    phrase = trimmed(tts, "hey robot")
    lead, gap, tail = np.zeros(8000), np.zeros(3200), np.zeros(8000)
    clip = np.concatenate([lead, phrase, gap, trimmed(tts, "turn on the kitchen lights"), tail])
    origin = spotter.samples
    hits = [h - origin for h in spotter.spot(with_floor(clip.astype(np.float32), seed=3))]
    assert len(hits) == 1 and len(lead) <= hits[0] <= len(lead) + len(phrase) + 8000, hits


@pytest.mark.parametrize("snr_db", [20.0, 10.0, 5.0])
@pytest.mark.parametrize("kind", ["white", "babble"])
def test_noise_is_mixed_at_the_asked_snr(snr_db, kind) -> None:
    clean = EspeakSynthesizer().synthesize("turn on the kitchen lights")
    if kind == "white":
        noise = np.random.default_rng(0).normal(0, 0.1, len(clean)).astype(np.float32)
    else:  # another voice saying another sentence (bench/voice.py sums several)
        noise = EspeakSynthesizer(voice="en-us+f3").synthesize("close the bedroom curtains")
    mixed = mix_at_snr(clean, noise, snr_db)
    added = mixed - clean
    assert np.abs(added).max() > 0
    n = len(clean) // 320 * 320
    f = clean[:n].reshape(-1, 320)
    active = f[np.abs(f).max(axis=1) > 0.02]
    measured = 10 * np.log10(np.mean(active**2) / np.mean(added**2))
    assert abs(measured - snr_db) < 0.3, measured
