"""Voice building blocks on real audio: espeak-ng speech through Silero VAD and pocketsphinx.

No mocks: commands are spoken by espeak-ng in two voices, padded with silence and a little
noise, and streamed in 20 ms PCM16 frames the way a client would send them; the gated
recognition runs through the service's own ``VoiceSession``.
"""

from __future__ import annotations

import json
import os
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
    PiperVoiceConfig,
    PocketsphinxRecognizer,
    Recognizer,
    VoiceActivityDetector,
    available_recognizers,
    float32_to_pcm16,
    make_recognizer,
    pcm16_to_float32,
    read_wav,
    register_recognizer,
    resample,
    validate_frame,
    write_wav,
)
from moe2edge.runtime.voice.audio import parse_wav_bytes
from moe2edge.runtime.voice.pipeline import VoiceSession, VoiceSettings
from moe2edge.runtime.voice.tts import espeak_phonemize, ipa_to_phonemes, phonemes_to_ids
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

PIPER_CONFIG = {  # the documented .onnx.json layout, ids from Piper's default espeak map
    "audio": {"sample_rate": 22050},
    "espeak": {"voice": "de"},
    "inference": {"noise_scale": 0.667, "length_scale": 1, "noise_w": 0.8},
    "phoneme_type": "espeak",
    "num_speakers": 1,
    "num_symbols": 256,
    "phoneme_id_map": {
        "_": [0], "^": [1], "$": [2], " ": [3], "!": [4], "c": [16], "l": [24], "t": [32],
        "ɪ": [74], "ˈ": [120], "\u0327": [140],
    },
}  # fmt: skip


def test_piper_phoneme_ids_follow_the_documented_format() -> None:
    config = PiperVoiceConfig.from_dict(PIPER_CONFIG)
    assert (config.sample_rate, config.espeak_voice, config.noise_w) == (22050, "de", 0.8)
    phonemes = ipa_to_phonemes("lˈɪçt!")  # piper-phonemize's own example: ç is decomposed
    assert phonemes == ["l", "ˈ", "ɪ", "c", "\u0327", "t", "!"]
    ids = phonemes_to_ids(phonemes, config.phoneme_id_map)
    assert ids == [1, 0, 24, 0, 120, 0, 74, 0, 16, 0, 140, 0, 32, 0, 4, 0, 2]
    missing: list[str] = []
    assert phonemes_to_ids(["l", "ʃ"], config.phoneme_id_map, missing) == [1, 0, 24, 0, 2]
    assert missing == ["ʃ"]
    with pytest.raises(ValueError, match="not a Piper voice config"):
        PiperVoiceConfig.from_dict({"audio": {}})
    sentences = espeak_phonemize("This: is, a, test. Next!", "en-us")
    assert ["".join(p) for p in sentences] == ["ðˈɪs: ˈɪz, ˈeɪ, tˈɛst.", "nˈɛkst!"]


@require_module("onnx", install="pip install -e '.[export]' (make install)")
def test_piper_synthesizer_runs_a_model_with_pipers_signature(tmp_path) -> None:
    """A stand-in graph with Piper's inputs and output shape (256 samples per id)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["input"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["f", "step"], ["g"]),
            helper.make_node("Sin", ["g"], ["s"]),
            helper.make_node("Unsqueeze", ["s", "axes"], ["u"]),
            helper.make_node("Tile", ["u", "reps"], ["output"]),
        ],
        "piper_like",
        [
            helper.make_tensor_value_info("input", TensorProto.INT64, [1, "n"]),
            helper.make_tensor_value_info("input_lengths", TensorProto.INT64, [1]),
            helper.make_tensor_value_info("scales", TensorProto.FLOAT, [3]),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, None])],
        [
            helper.make_tensor("step", TensorProto.FLOAT, [], [0.1]),
            helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
            helper.make_tensor("reps", TensorProto.INT64, [3], [1, 1, 256]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "voice.onnx")
    config = dict(PIPER_CONFIG, espeak={"voice": "en-us"}, phoneme_id_map=_ipa_map("ðɪstɛ ˈ.,:"))
    (tmp_path / "voice.onnx.json").write_text(json.dumps(config))
    tts = PiperSynthesizer(tmp_path / "voice.onnx")
    n_ids = len(phonemes_to_ids(tts.phonemize("This is a test.")[0], tts.config.phoneme_id_map))
    audio = tts.synthesize("This is a test.")
    assert len(audio) == n_ids * 256 * 16000 // 22050 and np.max(np.abs(audio)) <= 1.01


def _ipa_map(symbols: str) -> dict[str, list[int]]:
    return {s: [i] for i, s in enumerate("_^$" + symbols)}


@pytest.mark.skipif(
    not os.environ.get("MOE2EDGE_PIPER_VOICE"),
    reason="no Piper voice on this machine (voices cannot be downloaded here); "
    "set MOE2EDGE_PIPER_VOICE=/path/to/voice.onnx (with voice.onnx.json beside it)",
)
def test_piper_real_voice_is_understood(asr) -> None:
    tts = PiperSynthesizer(os.environ["MOE2EDGE_PIPER_VOICE"])
    audio = tts.synthesize(COMMANDS[0])
    asr.start_utterance()
    for f in frames(
        np.concatenate([np.zeros(8000, np.float32), audio, np.zeros(8000, np.float32)])
    ):
        asr.feed(f)
    assert asr.finish() == COMMANDS[0]


def test_zz_report_measurements() -> None:
    """Print what was measured (run with -s to see it)."""
    for key, values in sorted(MEASURED.items()):
        arr = np.asarray(values, dtype=float)
        print(f"{key}: n={len(arr)} min={arr.min():.1f} mean={arr.mean():.1f} max={arr.max():.1f}")
