"""Text-to-speech for the voice pipeline: espeak-ng (built in) and Piper voices (ONNX).

Every synthesizer returns mono float32 audio at 16 kHz. `stream()` takes text as it is
generated (e.g. LLM tokens), cuts it into phrases at punctuation or after `max_words` words,
and yields the audio of each phrase as soon as that phrase is complete, so the first audio is
out long before the whole reply exists.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import time
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# --- Piper ------------------------------------------------------------------------------------

PAD, BOS, EOS = "_", "^", "$"
_CLAUSE = re.compile(r"(.+?)(?:([.!?;:,]+)(?=\s|\Z)|\Z)", re.S)
_LANGUAGE_FLAG = re.compile(r"\([a-z]{2,3}(-[a-z0-9]+)*\)")


@dataclass(frozen=True)
class PiperVoiceConfig:
    """The parts of a Piper voice's .onnx.json that synthesis needs."""

    sample_rate: int
    espeak_voice: str
    phoneme_id_map: Mapping[str, Sequence[int]]
    phoneme_type: str = "espeak"
    num_speakers: int = 1
    noise_scale: float = 0.667
    length_scale: float = 1.0
    noise_w: float = 0.8

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> PiperVoiceConfig:
        try:
            inference = config.get("inference", {})
            return cls(
                sample_rate=int(config["audio"]["sample_rate"]),
                espeak_voice=str(config.get("espeak", {}).get("voice", "en-us")),
                phoneme_id_map={k: list(v) for k, v in config["phoneme_id_map"].items()},
                phoneme_type=str(config.get("phoneme_type", "espeak")),
                num_speakers=int(config.get("num_speakers", 1)),
                noise_scale=float(inference.get("noise_scale", 0.667)),
                length_scale=float(inference.get("length_scale", 1.0)),
                noise_w=float(inference.get("noise_w", 0.8)),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a Piper voice config (missing or bad {exc})") from exc

    @classmethod
    def load(cls, path: str | Path) -> PiperVoiceConfig:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def phonemes_to_ids(
    phonemes: Sequence[str], id_map: Mapping[str, Sequence[int]], missing: list[str] | None = None
) -> list[int]:
    """Piper's id sequence: BOS, PAD, then each phoneme's ids followed by PAD, then EOS.

    Phonemes not in the map are skipped (and appended to `missing` when given).
    """
    ids = [*id_map[BOS], *id_map[PAD]]
    for phoneme in phonemes:
        if phoneme not in id_map:
            if missing is not None:
                missing.append(phoneme)
            continue
        ids.extend(id_map[phoneme])
        ids.extend(id_map[PAD])
    ids.extend(id_map[EOS])
    return ids


def ipa_to_phonemes(ipa: str) -> list[str]:
    """Split espeak-ng IPA into Piper phonemes: NFD-normalized single codepoints."""
    return list(unicodedata.normalize("NFD", ipa))


def split_sentences(text: str) -> list[list[tuple[str, str]]]:
    """Text -> sentences -> (clause text, its punctuation mark or "").

    A clause ends at , ; : . ! or ? followed by whitespace (so "3.5" stays whole); a sentence
    ends at . ! or ?.
    """
    sentences: list[list[tuple[str, str]]] = [[]]
    for m in _CLAUSE.finditer(text):
        words, punct = m.group(1).strip(), m.group(2) or ""
        if any(ch.isalnum() for ch in words):
            sentences[-1].append((words, punct[:1]))
        if any(p in ".!?" for p in punct) and sentences[-1]:
            sentences.append([])
    return [s for s in sentences if s]


def espeak_phonemize(text: str, voice: str, binary: str = "espeak-ng") -> list[list[str]]:
    """Text -> Piper phonemes per sentence via `espeak-ng -q --ipa`, keeping clause punctuation
    the way piper-phonemize does ("This: is, a test." -> "ðˈɪs: ˈɪz, ɐ tˈɛst."). Our own:
    piper-phonemize ships its own espeak-ng build; this uses the system binary the TTS uses."""
    exe = find_espeak(binary)
    result: list[list[str]] = []
    for sentence in split_sentences(text):
        parts: list[str] = []
        for words, punct in sentence:
            proc = subprocess.run(
                [exe, "-q", "--ipa", "-v", voice],
                input=words.encode("utf-8"),
                capture_output=True,
                timeout=30,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"espeak-ng --ipa failed: {proc.stderr.decode().strip()}")
            ipa = " ".join(proc.stdout.decode("utf-8").split())
            parts.append(_LANGUAGE_FLAG.sub("", ipa) + punct)
        result.append(ipa_to_phonemes(" ".join(parts)))
    return result


class PiperSynthesizer(Synthesizer):
    """A Piper (VITS) voice run with onnxruntime: `voice.onnx` plus `voice.onnx.json`.

    The model takes input int64 [1, N] phoneme ids, input_lengths int64 [1], scales float32
    [noise_scale, length_scale, noise_w] and, for multi-speaker voices, sid int64 [1]; it
    returns float32 audio at the config's sample rate, which is peak-normalized as Piper does
    and resampled to 16 kHz.
    """

    def __init__(
        self,
        model_path: str | Path,
        config_path: str | Path | None = None,
        speaker_id: int | None = None,
        length_scale: float | None = None,
        intra_op_num_threads: int = 1,
        espeak_binary: str = "espeak-ng",
        max_words: int = 10,
    ) -> None:
        import onnxruntime as ort

        model_path = Path(model_path)
        config_path = Path(config_path) if config_path else Path(f"{model_path}.json")
        for path in (model_path, config_path):
            if not path.is_file():
                raise FileNotFoundError(f"Piper voice file not found: {path}")
        self.config = PiperVoiceConfig.load(config_path)
        if self.config.phoneme_type not in ("espeak", "text"):
            raise ValueError(f"unsupported Piper phoneme_type {self.config.phoneme_type!r}")
        self.espeak_binary = espeak_binary
        if self.config.phoneme_type == "espeak":
            find_espeak(espeak_binary)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_num_threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._input_names = {i.name for i in self.session.get_inputs()}
        self.speaker_id = speaker_id
        self.length_scale = length_scale if length_scale is not None else self.config.length_scale
        self.max_words = max_words
        logger.info("loaded Piper voice %s (%d Hz)", model_path.name, self.config.sample_rate)

    def phonemize(self, text: str) -> list[list[str]]:
        if self.config.phoneme_type == "text":
            return [list(unicodedata.normalize("NFD", text.casefold()))]
        return espeak_phonemize(text, self.config.espeak_voice, self.espeak_binary)

    def synthesize_ids(self, ids: Sequence[int]) -> np.ndarray:
        """Audio for one sentence's phoneme ids, at the voice's own sample rate."""
        feeds: dict[str, np.ndarray] = {
            "input": np.array([ids], dtype=np.int64),
            "input_lengths": np.array([len(ids)], dtype=np.int64),
            "scales": np.array(
                [self.config.noise_scale, self.length_scale, self.config.noise_w], dtype=np.float32
            ),
        }
        if "sid" in self._input_names:
            feeds["sid"] = np.array([self.speaker_id or 0], dtype=np.int64)
        audio = np.asarray(self.session.run(None, feeds)[0], dtype=np.float32).reshape(-1)
        return audio / max(0.01, float(np.max(np.abs(audio)))) if len(audio) else audio

    def synthesize(self, text: str) -> np.ndarray:
        pieces: list[np.ndarray] = []
        for phonemes in self.phonemize(text):
            missing: list[str] = []
            ids = phonemes_to_ids(phonemes, self.config.phoneme_id_map, missing)
            if missing:
                logger.warning("phonemes missing from the voice's id map: %s", "".join(missing))
            pieces.append(resample(self.synthesize_ids(ids), self.config.sample_rate))
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
