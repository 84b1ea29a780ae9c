"""Voice building blocks on real audio: espeak-ng speech through Silero VAD and pocketsphinx.

No mocks: commands are spoken by espeak-ng in two voices, padded with silence and a little
noise, and streamed in 20 ms PCM16 frames the way a client would send them; the gated
recognition runs through the service's own ``VoiceSession``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

from moe2edge.runtime.voice import (
    FRAME_SAMPLES,
    SAMPLE_RATE,
    EspeakSynthesizer,
    PhraseSplitter,
    PiperSynthesizer,
    PocketsphinxRecognizer,
    Recognizer,
    VoiceActivityDetector,
    available_recognizers,
    float32_to_pcm16,
    make_recognizer,
    make_synthesizer,
    pcm16_to_float32,
    read_wav,
    register_recognizer,
    resample,
    validate_frame,
    write_wav,
)
from moe2edge.runtime.voice.audio import parse_wav_bytes, speech_bounds
from moe2edge.runtime.voice.pipeline import VoiceSession, VoiceSettings
from tests.conftest import require_module, require_tool

pytestmark = require_tool("espeak-ng", install="apt-get install espeak-ng (make system-deps)")

GRAMMAR = """#JSGF V1.0;
grammar commands;
public <command> = <lights> | <thermostat> | <timer> | <weather>;
<room> = kitchen | bedroom | living room | bathroom;
<lights> = turn (on | off) the <room> lights;
<number> = eighteen | nineteen | twenty | twenty one | twenty two | twenty three;
<thermostat> = set the thermostat in the <room> to <number> degrees;
<timer> = set a timer for (five | ten | fifteen | twenty) minutes;
<weather> = what is the weather (today | tomorrow);
"""
COMMANDS = [
    "turn on the kitchen lights",
    "set the thermostat in the bedroom to twenty one degrees",
    "set a timer for ten minutes",
    "turn off the living room lights",
    "what is the weather tomorrow",
]
VOICES = ["en-us", "en-us+f3"]
LEAD_S, TAIL_S = 0.6, 1.0
MEASURED: dict[str, list[float]] = {}


def _record(key: str, value: float) -> None:
    MEASURED.setdefault(key, []).append(value)


def _voiced_span_ms(speech: np.ndarray) -> tuple[float, float]:
    """Where espeak's waveform is audibly non-silent, in ms from the start of the clip."""
    loud = np.flatnonzero(np.abs(speech) > 0.02)
    return 1000 * loud[0] / SAMPLE_RATE, 1000 * loud[-1] / SAMPLE_RATE


@pytest.fixture(scope="module")
def clips() -> list[dict]:
    """10 padded clips: (voice, text, 16 kHz float32 audio, true speech span in ms)."""
    rng = np.random.default_rng(0)
    out = []
    for voice in VOICES:
        tts = EspeakSynthesizer(voice=voice)
        for text in COMMANDS:
            speech = tts.synthesize(text)
            start, end = _voiced_span_ms(speech)
            audio = np.concatenate(
                [np.zeros(int(LEAD_S * SAMPLE_RATE)), speech, np.zeros(int(TAIL_S * SAMPLE_RATE))]
            ).astype(np.float32)
            audio += rng.normal(0.0, 0.002, len(audio)).astype(np.float32)
            span = (1000 * LEAD_S + start, 1000 * LEAD_S + end)
            out.append({"voice": voice, "text": text, "audio": audio, "span": span})
    return out


@pytest.fixture(scope="module")
def vad() -> VoiceActivityDetector:
    return VoiceActivityDetector(end_silence_ms=300)


@pytest.fixture(scope="module")
def asr() -> PocketsphinxRecognizer:
    return PocketsphinxRecognizer(grammar=GRAMMAR)


def frames(audio: np.ndarray) -> Iterator[bytes]:
    pcm = float32_to_pcm16(audio)
    step = FRAME_SAMPLES * 2
    for i in range(0, len(pcm) - step + 1, step):
        yield validate_frame(pcm[i : i + step])


# --- audio helpers ----------------------------------------------------------------------------


def test_frame_validation_names_the_problem() -> None:
    with pytest.raises(ValueError, match="empty"):
        validate_frame(b"")
    with pytest.raises(ValueError, match="odd byte count"):
        validate_frame(b"\x00" * 641)
    with pytest.raises(ValueError, match="too large"):
        validate_frame(b"\x00" * 64002)
    with pytest.raises(ValueError, match="expected exactly 320 samples"):
        validate_frame(b"\x00" * 600, expected_samples=320)
    with pytest.raises(TypeError, match="bytes"):
        validate_frame(np.zeros(320, np.int16))  # type: ignore[arg-type]
    assert validate_frame(bytearray(640)) == bytes(640)


def test_pcm_and_wav_round_trip(tmp_path) -> None:
    x = (0.5 * np.sin(np.arange(1600) / 7.0)).astype(np.float32)
    assert np.max(np.abs(pcm16_to_float32(float32_to_pcm16(x)) - x)) < 1e-4
    assert float32_to_pcm16(np.array([2.0, -2.0], np.float32)) == b"\xff\x7f\x01\x80"  # clipped
    write_wav(tmp_path / "x.wav", x)
    y, rate = read_wav(tmp_path / "x.wav")
    assert rate == SAMPLE_RATE and np.max(np.abs(y - x)) < 1e-4


def test_espeak_stdout_wav_parses_and_resamples() -> None:
    import subprocess

    raw = subprocess.run(["espeak-ng", "--stdout", "hello"], capture_output=True, check=True).stdout
    audio, rate = parse_wav_bytes(raw)  # the header's sizes are placeholders on a pipe
    assert rate == 22050 and 0.2 < len(audio) / rate < 2.0
    t = np.arange(rate) / rate
    low = resample(np.sin(2 * np.pi * 1000 * t).astype(np.float32), rate)
    high = resample(np.sin(2 * np.pi * 10000 * t).astype(np.float32), rate)
    ref = np.sin(2 * np.pi * 1000 * np.arange(len(low)) / SAMPLE_RATE)
    assert len(low) == SAMPLE_RATE and np.max(np.abs(low - ref)[100:-100]) < 0.01
    assert np.sqrt(np.mean(high[100:-100] ** 2)) < 0.01  # above 8 kHz: filtered, not aliased


# --- VAD --------------------------------------------------------------------------------------


def test_vad_finds_each_utterance_with_sensible_timing(vad, clips) -> None:
    for clip in clips:
        vad.reset()
        events = [e for f in frames(clip["audio"]) for e in vad.feed(f)]
        kinds = [e.kind for e in events]
        assert kinds == ["speech_start", "speech_end"], (clip["text"], kinds)
        start, end = events
        true_start, true_end = clip["span"]
        _record("vad_start_error_ms", start.time_ms - true_start)
        _record("vad_end_error_ms", end.time_ms - true_end)
        _record("vad_endpoint_after_last_voice_ms", end.decided_ms - end.time_ms)
        assert -100 <= start.time_ms - true_start <= 100, (clip["text"], start, true_start)
        # Silero's probability decays over ~100 ms after the sound stops: ends read late.
        assert -150 <= end.time_ms - true_end <= 200, (clip["text"], end, true_end)
        assert 300 <= end.decided_ms - end.time_ms < 300 + 32 + 1
        assert end.speech_start_sample == start.sample


def test_vad_chunking_reset_flush_and_silence(vad, clips) -> None:
    audio = clips[0]["audio"]
    vad.reset()
    by_frames = [e for f in frames(audio) for e in vad.feed(f)]
    vad.reset()
    odd_sizes, i = [], 0
    for size in [37, 1000, 513, 2] * 1000:
        odd_sizes += vad.feed(audio[i : i + size])
        i += size
        if i >= len(audio):
            break

    def decisions(events):
        return [(e.kind, e.sample, e.decided_sample) for e in events]

    # Chunk size does not change the decisions (PCM16 frames vs float chunks: same timings).
    assert decisions(odd_sizes) == decisions(by_frames)
    vad.reset()
    cut = int((LEAD_S + 0.5) * SAMPLE_RATE)  # the stream stops mid-utterance
    assert [e.kind for e in vad.feed(audio[:cut])] == ["speech_start"]
    assert [e.kind for e in vad.flush()] == ["speech_end"]
    vad.reset()
    noise = np.random.default_rng(1).normal(0, 0.002, 2 * SAMPLE_RATE).astype(np.float32)
    assert vad.feed(noise) == [] and not vad.in_speech
    slow = VoiceActivityDetector(end_silence_ms=600)
    end = [e for e in slow.feed(audio) if e.kind == "speech_end"][0]
    assert 600 <= end.decided_ms - end.time_ms < 600 + 33


def test_detectors_share_one_session_with_their_own_state(vad, clips) -> None:
    """Every detector runs the one Silero session (a voice session does not load its own),
    and each keeps its own recurrent state: feeding one does not move the other."""
    audio = clips[1]["audio"]
    vad.reset()
    alone = [(e.kind, e.sample) for e in vad.feed(audio)]
    other = VoiceActivityDetector(end_silence_ms=300)
    assert other.model.session is vad.model.session
    vad.reset()
    interleaved: list[tuple[str, int]] = []
    half = len(audio) // 2
    other.feed(clips[0]["audio"][:half])  # the other detector mid-speech in between
    interleaved += [(e.kind, e.sample) for e in vad.feed(audio[:half])]
    other.feed(clips[0]["audio"][half:])
    interleaved += [(e.kind, e.sample) for e in vad.feed(audio[half:])]
    assert interleaved == alone and [k for k, _ in alone] == ["speech_start", "speech_end"]


# --- ASR --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generator(tiny_run):
    from moe2edge.runtime import Generator

    return Generator.from_bundle(tiny_run["bundle"], threads=1)


def _session_events(generator, asr, audio: np.ndarray) -> list[tuple[float, dict]]:
    """(when, event) for ``audio`` streamed into a fresh VoiceSession, until it is idle."""
    events: list[tuple[float, dict]] = []
    session = VoiceSession(
        generator,
        asr,
        EspeakSynthesizer(),
        lambda e: events.append((time.perf_counter(), e)),
        settings=VoiceSettings(end_silence_ms=300, speculate=False, max_new_tokens=2),
    ).start()
    try:
        for frame in frames(audio):
            session.push_audio(frame)
        assert session.wait_idle(20)
    finally:
        session.close()
    return events


def test_vad_gated_streaming_asr_is_exact_and_fast(generator, asr, clips) -> None:
    """The service's own loop: each clip through a real ``VoiceSession`` (Silero VAD gating
    the recognizer frame by frame, with its pre-roll), as a client would stream it."""
    exact = 0
    for clip in clips:
        events = _session_events(generator, asr, clip["audio"])
        kinds = [e["type"] for _, e in events]
        assert kinds.count("input_audio_buffer.speech_started") == 1, (clip["text"], kinds)
        assert kinds.count("input_audio_buffer.speech_stopped") == 1, (clip["text"], kinds)
        partials = [e["transcript"] for _, e in events if e["type"].endswith("transcription.delta")]
        assert partials and all(isinstance(p, str) for p in partials)
        (stopped_at, _), (final_at, final) = (
            next((t, e) for t, e in events if e["type"] == kind)
            for kind in (
                "input_audio_buffer.speech_stopped",
                "conversation.item.input_audio_transcription.completed",
            )
        )
        _record("asr_final_after_endpoint_ms", 1000 * (final_at - stopped_at))
        exact += final["transcript"] == clip["text"]
        assert kinds.index("input_audio_buffer.speech_started") < kinds.index(
            "conversation.item.input_audio_transcription.delta"
        )
    _record("asr_exact", exact)
    assert exact >= 8, f"{exact}/10 exact"
    assert max(MEASURED["asr_final_after_endpoint_ms"]) < 100


def test_recognizer_whole_clip_partials_are_throttled(asr, clips) -> None:
    clip = clips[1]
    asr.start_utterance()
    partials = [p for f in frames(clip["audio"]) if (p := asr.feed(f)) is not None]
    assert asr.finish() == clip["text"]
    audio_ms = 1000 * len(clip["audio"]) / SAMPLE_RATE
    assert 1 <= len(partials) <= audio_ms / 100 + 1
    assert isinstance(asr, Recognizer)


def test_recognizer_registry_and_errors(tmp_path) -> None:
    class Echo:  # a second backend, to show what registering one takes
        def start_utterance(self) -> None:
            self.n = 0

        def feed(self, audio) -> str | None:
            self.n += len(audio)
            return None

        def finish(self) -> str:
            return f"{self.n} bytes"

    register_recognizer("echo", Echo)
    rec = make_recognizer("echo")
    rec.start_utterance()
    rec.feed(b"\x00" * 640)
    assert rec.finish() == "640 bytes" and "pocketsphinx" in available_recognizers()
    with pytest.raises(ValueError, match="unknown recognizer 'nope'"):
        make_recognizer("nope")
    with pytest.raises(FileNotFoundError, match="grammar file not found"):
        make_recognizer("pocketsphinx", grammar_path=tmp_path / "missing.gram")
    with pytest.raises(ValueError, match="frobnicate"):
        PocketsphinxRecognizer(grammar="#JSGF V1.0; grammar g; public <a> = frobnicate it;")
    with pytest.raises(RuntimeError, match="start_utterance"):
        PocketsphinxRecognizer(grammar=GRAMMAR).feed(b"\x00" * 640)


# --- TTS --------------------------------------------------------------------------------------


def test_espeak_synthesizer_and_missing_binary() -> None:
    audio = EspeakSynthesizer(voice="en-us", speed_wpm=190).synthesize(COMMANDS[0])
    assert audio.dtype == np.float32 and 0.8 < len(audio) / SAMPLE_RATE < 3.0
    assert np.max(np.abs(audio)) > 0.1
    with pytest.raises(FileNotFoundError, match="apt-get install espeak-ng"):
        EspeakSynthesizer(binary="espeak-ng-not-installed")


def test_phrase_splitter() -> None:
    s = PhraseSplitter(max_words=6)
    out = []
    for (
        token
    ) in "Sure, it is 21.5 degrees now. The kitchen lights are on and the oven is off".split(" "):
        out += s.push(token + " ")
    out += s.flush()
    assert out == [
        "Sure, it is 21.5 degrees now.",
        "The kitchen lights are on and",
        "the oven is off",
    ]


def test_tts_stream_first_chunk_before_text_is_complete() -> None:
    tts = EspeakSynthesizer(voice="en-us")
    text = (
        "The kitchen lights are on. The thermostat in the bedroom is set to twenty one degrees, "
        "and a timer for ten minutes is running. Tomorrow will be sunny with a light breeze. "
        "Anything else I can do for you?"
    )
    produced = {"done_at": None}

    def tokens() -> Iterator[str]:  # an LLM producing ~50 tokens per second
        for word in text.split(" "):
            time.sleep(0.02)
            yield word + " "
        produced["done_at"] = time.perf_counter()

    started = time.perf_counter()
    chunks, first_at = [], None
    for audio in tts.stream(tokens()):
        first_at = first_at or time.perf_counter()
        chunks.append(audio)
    assert produced["done_at"] is not None and first_at < produced["done_at"]
    assert len(chunks) >= 4
    _record("tts_stream_first_chunk_ms", 1000 * (first_at - started))

    started = time.perf_counter()
    first = next(iter(tts.stream(text)))  # the whole text available at once
    first_ms = 1000 * (time.perf_counter() - started)
    started = time.perf_counter()
    whole = tts.synthesize(text)
    whole_ms = 1000 * (time.perf_counter() - started)
    _record("tts_first_phrase_ms", first_ms)
    _record("tts_whole_text_ms", whole_ms)
    assert len(first) < len(whole) / 3 and first_ms < whole_ms
    total = sum(len(c) for c in chunks)
    assert 0.7 * len(whole) < total < 1.6 * len(whole)


# --- Piper ------------------------------------------------------------------------------------

needs_piper = require_module("piper", install="pip install -e '.[voice-piper]' (make install)")


@pytest.fixture(scope="module")
def piper() -> PiperSynthesizer:
    return PiperSynthesizer()  # the packaged en_US-joe-medium voice


def word_errors(ref: str, hyp: str) -> int:
    """Word-level edit distance (substitutions, insertions, deletions)."""
    a, b = ref.split(), hyp.split()
    row = list(range(len(b) + 1))
    for i, word in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, other in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (word != other))
    return row[-1]


@needs_piper
def test_piper_voice_is_understood_by_the_recognizer(piper, asr) -> None:
    """The real neural voice: audible, as long as speech of its words, and transcribed."""
    errors = words = exact = 0
    for text in COMMANDS:
        audio = piper.synthesize(text)
        assert audio.dtype == np.float32 and np.max(np.abs(audio)) > 0.5
        start, end = speech_bounds(audio)
        rate = len(text.split()) / ((end - start) / SAMPLE_RATE)
        assert 1.5 < rate < 5.0, (text, rate)  # words per second of speech
        assert np.sqrt(np.mean(audio[start:end] ** 2)) > 0.03
        asr.start_utterance()
        for f in frames(np.concatenate([np.zeros(8000, np.float32), audio, np.zeros(8000)])):
            asr.feed(f)
        heard = asr.finish()
        errors, words = errors + word_errors(text, heard), words + len(text.split())
        exact += heard == text
    _record("piper_asr_wer", errors / words)
    assert errors / words <= 0.1 and exact >= 4, (errors, words, exact)


@needs_piper
def test_piper_streams_phrase_by_phrase_at_16_khz(piper) -> None:
    text = "Sure, the kitchen lights are on. The bedroom heater is off."
    assert piper.voice_rate == 22050 and piper.sample_rate == SAMPLE_RATE
    started = time.perf_counter()
    chunks = list(piper.stream_phrases(iter(w + " " for w in text.split())))
    assert [c.text for c in chunks] == [
        "Sure, the kitchen lights are on.",
        "The bedroom heater is off.",
    ]
    _record("piper_stream_ms", 1000 * (time.perf_counter() - started))
    ids = piper.phoneme_ids(chunks[1].text)
    raw = piper.voice.phoneme_ids_to_audio(ids[0], piper.syn_config)
    # resampled, not cut (the voice's durations are sampled, so two runs differ a little)
    assert 0.75 < len(chunks[1].audio) / (len(raw) * SAMPLE_RATE / 22050) < 1.33
    started = time.perf_counter()
    first = piper.synthesize("sure,")
    _record("piper_first_phrase_ms", 1000 * (time.perf_counter() - started))
    assert 0.2 < len(first) / SAMPLE_RATE < 1.5 and piper.synthesize(" ").size == 0
    # each run shrinks ONNX Runtime's arena after it (the arena would keep the longest
    # phrase's tensors and grow past them; piper_tts.py)
    options = piper.voice.session.run_options
    assert options.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"


@needs_piper
def test_piper_is_the_default_voice_and_espeak_the_fallback(tmp_path, caplog) -> None:
    from moe2edge.runtime.voice.prespawn import PrespawnedEspeak

    with caplog.at_level("INFO", logger="moe2edge.runtime.voice.voices"):
        assert isinstance(make_synthesizer("auto"), PiperSynthesizer)
    assert "voice: Piper en_US-joe-medium" in caplog.text
    espeak = make_synthesizer("espeak")
    assert isinstance(espeak, PrespawnedEspeak)
    espeak.close()
    caplog.clear()
    missing = tmp_path / "missing.onnx"
    with caplog.at_level("WARNING", logger="moe2edge.runtime.voice.voices"):
        fallback = make_synthesizer("auto", piper_model=missing)
    assert isinstance(fallback, PrespawnedEspeak) and "voice: espeak-ng en-us" in caplog.text
    fallback.close()
    with pytest.raises(FileNotFoundError, match="Piper voice file not found"):
        make_synthesizer("piper", piper_model=missing)
    with pytest.raises(ValueError, match="unknown tts 'festival'"):
        make_synthesizer("festival")


def test_zz_report_measurements() -> None:
    """Print what was measured (run with -s to see it)."""
    for key, values in sorted(MEASURED.items()):
        arr = np.asarray(values, dtype=float)
        print(f"{key}: n={len(arr)} min={arr.min():.1f} mean={arr.mean():.1f} max={arr.max():.1f}")
