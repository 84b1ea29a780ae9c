"""Ready to speak at the endpoint, on real parts (espeak-ng speech, Silero, pocketsphinx with
the demo grammar, the tiny student): the silence after a whole command counts from the drop
in energy, and the reply is drafted while the user is still speaking once the partial is a
whole command, then rolled back when the partial changes."""

from __future__ import annotations

import pytest

from moe2edge.runtime import Generator
from moe2edge.runtime.voice import SAMPLE_RATE
from moe2edge.runtime.voice.vad import VoiceActivityDetector
from tests.conftest import require_tool
from tests.test_voice_endpoint import of, run_turn, spoken

pytestmark = require_tool("espeak-ng", install="apt-get install espeak-ng (make system-deps)")


@pytest.fixture(scope="module")
def generator(tiny_run) -> Generator:
    return Generator.from_bundle(tiny_run["bundle"], threads=1)


def test_energy_finds_the_end_of_speech_before_silero_does() -> None:
    audio, true_end = spoken(["turn on the kitchen lights"], pause_ms=0)
    vad = VoiceActivityDetector()
    end = int(true_end * SAMPLE_RATE / 1000)
    vad.feed(audio[: end + int(0.096 * SAMPLE_RATE)])  # 96 ms past the true end
    assert vad.in_speech
    # Silero still calls some of the fading tail speech; the energy says it is over
    assert vad.early_silence_ms() > vad.silence_ms
    assert 48 <= vad.early_silence_ms() <= 96 + 32
    # in the middle of the speech there is no early silence to count
    vad = VoiceActivityDetector()
    vad.feed(audio[: end - int(0.3 * SAMPLE_RATE)])
    assert vad.in_speech and vad.early_silence_ms() < 32


def drafts_of(generator, grammar, audio, **settings) -> tuple[list[dict], list[dict]]:
    """The turn's events and each reply the session made: its transcript, whether held (a
    draft), whether the user was still speaking and the stream position (ms)."""
    made: list[dict] = []
    from moe2edge.runtime.voice.pipeline import VoiceSession

    original = VoiceSession._make_reply

    def spy(self, transcript, times, held):
        made.append(
            {
                "transcript": transcript,
                "held": held,
                "speaking": self.turn_end.silent_windows == 0,
                "at_ms": 1000 * self.clock.samples / SAMPLE_RATE,
            }
        )
        return original(self, transcript, times, held)

    VoiceSession._make_reply = spy
    try:
        events = run_turn(generator, grammar, audio, endpointing="predictive", **settings)
    finally:
        VoiceSession._make_reply = original
    return events, made


def test_a_whole_command_is_drafted_while_it_is_still_being_said(generator, tiny_run) -> None:
    audio, true_end = spoken(["turn on the kitchen lights"], pause_ms=0)
    events, made = drafts_of(generator, tiny_run["grammar"], audio)
    early = [m for m in made if m["held"] and m["speaking"]]
    assert early and early[0]["transcript"] == "turn on the kitchen lights", made
    # the recognizer's last word lags the audio: the draft starts about when speech ends,
    # before the endpoint's silence (112 ms) is over
    assert early[0]["at_ms"] < true_end + 112
    timings = of(events, "turn.timings")[0]
    assert timings["drafted"] is True  # the draft was the reply sent

    # off: the first draft waits for a silent window
    events, made = drafts_of(generator, tiny_run["grammar"], audio, draft_while_speaking=False)
    assert made and not any(m["speaking"] for m in made)
    assert min(m["at_ms"] for m in made) > early[0]["at_ms"]


def test_a_draft_is_rolled_back_when_the_partial_goes_on(generator, tiny_run) -> None:
    text = "turn on the kitchen lights and close the bedroom curtains"
    audio, _ = spoken([text], pause_ms=0)
    events, made = drafts_of(generator, tiny_run["grammar"], audio)
    final = of(events, "conversation.item.input_audio_transcription.completed")
    assert [e["transcript"] for e in final] == [text]
    # the first half, a whole command, was drafted while speaking and then dropped
    assert any(
        m["held"] and m["speaking"] and m["transcript"] == "turn on the kitchen lights"
        for m in made
    ), made
    sent = [e for e in events if e["type"] == "response.created"]
    assert len(sent) == 1  # only the reply to the whole utterance went out
    assert made[-1]["transcript"] == text


def test_a_closed_command_is_drafted_without_waiting_for_it_to_hold(generator, tiny_run) -> None:
    """Nothing can follow a closed command, and its endpoint comes 64 ms after the speech:
    its draft starts at once, not after ``draft_stable_ms``."""
    closed = "turn on the kitchen lights and close the bedroom curtains"
    audio, true_end = spoken([closed], pause_ms=0)
    events, made = drafts_of(generator, tiny_run["grammar"], audio, draft_stable_ms=1000)
    early = [m for m in made if m["held"] and m["speaking"] and m["transcript"] == closed]
    assert early and early[0]["at_ms"] < true_end + 64, made
    assert of(events, "turn.timings")[0]["drafted"] is True
    # a command that may go on waits to hold still for draft_stable_ms while speaking
    audio, _ = spoken(["turn on the kitchen lights"], pause_ms=0)
    _, made = drafts_of(generator, tiny_run["grammar"], audio, draft_stable_ms=1000)
    assert made and not any(m["speaking"] for m in made), made
