"""The reply's own voice in the microphone: how loud its echo can be, for barge-in.

A device that speaks and listens hears itself. Silero takes a reply's echo for speech at
30 dB under the reply's level (not at 40, over a -54 dBFS noise floor), so a barge-in rule
that trusts the VAD alone interrupts the device with its own voice. This is the classic double-talk test of echo cancellers
(Geigel's detector): near-end speech is declared only where the microphone is louder than
the far-end signal of the last few hundred milliseconds could make it. The far-end signal
is the reply audio the server sent, placed on the listener's timeline (played in real time
from its first chunk, as ``Reply.played_ms`` assumes); its echo is bounded by
``barge_in_echo_db`` (what is left after the device's own echo cancellation, or the
speaker-to-microphone coupling without one).

Hand-written rather than a library: the test needs only per-subframe levels of audio we
produced ourselves; the echo cancellers on PyPI (speexdsp, webrtc APM bindings) cancel the
echo from the waveform and need the playback device's exact timing, which a server does
not have.
"""

from __future__ import annotations

import threading

import numpy as np

from moe2edge.runtime.voice.audio import SAMPLE_RATE
from moe2edge.runtime.voice.vad import SUBFRAME_SAMPLES, subframe_rms

ECHO_DELAY_S = 0.2
"""How late the reply's echo may arrive in the microphone stream after its play time (output
buffering, the acoustic path, the microphone frame and the network); the bound takes the
loudest reply audio over this much time before each microphone frame."""


class EchoReference:
    """Per-8 ms RMS levels of the audio a reply sent, in play order (thread-safe: the reply's
    speaker thread adds, the session's input thread reads)."""

    def __init__(self) -> None:
        self._levels: list[float] = []
        self._rest = np.zeros(0, dtype=np.float32)
        self._lock = threading.Lock()

    def add(self, audio: np.ndarray) -> None:
        """Append audio just sent (float32, 16 kHz), after everything sent before."""
        with self._lock:
            x = np.concatenate([self._rest, np.asarray(audio, dtype=np.float32)])
            whole = len(x) // SUBFRAME_SAMPLES * SUBFRAME_SAMPLES
            if whole:
                self._levels.extend(subframe_rms(x[:whole]).tolist())
            self._rest = x[whole:].copy()

    def loudest(self, start_s: float, end_s: float) -> float:
        """The loudest subframe between ``start_s`` and ``end_s`` of the reply's timeline
        (0 where nothing was sent)."""
        rate = SAMPLE_RATE / SUBFRAME_SAMPLES
        first, last = max(0, int(start_s * rate)), int(end_s * rate) + 1
        with self._lock:
            window = self._levels[first:last] if last > first else []
            return max(window, default=0.0)


def echo_level(
    reference: EchoReference | None,
    play_start: float | None,
    arrived_at: float,
    frame_s: float,
    echo_db: float | None,
) -> float:
    """The loudest RMS the reply's echo can have in a microphone frame of ``frame_s``
    seconds that arrived at ``arrived_at`` (perf_counter()); 0 when no reply has played or
    the test is off (``echo_db`` None)."""
    if reference is None or play_start is None or echo_db is None:
        return 0.0
    end = arrived_at - play_start
    level = reference.loudest(end - frame_s - ECHO_DELAY_S, end)
    return level * 10 ** (echo_db / 20)
