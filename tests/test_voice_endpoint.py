"""Predictive endpointing on real parts: the demo's JSGF grammar in pocketsphinx (its FSG's
final state), the tiny student's own end-of-turn probability, and whole spoken turns
(espeak-ng speech with a pause spliced in) through a real ``VoiceSession``."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest

from moe2edge.runtime import Generator
from moe2edge.runtime.session import common_prefix_len
from moe2edge.runtime.voice import SAMPLE_RATE, EspeakSynthesizer, PocketsphinxRecognizer
from moe2edge.runtime.voice.audio import speech_bounds
from moe2edge.runtime.voice.endpoint import EndpointPolicy, StudentTurnEndScorer
from moe2edge.runtime.voice.fsg import GrammarAutomaton
from moe2edge.runtime.voice.history import VoiceConversation
from moe2edge.runtime.voice.pipeline import VoiceSession, VoiceSettings
from tests.conftest import require_tool
from tests.server_helpers import frames

pytestmark = require_tool("espeak-ng", install="apt-get install espeak-ng (make system-deps)")


@pytest.fixture(scope="module")
def generator(tiny_run) -> Generator:
    return Generator.from_bundle(tiny_run["bundle"], threads=1)


@pytest.fixture(scope="module")
def asr(tiny_run) -> PocketsphinxRecognizer:
    return PocketsphinxRecognizer(grammar_path=tiny_run["grammar"])


def test_grammar_final_state_tells_a_command_from_its_prefix(asr) -> None:
    assert asr.is_complete("turn on the kitchen lights") is True
    assert asr.is_complete("  turn on the   kitchen lights ") is True
    for prefix in ("turn on the", "turn on the kitchen", "", "lights please"):
        assert asr.is_complete(prefix) is False, prefix
    assert PocketsphinxRecognizer().is_complete("turn on the kitchen lights") is None  # no grammar


def test_grammar_automaton_accepts_what_pocketsphinx_accepts(asr) -> None:
    automaton = GrammarAutomaton.from_fsg(asr._fsg)
    sentences = [
        "turn on the kitchen lights and close the bedroom curtains",
        "turn on the kitchen lights",
        "lights please turn on",
        "close the bedroom curtains and",
    ]
    for sentence in sentences:
        words = sentence.split()
        for n in range(len(words) + 1):
            text = " ".join(words[:n])
            assert automaton.accepts(text) == bool(asr._fsg.accept(text)), text
    assert automaton.states_after("lights please turn on") == set()  # no sentence starts so
    with pytest.raises(ValueError, match="FINAL_STATE"):
        GrammarAutomaton("FSG_BEGIN x\nNUM_STATES 1\nSTART_STATE 0\nFSG_END\n")


def test_grammar_tells_a_closed_command_from_one_that_may_go_on(asr) -> None:
    single = "turn on the kitchen lights"
    compound = "turn on the kitchen lights and close the bedroom curtains"
    assert asr.can_continue(single) is True  # "... and close the window" may follow
    assert asr.can_continue(compound) is False  # the grammar allows nothing after it
    assert asr.can_continue("turn on the") is True
    assert PocketsphinxRecognizer().can_continue(single) is None  # no grammar
    policy = EndpointPolicy(
        complete_silence_ms=112,
        closed_silence_ms=64,
        is_complete=asr.is_complete,
        can_continue=asr.can_continue,
    )
    closed, whole = policy.judge(compound), policy.judge(single)
    assert closed.closed and closed.wait_ms == 64
    assert not whole.closed and whole.wait_ms == 112
    assert policy.judge("turn on the").wait_ms == 800
    assert policy.min_wait_ms == 64
    with pytest.raises(ValueError, match="closed_silence_ms"):
        EndpointPolicy(complete_silence_ms=112, closed_silence_ms=200)


def test_policy_waits_short_after_a_command_long_after_a_prefix(asr) -> None:
    policy = EndpointPolicy(
        complete_silence_ms=96, incomplete_silence_ms=800, is_complete=asr.is_complete
    )
    assert policy.judge("turn on the kitchen lights").wait_ms == 96
    assert policy.judge("turn on the").wait_ms == 800
    assert policy.should_end(96, "turn on the kitchen lights")
    assert not policy.should_end(64, "turn on the kitchen lights")
    assert not policy.should_end(700, "turn on the") and policy.should_end(800, "turn on the")
    assert (policy.min_wait_ms, policy.max_wait_ms) == (96, 800)
    fixed = EndpointPolicy("fixed", end_silence_ms=500, is_complete=asr.is_complete)
    assert fixed.judge("turn on the kitchen lights").wait_ms == 500 == fixed.max_wait_ms
    blind = EndpointPolicy(end_silence_ms=300)  # predictive with no signal: the fixed silence
    assert blind.judge("turn on the").wait_ms == 300 == blind.max_wait_ms

    def scorer(text: str) -> float:  # a plain pluggable scorer: the weighted mean of both
        return 0.2

    both = EndpointPolicy(is_complete=asr.is_complete, scorer=scorer, scorer_weight=0.5)
    judgement = both.judge("turn on the kitchen lights")
    assert judgement.complete is True and judgement.turn_end_p == 0.2
    assert math.isclose(judgement.p, 0.6) and math.isclose(judgement.wait_ms, 800 - 0.6 * 688)
    with pytest.raises(ValueError, match="unknown endpointing 'sometimes'"):
        EndpointPolicy("sometimes")
    with pytest.raises(ValueError, match="complete_silence_ms"):
        EndpointPolicy(complete_silence_ms=900, incomplete_silence_ms=800)


def test_student_scorer_is_the_models_probability_of_the_closing_tokens(generator) -> None:
    prompt = VoiceConversation(generator, history_turns=0)
    scorer = StudentTurnEndScorer(prompt, max_tokens=2)
    text = "turn on the kitchen lights"
    p = scorer(text)
    assert p is not None and 0.0 < p < 1.0
    # the same number from a fresh, uncached forward over the whole prompt
    final = prompt.prompt(text, final=True)
    n = common_prefix_len(prompt.prompt(text, final=False), final)
    logits = generator.engine.forward(final, generator.engine.new_cache(), all_logits=True)
    logits = np.asarray(logits, dtype=np.float64)
    expected = 1.0
    for pos in (n - 1, n):
        row = logits[pos] - logits[pos].max()
        expected *= math.exp(row[final[pos + 1]]) / np.exp(row).sum()
    assert math.isclose(p, expected, rel_tol=1e-3)
    assert prompt.tokens == prompt.fork().tokens  # the session's cache was not touched


def spoken(parts: list[str], pause_ms: float, voice: str = "en-us") -> tuple[np.ndarray, float]:
    """``parts`` spoken one after the other with ``pause_ms`` of silence between them, in
    0.4 s of lead and 1.2 s of tail; returns (audio, true end of speech in ms)."""
    tts = EspeakSynthesizer(voice=voice)
    pieces, lead = [], np.zeros(int(0.4 * SAMPLE_RATE), np.float32)
    for i, part in enumerate(parts):
        audio = tts.synthesize(part)
        start, end = speech_bounds(audio)
        if i:
            pieces.append(np.zeros(int(pause_ms * SAMPLE_RATE / 1000), np.float32))
        pieces.append(audio[start:end])
    speech = np.concatenate(pieces)
    noise = np.random.default_rng(0).normal(0, 0.002, len(speech) + int(1.6 * SAMPLE_RATE))
    audio = np.concatenate([lead, speech, np.zeros(int(1.2 * SAMPLE_RATE))]) + noise
    return audio.astype(np.float32), 1000 * (len(lead) + len(speech)) / SAMPLE_RATE


def run_turn(generator, grammar, audio: np.ndarray, **settings) -> list[dict]:
    events: list[dict] = []
    lock = threading.Lock()

    def emit(event: dict) -> None:
        with lock:
            events.append(event)

    session = VoiceSession(
        generator,
        PocketsphinxRecognizer(grammar_path=grammar),
        EspeakSynthesizer(),
        emit,
        settings=VoiceSettings(max_new_tokens=4, **settings),
    ).start()
    try:
        for frame in frames(audio):
            session.push_audio(frame, time.perf_counter())
        assert session.wait_idle(30)
    finally:
        session.close()
    return events


def of(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["type"] == kind]


def test_predictive_endpoint_waits_out_a_pause_and_ends_a_command_early(
    generator, tiny_run
) -> None:
    grammar = tiny_run["grammar"]
    paused, true_end = spoken(["turn on the", "kitchen lights"], pause_ms=500)
    events = run_turn(generator, grammar, paused, endpointing="predictive", speculate=False)
    stopped = of(events, "input_audio_buffer.speech_stopped")
    assert len(stopped) == 1 and stopped[0]["endpoint_ms"] > true_end  # not cut in the pause
    final = of(events, "conversation.item.input_audio_transcription.completed")
    assert [e["transcript"] for e in final] == ["turn on the kitchen lights"]
    timings = of(events, "turn.timings")[0]
    assert timings["endpointing"] == "predictive" and timings["endpoint_complete"] is True
    assert timings["endpoint_wait_ms"] == 112
    # a whole command ends after the short silence, counted from the drop in energy (Silero
    # still calls the fading end speech): within ~150 ms of the true end of speech
    early = stopped[0]["endpoint_ms"]
    assert 112 <= early - true_end < 160, (stopped, true_end)
    # counted from Silero's last voiced window instead: later by the VAD's lag
    events = run_turn(
        generator, grammar, paused, endpointing="predictive", speculate=False, early_silence=False
    )
    stopped = of(events, "input_audio_buffer.speech_stopped")
    assert len(stopped) == 1 and stopped[0]["endpoint_ms"] > early
    assert 112 <= stopped[0]["endpoint_ms"] - stopped[0]["audio_end_ms"] < 112 + 33

    # the fixed 300 ms baseline cuts the same utterance in its pause: two turns
    events = run_turn(
        generator, grammar, paused, endpointing="fixed", end_silence_ms=300, speculate=False
    )
    stopped = of(events, "input_audio_buffer.speech_stopped")
    assert len(stopped) == 2 and stopped[0]["endpoint_ms"] < true_end - 300
    assert 300 <= stopped[0]["endpoint_ms"] - stopped[0]["audio_end_ms"] < 333


def test_a_closed_command_ends_sooner_and_only_once(generator, tiny_run) -> None:
    text = "turn on the kitchen lights and close the bedroom curtains"
    audio, true_end = spoken([text], pause_ms=0)
    ends = {}
    for closed_ms in (64.0, 112.0):  # 112: as long as any whole command waits
        events = run_turn(
            generator, tiny_run["grammar"], audio, speculate=False, closed_silence_ms=closed_ms
        )
        stopped = of(events, "input_audio_buffer.speech_stopped")
        # one turn: Silero still calling the tail speech after the early end starts none
        assert len(of(events, "input_audio_buffer.speech_started")) == 1, events
        assert len(stopped) == 1 and stopped[0]["endpoint_ms"] > true_end
        final = of(events, "conversation.item.input_audio_transcription.completed")
        assert [e["transcript"] for e in final] == [text]
        timings = of(events, "turn.timings")[0]
        assert timings["endpoint_wait_ms"] == closed_ms
        ends[closed_ms] = stopped[0]["endpoint_ms"] - true_end
    # the closed wait counts from the drop in energy whatever Silero says: sooner by
    # about the difference (the decision is taken on every 20 ms frame)
    assert ends[64.0] < 64 + 40 and ends[112.0] - ends[64.0] >= 28, ends


def test_predictive_endpoint_with_the_student_scorer_and_a_draft(generator, tiny_run) -> None:
    audio, true_end = spoken(["switch off the fan in the bedroom"], pause_ms=0, voice="en-us+f3")
    events = run_turn(
        generator, tiny_run["grammar"], audio, endpointing="predictive", turn_end_scorer=True
    )
    timings = of(events, "turn.timings")[0]
    assert timings["endpoint_complete"] is True and 0.0 < timings["turn_end_p"] <= 1.0
    p = 0.5 + 0.5 * timings["turn_end_p"]  # grammar 1, student p, equal weights
    assert math.isclose(timings["endpoint_wait_ms"], 800 - p * 688, abs_tol=0.1)
    final = of(events, "conversation.item.input_audio_transcription.completed")
    assert [e["transcript"] for e in final] == ["switch off the fan in the bedroom"]
    assert of(events, "response.done")[0]["response"]["status"] in ("completed", "incomplete")
