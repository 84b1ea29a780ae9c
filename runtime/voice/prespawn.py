"""espeak-ng with processes started ahead of need, for the first words of a reply.

Starting ``espeak-ng`` and loading its voice takes 20-75 ms on a busy 2-core machine; a
process started in advance and waiting on stdin speaks a short phrase in 3-10 ms (measured
here: "sure," cold 22-75 ms, pre-started 2.5-10 ms). Since the first reply audio waits on
the first phrase's synthesis, the service keeps ``spares`` such processes ready.
"""

from __future__ import annotations

import logging
import subprocess
import threading
from collections import deque

import numpy as np

from moe2edge.runtime.voice.audio import SAMPLE_RATE, parse_wav_bytes, resample
from moe2edge.runtime.voice.tts import EspeakSynthesizer

log = logging.getLogger(__name__)


class PrespawnedEspeak(EspeakSynthesizer):
    """``EspeakSynthesizer`` whose processes are started before the text exists."""

    def __init__(self, *args, spares: int = 2, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.spares = spares
        self._lock = threading.Lock()
        self._ready: deque[subprocess.Popen] = deque()
        self._closed = False
        self._refill()

    def _spawn(self) -> subprocess.Popen:
        return subprocess.Popen(
            self.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )

    def _refill(self) -> None:
        with self._lock:
            while not self._closed and len(self._ready) < self.spares:
                self._ready.append(self._spawn())

    def _take(self) -> subprocess.Popen:
        with self._lock:
            while self._ready:
                proc = self._ready.popleft()
                if proc.poll() is None:
                    return proc
        return self._spawn()

    def synthesize(self, text: str) -> np.ndarray:
        if not text.strip():
            return np.zeros(0, dtype=np.float32)
        proc = self._take()
        try:
            out, err = proc.communicate(text.encode("utf-8"), timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise RuntimeError(f"espeak-ng took over {self.timeout_s} s on {text[:40]!r}") from None
        finally:
            self._refill()  # the next phrase's process starts while this one is played
        if proc.returncode != 0 or not out:
            raise RuntimeError(
                f"espeak-ng failed (exit {proc.returncode}, voice {self.voice!r}): "
                f"{err.decode(errors='replace').strip()}"
            )
        audio, rate = parse_wav_bytes(out)
        return resample(audio, rate, SAMPLE_RATE)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            while self._ready:
                proc = self._ready.popleft()
                proc.kill()
                proc.wait()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
