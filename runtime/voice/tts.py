"""Text-to-speech for the voice pipeline: the synthesizer interface, phrase streaming, espeak-ng.

Piper voices (ONNX) are in runtime/voice/piper_tts.py; runtime/voice/voices.py picks one.

Every synthesizer returns mono float32 audio at 16 kHz. `stream()` takes text as it is
generated (e.g. LLM tokens), cuts it into phrases at punctuation or after `max_words` words,
and yields the audio of each phrase as soon as that phrase is complete, so the first audio is
out long before the whole reply exists.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from moe2edge.runtime.voice.audio import SAMPLE_RATE, parse_wav_bytes, resample

logger = logging.getLogger(__name__)


def find_espeak(binary: str = "espeak-ng") -> str:
    """The path of the espeak-ng binary, or FileNotFoundError saying how to install it."""
    path = shutil.which(binary)
    if path is None:
        raise FileNotFoundError(
            f"{binary} not found on PATH: install it: apt-get install espeak-ng"
        )
    return path


# --- phrase splitting -------------------------------------------------------------------------

_BOUNDARY = re.compile(r"[.!?;:,]+(?=\s)|\n")


class PhraseSplitter:
    """Cut streamed text into speakable phrases.

    A phrase ends at . ! ? ; : followed by whitespace, at a newline, at a comma once the
    phrase has `min_words_at_comma` words, or after `max_words` complete words. Our own:
    sentence splitters (nltk, pysbd) want the whole text, this cuts text as it streams in.
    """

    def __init__(self, max_words: int = 10, min_words_at_comma: int = 3) -> None:
        if max_words < 1:
            raise ValueError(f"max_words must be >= 1, got {max_words}")
        self.max_words = max_words
        self.min_words_at_comma = min_words_at_comma
        self._buffer = ""

    def push(self, text: str) -> list[str]:
        """Add text; return the phrases it completed."""
        self._buffer += text
        phrases: list[str] = []
        while True:
            end = self._next_cut()
            if end is None:
                return phrases
            phrase, self._buffer = self._buffer[:end].strip(), self._buffer[end:]
            if any(ch.isalnum() for ch in phrase):
                phrases.append(phrase)

    def flush(self) -> list[str]:
        """End of text: return what is left as a last phrase."""
        rest, self._buffer = self._buffer.strip(), ""
        return [rest] if any(ch.isalnum() for ch in rest) else []

    def _next_cut(self) -> int | None:
        for m in _BOUNDARY.finditer(self._buffer):
            if "," not in m.group() or (
                len(self._buffer[: m.start()].split()) >= self.min_words_at_comma
            ):
                return m.end()
        words = list(re.finditer(r"\S+(?=\s)", self._buffer))
        if len(words) >= self.max_words:
            return words[self.max_words - 1].end()
        return None


@dataclass(frozen=True)
class SpeechChunk:
    """The audio of one phrase (float32, 16 kHz) and its text."""

    text: str
    audio: np.ndarray


class Synthesizer(ABC):
    """A text-to-speech engine producing mono float32 audio at 16 kHz."""

    sample_rate: int = SAMPLE_RATE
    max_words: int = 10

    @abstractmethod
    def synthesize(self, text: str) -> np.ndarray:
        """All of `text` as one float32 array at 16 kHz."""

    def stream_phrases(self, text_chunks: Iterable[str] | str) -> Iterator[SpeechChunk]:
        """Synthesize each phrase as soon as the incoming text completes it."""
        splitter = PhraseSplitter(self.max_words)
        chunks = [text_chunks] if isinstance(text_chunks, str) else text_chunks
        for chunk in chunks:
            for phrase in splitter.push(chunk):
                yield self._speak(phrase)
        for phrase in splitter.flush():
            yield self._speak(phrase)

    def stream(self, text_chunks: Iterable[str] | str) -> Iterator[np.ndarray]:
        """Like stream_phrases, yielding only the audio chunks."""
        for chunk in self.stream_phrases(text_chunks):
            yield chunk.audio

    def _speak(self, phrase: str) -> SpeechChunk:
        started = time.perf_counter()
        audio = self.synthesize(phrase)
        logger.debug(
            "synthesized %r: %.0f ms audio in %.1f ms",
            phrase,
            1000 * len(audio) / SAMPLE_RATE,
            1000 * (time.perf_counter() - started),
        )
        return SpeechChunk(phrase, audio)


# --- espeak-ng --------------------------------------------------------------------------------


class EspeakSynthesizer(Synthesizer):
    """The espeak-ng binary: `espeak-ng --stdout -v VOICE -s WPM`, its WAV resampled to 16 kHz.

    voice: an espeak-ng voice, optionally with a variant ("en-us", "en-us+f3", "en+m3").
    speed_wpm: words per minute (espeak-ng's default is 175). pitch: 0-99 (default 50).
    """

    def __init__(
        self,
        voice: str = "en-us",
        speed_wpm: int = 175,
        pitch: int | None = None,
        binary: str = "espeak-ng",
        max_words: int = 10,
        timeout_s: float = 30.0,
    ) -> None:
        self.binary = find_espeak(binary)
        self.voice = voice
        self.speed_wpm = speed_wpm
        self.pitch = pitch
        self.max_words = max_words
        self.timeout_s = timeout_s

    def command(self) -> list[str]:
        cmd = [self.binary, "--stdout", "-v", self.voice, "-s", str(self.speed_wpm)]
        if self.pitch is not None:
            cmd += ["-p", str(self.pitch)]
        return cmd

    def synthesize(self, text: str) -> np.ndarray:
        if not text.strip():
            return np.zeros(0, dtype=np.float32)
        proc = subprocess.run(
            self.command(), input=text.encode("utf-8"), capture_output=True, timeout=self.timeout_s
        )
        if proc.returncode != 0 or not proc.stdout:
            raise RuntimeError(
                f"espeak-ng failed (exit {proc.returncode}, voice {self.voice!r}): "
                f"{proc.stderr.decode(errors='replace').strip()}"
            )
        audio, rate = parse_wav_bytes(proc.stdout)
        return resample(audio, rate, SAMPLE_RATE)
