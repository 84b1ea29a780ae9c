"""Audio helpers for the voice pipeline: PCM16 <-> float32, frame validation, resampling, WAV I/O.

The voice pipeline speaks one format on the wire: 16 kHz, mono, signed 16-bit little-endian
PCM ("PCM16"). Inside, audio is a 1-D float32 numpy array in [-1, 1]. Only numpy and the stdlib.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import struct
import wave
from pathlib import Path

import numpy as np

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


# --- resampling -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _filter_bank(up: int, down: int, half_taps: int) -> tuple[np.ndarray, np.ndarray]:
    """Polyphase bank for resampling by up/down: one Kaiser-windowed sinc per output phase.

    Returns (bank [up, taps] float32, tap offsets [taps] int64 relative to floor(position)).
    """
    cutoff = min(1.0, up / down)  # the lower Nyquist, so downsampling does not alias
    width = int(math.ceil(half_taps / cutoff))
    offsets = np.arange(-width + 1, width + 1)
    frac = np.arange(up) / up
    dist = frac[:, None] - offsets[None, :]
    ratio = np.clip(dist / width, -1.0, 1.0)
    window = np.i0(8.6 * np.sqrt(1.0 - ratio * ratio)) / np.i0(8.6)
    bank = (cutoff * np.sinc(cutoff * dist) * window).astype(np.float32)
    return bank, offsets


def _sinc_resample(x: np.ndarray, src_rate: int, dst_rate: int, half_taps: int) -> np.ndarray:
    """Polyphase windowed-sinc resampling (band-limited interpolation at each output instant)."""
    g = math.gcd(src_rate, dst_rate)
    up, down = dst_rate // g, src_rate // g
    n_out = len(x) * up // down
    bank, offsets = _filter_bank(up, down, half_taps)
    width = -int(offsets[0]) + 1
    padded = np.concatenate([np.zeros(width, np.float32), x, np.zeros(width + 1, np.float32)])
    out = np.empty(n_out, dtype=np.float32)
    block = 8192  # bound the (block x taps) gather
    for start in range(0, n_out, block):
        idx = np.arange(start, min(start + block, n_out), dtype=np.int64)
        base, phase = np.divmod(idx * down, up)
        frames = padded[base[:, None] + offsets[None, :] + width]
        out[start : start + len(idx)] = np.einsum("ij,ij->i", frames, bank[phase])
    return out


def resample(
    samples: np.ndarray, src_rate: int, dst_rate: int = SAMPLE_RATE, method: str = "sinc"
) -> np.ndarray:
    """Resample mono float32 audio from `src_rate` to `dst_rate` Hz.

    method="sinc" (default) is polyphase Kaiser-windowed-sinc interpolation (16 zero crossings
    a side), which removes content above the new Nyquist (~7 ms per second of 22.05 kHz audio
    on one x86 core); method="linear" is np.interp (cheaper, but it aliases).
    """
    x = np.asarray(samples, dtype=np.float32).reshape(-1)
    if src_rate <= 0 or dst_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {src_rate} -> {dst_rate}")
    if src_rate == dst_rate or len(x) == 0:
        return x.copy()
    if method == "linear":
        n_out = int(math.floor(len(x) * dst_rate / src_rate))
        pos = np.arange(n_out) * (src_rate / dst_rate)
        return np.interp(pos, np.arange(len(x)), x).astype(np.float32)
    if method == "sinc":
        return _sinc_resample(x, src_rate, dst_rate, half_taps=16)
    raise ValueError(f"unknown resample method {method!r}: use 'sinc' or 'linear'")


# --- WAV --------------------------------------------------------------------------------------


def _decode_samples(raw: bytes, sampwidth: int, channels: int) -> np.ndarray:
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


def parse_wav_bytes(data: bytes) -> tuple[np.ndarray, int]:
    """Parse an in-memory PCM WAV file -> (mono float32 samples, sample rate).

    Tolerates the "streaming" headers written to a pipe (e.g. `espeak-ng --stdout`), whose
    RIFF and data sizes are placeholders: the data chunk then runs to the end of the bytes.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a WAV file (no RIFF/WAVE header)")
    pos = 12
    fmt: tuple[int, int, int, int] | None = None
    while pos + 8 <= len(data):
        chunk_id = data[pos : pos + 4]
        (size,) = struct.unpack("<I", data[pos + 4 : pos + 8])
        body = pos + 8
        if chunk_id == b"fmt ":
            audio_format, channels, rate, _, _, bits = struct.unpack(
                "<HHIIHH", data[body : body + 16]
            )
            fmt = (audio_format, channels, rate, bits)
        elif chunk_id == b"data":
            if fmt is None:
                raise ValueError("WAV data chunk comes before its fmt chunk")
            audio_format, channels, rate, bits = fmt
            if audio_format not in (1, 0xFFFE):
                raise ValueError(f"unsupported WAV encoding {audio_format} (only PCM)")
            end = min(len(data), body + size)
            return _decode_samples(data[body:end], bits // 8, channels), rate
        pos = body + size + (size & 1)
    raise ValueError("WAV file has no data chunk")


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a PCM WAV file -> (mono float32 samples, sample rate). Stereo is averaged to mono."""
    with wave.open(str(path), "rb") as w:
        channels, sampwidth, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
        raw = w.readframes(w.getnframes())
    return _decode_samples(raw, sampwidth, channels), rate


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write mono float32 samples (or int16) as a 16-bit PCM WAV file."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(as_pcm16(samples))


def wav_bytes(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Mono samples as the bytes of a 16-bit PCM WAV file (for an HTTP response)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(as_pcm16(samples))
    return buf.getvalue()
