"""Audio helpers for the voice pipeline: PCM16 <-> float32, frame validation, resampling, WAV I/O.

The voice pipeline speaks one format on the wire: 16 kHz, mono, signed 16-bit little-endian
PCM ("PCM16"). Inside, audio is a 1-D float32 numpy array in [-1, 1]. Resampling is libsoxr's
(`soxr`), WAV files are the stdlib's `wave`.
"""

from __future__ import annotations

import io
import logging
import wave
from pathlib import Path

import numpy as np
import soxr

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
"""The pipeline's sample rate in Hz (VAD, ASR and the TTS output all use it)."""
FRAME_MS = 20
"""The usual frame length a client streams, in milliseconds."""
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000
"""Samples in one FRAME_MS frame at SAMPLE_RATE (320)."""
BYTES_PER_SAMPLE = 2
DEFAULT_MAX_FRAME_MS = 1000
"""The largest frame validate_frame accepts unless told otherwise."""


def samples_to_ms(samples: int, sample_rate: int = SAMPLE_RATE) -> float:
    """A sample count (or offset) as milliseconds."""
    return 1000.0 * samples / sample_rate


def ms_to_samples(ms: float, sample_rate: int = SAMPLE_RATE) -> int:
    """Milliseconds as a whole number of samples (rounded)."""
    return int(round(ms * sample_rate / 1000.0))


def validate_frame(
    data: bytes | bytearray | memoryview,
    max_ms: float = DEFAULT_MAX_FRAME_MS,
    expected_samples: int | None = None,
) -> bytes:
    """Check that `data` is a frame of 16 kHz mono PCM16 little-endian audio and return it as bytes.

    Raises TypeError for a non-bytes object and ValueError (naming the problem) for an empty
    frame, an odd byte count, a frame longer than `max_ms`, or a sample count other than
    `expected_samples` when that is given.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(
            f"audio frame must be bytes of 16 kHz mono PCM16 little-endian audio, "
            f"got {type(data).__name__}"
        )
    data = bytes(data)
    n = len(data)
    if n == 0:
        raise ValueError(
            "empty audio frame: expected 16 kHz mono PCM16 little-endian audio "
            f"(e.g. {FRAME_SAMPLES * BYTES_PER_SAMPLE} bytes for {FRAME_MS} ms)"
        )
    if n % BYTES_PER_SAMPLE:
        raise ValueError(
            f"audio frame has an odd byte count ({n} bytes): PCM16 uses 2 bytes per sample, "
            "so a frame of N samples must be N*2 bytes"
        )
    max_bytes = ms_to_samples(max_ms) * BYTES_PER_SAMPLE
    if n > max_bytes:
        raise ValueError(
            f"audio frame too large: {n} bytes ({samples_to_ms(n // 2):.0f} ms) exceeds the "
            f"limit of {max_bytes} bytes ({max_ms:.0f} ms); send shorter frames, "
            f"e.g. {FRAME_MS} ms = {FRAME_SAMPLES * BYTES_PER_SAMPLE} bytes"
        )
    if expected_samples is not None and n != expected_samples * BYTES_PER_SAMPLE:
        raise ValueError(
            f"audio frame has {n // 2} samples ({n} bytes), expected exactly "
            f"{expected_samples} samples ({expected_samples * BYTES_PER_SAMPLE} bytes)"
        )
    return data


def pcm16_to_float32(data: bytes | bytearray | memoryview) -> np.ndarray:
    """PCM16 little-endian bytes -> float32 samples in [-1, 1)."""
    if len(data) % BYTES_PER_SAMPLE:
        raise ValueError(f"PCM16 data has an odd byte count ({len(data)} bytes)")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def float32_to_pcm16(samples: np.ndarray) -> bytes:
    """float32 samples (clipped to [-1, 1]) -> PCM16 little-endian bytes."""
    x = np.asarray(samples, dtype=np.float32).reshape(-1)
    x = np.clip(x, -1.0, 1.0)
    return np.round(x * 32767.0).astype("<i2").tobytes()


def as_float32(audio: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """Accept PCM16 bytes or a numeric array; return a 1-D float32 array in [-1, 1].

    An int16 array is scaled by 1/32768; a float array is taken as already in [-1, 1].
    """
    if isinstance(audio, bytes | bytearray | memoryview):
        return pcm16_to_float32(audio)
    x = np.asarray(audio)
    if x.ndim != 1:
        raise ValueError(f"audio must be mono (a 1-D array), got shape {x.shape}")
    if x.dtype == np.int16:
        return x.astype(np.float32) / 32768.0
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"audio array must be float or int16, got dtype {x.dtype}")
    return x.astype(np.float32, copy=False)


def as_pcm16(audio: bytes | bytearray | memoryview | np.ndarray) -> bytes:
    """Accept PCM16 bytes or a numeric array; return PCM16 little-endian bytes."""
    if isinstance(audio, bytes | bytearray | memoryview):
        if len(audio) % BYTES_PER_SAMPLE:
            raise ValueError(f"PCM16 data has an odd byte count ({len(audio)} bytes)")
        return bytes(audio)
    x = np.asarray(audio)
    if x.dtype == np.int16:
        return x.astype("<i2").tobytes()
    return float32_to_pcm16(as_float32(x))


def speech_bounds(samples: np.ndarray, threshold: float = 0.02) -> tuple[int, int]:
    """(first, one past the last) sample whose magnitude reaches ``threshold`` (about -34
    dBFS): where synthesized speech audibly starts and ends. (0, 0) for silence."""
    loud = np.flatnonzero(np.abs(np.asarray(samples).reshape(-1)) >= threshold)
    return (int(loud[0]), int(loud[-1]) + 1) if len(loud) else (0, 0)


# --- resampling -------------------------------------------------------------------------------


def resample(
    samples: np.ndarray, src_rate: int, dst_rate: int = SAMPLE_RATE, quality: str = "HQ"
) -> np.ndarray:
    """Resample mono float32 audio from `src_rate` to `dst_rate` Hz with libsoxr.

    soxr's band-limited "HQ" filter removes content above the new Nyquist (~0.3 ms per
    second of 22.05 kHz audio on one x86 core). The output has floor(n * dst / src)
    samples, so chunk lengths add up the same way whatever the rates.
    """
    x = np.asarray(samples, dtype=np.float32).reshape(-1)
    if src_rate <= 0 or dst_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {src_rate} -> {dst_rate}")
    if src_rate == dst_rate or len(x) == 0:
        return x.copy()
    out = soxr.resample(x, src_rate, dst_rate, quality=quality)
    return out[: len(x) * dst_rate // src_rate].astype(np.float32, copy=False)


# --- WAV --------------------------------------------------------------------------------------


def _decode_samples(raw: bytes, sampwidth: int, channels: int) -> np.ndarray:
    """Raw WAV frames -> mono float32 (kept here: `wave` hands over bytes, numpy scales them)."""
    usable = len(raw) - len(raw) % (sampwidth * channels)
    raw = raw[:usable]
    if sampwidth == 2:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif sampwidth == 1:
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif sampwidth == 4:
        x = np.frombuffer(raw, dtype="<i4").astype(np.float32) / 2147483648.0
    else:
        raise ValueError(f"unsupported WAV sample width {sampwidth} bytes (use 8/16/32-bit PCM)")
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1)
    return x.astype(np.float32, copy=False)


def _read(source: str | Path | io.BytesIO, name: str) -> tuple[np.ndarray, int]:
    try:
        with wave.open(source if isinstance(source, io.BytesIO) else str(source), "rb") as w:
            channels, sampwidth, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"{name} is not a PCM WAV file this reader takes: {exc}") from None
    return _decode_samples(raw, sampwidth, channels), rate


def parse_wav_bytes(data: bytes) -> tuple[np.ndarray, int]:
    """Parse an in-memory PCM WAV file -> (mono float32 samples, sample rate).

    Takes the "streaming" headers written to a pipe (e.g. `espeak-ng --stdout`), whose
    RIFF and data sizes are placeholders: `wave` then reads the data to the end of the bytes.
    """
    return _read(io.BytesIO(data), "the data")


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a PCM WAV file -> (mono float32 samples, sample rate). Stereo is averaged to mono."""
    return _read(path, str(path))


def _write(target: str | io.BytesIO, samples: np.ndarray, sample_rate: int) -> None:
    with wave.open(target, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(as_pcm16(samples))


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write mono float32 samples (or int16) as a 16-bit PCM WAV file."""
    _write(str(path), samples, sample_rate)


def wav_bytes(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Mono samples as the bytes of a 16-bit PCM WAV file (for an HTTP response)."""
    buf = io.BytesIO()
    _write(buf, samples, sample_rate)
    return buf.getvalue()


def mix_at_snr(
    speech: np.ndarray, noise: np.ndarray, snr_db: float, active_threshold: float = 0.02
) -> np.ndarray:
    """``speech`` plus ``noise`` scaled so the speech's active-frame power (20 ms frames
    with a peak above ``active_threshold``) is ``snr_db`` above the noise's mean power."""
    speech = np.asarray(speech, dtype=np.float32)
    noise = np.resize(np.asarray(noise, dtype=np.float32), len(speech))
    n = len(speech) // 320 * 320
    frames = speech[:n].reshape(-1, 320)
    active = frames[np.abs(frames).max(axis=1) > active_threshold]
    p_speech = float(np.mean(active.astype(np.float64) ** 2)) if len(active) else 0.0
    p_noise = float(np.mean(noise.astype(np.float64) ** 2))
    if p_speech == 0 or p_noise == 0:
        return speech.copy()
    gain = np.sqrt(p_speech / (p_noise * 10 ** (snr_db / 10)))
    return np.clip(speech + gain * noise, -1, 1).astype(np.float32)
