"""Barge-in onset: a loud run starts speech before Silero does, and the reply's echo bound
keeps quieter audio from starting any (runtime/voice/vad.py, runtime/voice/echo.py)."""

import numpy as np

from moe2edge.runtime.voice import EspeakSynthesizer
from moe2edge.runtime.voice.audio import speech_bounds
from moe2edge.runtime.voice.echo import EchoReference, echo_level
from moe2edge.runtime.voice.vad import SPEECH_START, VoiceActivityDetector


def _stop_clip() -> tuple[np.ndarray, int]:
    audio = EspeakSynthesizer().synthesize("stop")
    start, end = speech_bounds(audio)
    lead = np.zeros(8000, np.float32)
    noise = np.random.default_rng(0).normal(0, 0.002, 8000 + end - start + 4000)
    return (np.concatenate([lead, audio[start:end], np.zeros(4000, np.float32)]) + noise).astype(
        np.float32
    ), 8000


def _first_start(vad: VoiceActivityDetector, x: np.ndarray) -> int | None:
    for i in range(0, len(x), 320):
        for event in vad.feed(x[i : i + 320]):
            if event.kind == SPEECH_START:
                return event.decided_sample
    return None


def test_a_loud_run_starts_speech_before_silero_on_a_leading_s():
    x, onset = _stop_clip()
    silero = _first_start(VoiceActivityDetector(min_speech_ms=64), x)
    vad = VoiceActivityDetector(min_speech_ms=64)
    vad.arm_energy_onset(640)  # 40 ms
    energy = _first_start(vad, x)
    assert silero is not None and energy is not None
    assert energy - onset <= 640 + 128  # within a subframe of 40 ms after the true onset
    assert energy < silero - 512  # at least a window earlier than Silero alone


def test_audio_under_the_echo_bound_starts_no_speech():
    x, _ = _stop_clip()
    vad = VoiceActivityDetector(min_speech_ms=64)
    vad.arm_energy_onset(640)
    vad.echo_level = 10 * float(np.abs(x).max())  # as if the reply were far louder
    assert _first_start(vad, x) is None


def test_echo_level_follows_the_reply_timeline():
    ref = EchoReference()
    ref.add(np.zeros(16000, np.float32))
    ref.add(np.full(16000, 0.5, np.float32))  # loud from 1 s on
    assert echo_level(ref, 100.0, 100.5, 0.02, -20) == 0.0  # 0.5 s in: only silence played
    assert abs(echo_level(ref, 100.0, 101.5, 0.02, -20) - 0.05) < 1e-6
    assert echo_level(ref, 100.0, 101.5, 0.02, None) == 0.0  # the test is off
    assert echo_level(ref, None, 101.5, 0.02, -20) == 0.0  # nothing played yet


def test_a_loud_run_going_on_when_armed_does_not_start_speech():
    """The tail of the user's own command, still loud when its reply's audio begins (and
    the onset is armed), is no barge-in; a loud run after it is."""
    rng = np.random.default_rng(1)
    t = np.arange(4800) / 16000
    tone = (0.1 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)  # 300 ms, -23 dBFS RMS
    gap = np.zeros(4800, np.float32)
    x = np.concatenate([gap, tone, gap, tone, gap]) + rng.normal(0, 0.002, 5 * 4800)
    x = x.astype(np.float32)
    vad = VoiceActivityDetector(min_speech_ms=64)
    starts = []
    for i in range(0, len(x), 320):
        if i == 4800 + 1600:  # 100 ms into the first tone
            vad.arm_energy_onset(640)
        starts += [e.decided_sample for e in vad.feed(x[i : i + 320]) if e.kind == SPEECH_START]
    assert starts, "the second tone's loud run starts speech"
    assert 3 * 4800 <= starts[0] <= 3 * 4800 + 640 + 256  # 40 ms into the second tone


def test_a_zero_padded_frame_does_not_make_the_noise_loud():
    """Digital zeros (a padded or muted frame) are not the room's noise floor: the noise
    after them starts no speech, and a loud run still does."""
    rng = np.random.default_rng(2)
    noise = rng.normal(0, 0.002, 16000).astype(np.float32)
    noise[4000:4300] = 0.0  # the zeros a client pads its last frame with (< 320)
    t = np.arange(4800) / 16000
    tone = (0.1 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    x = np.concatenate([noise, tone + rng.normal(0, 0.002, 4800).astype(np.float32)])
    vad = VoiceActivityDetector(min_speech_ms=64)
    vad.arm_energy_onset(640)
    start = _first_start(vad, x)
    assert start is not None and 16000 <= start <= 16000 + 640 + 256
