"""Where a voice session is in its microphone stream: the samples received, when each frame
arrived (a turn's latency starts at the arrival of its last voiced frame), and the pre-roll
of audio kept before speech is detected (the recognizer hears the word's onset)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from moe2edge.runtime.voice.audio import SAMPLE_RATE


class StreamClock:
    """Samples received since the stream started, and the VAD's origin in it.

    The VAD counts samples from its last reset (``origin``); events carry VAD positions,
    the protocol reports stream milliseconds.
    """

    def __init__(self) -> None:
        self.samples = 0  # samples received since the stream started
        self.origin = 0  # the stream sample where the VAD was last reset
        self._arrivals: deque[tuple[int, float]] = deque(maxlen=500)  # (end sample, time)

    def received(self, n_samples: int, arrived_at: float) -> None:
        self.samples += n_samples
        self._arrivals.append((self.samples, arrived_at))

    def restart_vad(self) -> None:
        self.origin = self.samples

    def ms(self, vad_sample: int) -> float:
        """Stream milliseconds of VAD position ``vad_sample``."""
        return round(1000 * (self.origin + vad_sample) / SAMPLE_RATE, 1)

    def arrival_of(self, vad_sample: int) -> float | None:
        """When the frame holding VAD position ``vad_sample`` arrived."""
        target = self.origin + vad_sample
        for end, t in self._arrivals:
            if end >= target:
                return t
        return self.last_arrival

    @property
    def last_arrival(self) -> float | None:
        return self._arrivals[-1][1] if self._arrivals else None


class Preroll:
    """The latest ``ms`` of PCM16 frames, handed to the recognizer when speech starts."""

    def __init__(self, ms: float) -> None:
        self.ms = ms
        self._frames: deque[bytes] = deque()
        self._samples = 0

    def append(self, pcm: bytes) -> None:
        self._frames.append(pcm)
        self._samples += len(pcm) // 2
        keep = self.ms * SAMPLE_RATE / 1000
        while self._samples - len(self._frames[0]) // 2 >= keep:
            self._samples -= len(self._frames.popleft()) // 2

    def replace(self, frames: Iterable[bytes]) -> None:
        self._frames = deque(frames)
        self._samples = sum(len(f) // 2 for f in self._frames)

    def take(self) -> list[bytes]:
        """The frames kept, oldest first; the pre-roll is empty after."""
        frames, self._frames, self._samples = list(self._frames), deque(), 0
        return frames
