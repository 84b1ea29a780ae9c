"""runtime/server/heap.py: freed heap goes back to the OS after a voice session."""

from __future__ import annotations

import ctypes.util
import threading

import psutil
import pytest

from moe2edge.runtime.server import heap

glibc = pytest.mark.skipif(heap._TRIM is None, reason="no malloc_trim (not glibc)")


@glibc
def test_idle_trims_always_busy_at_most_once_per_interval() -> None:
    assert isinstance(heap.release_free_heap(idle=True), float)
    assert isinstance(heap.release_free_heap(idle=True), float)  # idle: no rate limit
    assert heap.release_free_heap(idle=False, min_interval_s=60.0) is None  # just trimmed
    assert isinstance(heap.release_free_heap(idle=False, min_interval_s=0.0), float)


@glibc
def test_memory_freed_by_ended_threads_is_returned() -> None:
    """Blocks freed in threads' arenas around a few kept ones stay in the process until
    trimmed (the pattern of a voice session's threads: most of what they held is freed)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    kept: list[int] = []
    proc = psutil.Process()

    def churn() -> None:
        blocks = [libc.malloc(2048) for _ in range(30_000)]  # ~60 MB per thread
        for block in blocks:
            ctypes.memset(block, 1, 2048)
        for i, block in enumerate(blocks):
            (kept.append if i % 64 == 0 else libc.free)(block)

    heap.release_free_heap(idle=True)
    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    before = proc.memory_info().rss
    heap.release_free_heap(idle=True)
    after = proc.memory_info().rss
    for block in kept:
        libc.free(block)
    assert before - after > 100 * 2**20, (before / 2**20, after / 2**20)
