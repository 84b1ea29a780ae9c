"""Hand freed heap memory back to the operating system: when a voice session ends and when
the engine loop has been idle for a second (runtime/server/batching.py).

A voice session runs its own threads (input, generation, speech) and frees what they held
when it ends, but glibc keeps freed chunks in its per-thread arenas: measured here with
two voice clients for 2 minutes, the server's RSS rose from 705 to 1,010 MB while its live
Python memory stayed flat, and one ``malloc_trim(0)`` brought it back to 631 MB (the soak
in bench/reliability.py counts that as growth; a device with 8 GB shared with the GPU
cannot spare it). Fixed arena counts and mmap thresholds (``mallopt``) helped less. Where
the C library has no ``malloc_trim`` (musl, macOS) this does nothing. The rest of the
soak's growth was ONNX Runtime's: the Piper voice's arena (runtime/voice/piper_tts.py now
shrinks it after each run) and a VAD session loaded per voice session (now one, shared:
runtime/voice/vad.py).

The cost: a trim took 6 ms median and 64 ms at worst here, on the engine loop's thread
for the idle trim, so a request arriving just then waits that long. The idle trim comes a
second after the last work, which in a voice turn falls while the user is still speaking.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time

log = logging.getLogger(__name__)


def _load_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_TRIM = _load_trim()
_lock = threading.Lock()
_last = 0.0


def release_free_heap(idle: bool, min_interval_s: float = 2.0) -> float | None:
    """``malloc_trim(0)``: always when ``idle`` (no other voice session, or the engine loop
    idle: few threads can wait on an arena lock while it works), else at most once per
    ``min_interval_s``. The milliseconds it took, or None when it did not run
    (too soon, another trim running, or no glibc)."""
    global _last
    if _TRIM is None or not _lock.acquire(blocking=False):
        return None
    try:
        now = time.monotonic()
        if not idle and now - _last < min_interval_s:
            return None
        _TRIM(0)
        _last = time.monotonic()
        took_ms = 1000.0 * (_last - now)
        log.debug("heap trimmed in %.1f ms", took_ms)
        return took_ms
    finally:
        _lock.release()
