"""Process memory settings shared by the stages (standard library only)."""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)


def hand_back_freed_memory() -> None:
    """Have glibc return freed tensors of 1 MiB and up to the OS (Linux only; no-op elsewhere).

    glibc's dynamic mmap threshold grows to 32 MiB, so transient tensors of 1-32 MiB (FSDP2's
    rank-0 broadcast and each step's, an export's transposed weights) stay in its heap,
    fragmented. Measured: 400 MiB less peak RSS per gloo rank at 152M parameters, and
    700 MiB less for the FP32 export of a 605M model.
    ``MALLOC_MMAP_THRESHOLD_`` in the environment wins over it.
    """
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD; a fixed value also disables the growth
    except (OSError, AttributeError):  # musl or another libc without mallopt
        log.debug("mallopt is not available; freed memory stays with the allocator")
