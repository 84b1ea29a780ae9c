"""Admission control: a fixed number of generation slots and a bounded wait queue.

A request takes a slot when one is free, waits in the queue when none is, and is turned
away (``Overloaded``, which the API answers with 429 and ``Retry-After``) when the queue is
full too. A slot is given back when its work has really stopped: the batching loop
(``server/batching.py``) releases it once the generation's row is free, which for a client
that disconnects is the next prefill chunk or decode step.

An optional ``limiter`` (duck-typed: anything with ``allowed_concurrency() -> int``, such
as the Jetson power governor) lowers the number of usable slots at run time.

Our own code, not an ``asyncio.Semaphore``: the wait queue is bounded, the capacity moves
with the limiter, and Retry-After needs the queue depth and the mean slot time.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from typing import Any

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """No slot and no room in the queue: come back after ``retry_after_s`` seconds."""

    def __init__(self, retry_after_s: int, queued: int):
        super().__init__(
            f"server busy: all generation slots are taken and {queued} requests are waiting; "
            f"retry after {retry_after_s} s"
        )
        self.retry_after_s = retry_after_s


class Slot:
    """A held generation slot; ``release()`` is idempotent and safe from any thread."""

    def __init__(self, scheduler: Scheduler):
        self._scheduler = scheduler
        self._released = False
        self._lock = threading.Lock()  # two threads releasing at once give back one slot
        self.started = time.perf_counter()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._scheduler._release_threadsafe(time.perf_counter() - self.started)


class Scheduler:
    """Slots and queue, living on one asyncio event loop (``acquire`` runs on it)."""

    def __init__(
        self, slots: int, queue: int, limiter: Any = None, retry_after_s: float = 1.0
    ) -> None:
        self.slots = slots
        self.queue_size = queue
        self.limiter = limiter
        self.min_retry_after_s = retry_after_s
        self.active = 0
        self._waiters: deque[asyncio.Future] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._mean_s = 1.0  # EMA of how long a slot is held, for Retry-After
        self.rejected = 0

    @property
    def queued(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def capacity(self) -> int:
        n = self.slots
        if self.limiter is not None:
            try:
                n = min(n, int(self.limiter.allowed_concurrency()))
            except Exception:  # a broken limiter must not take the service down
                log.exception("concurrency limiter failed; using %d slots", n)
        return max(1, n)

    def retry_after(self) -> int:
        wait = self._mean_s * (self.queued + 1) / self.capacity()
        return max(1, math.ceil(max(self.min_retry_after_s, wait)))

    async def acquire(self) -> Slot:
        """A slot now, or after waiting in the queue; ``Overloaded`` when the queue is full."""
        self._loop = asyncio.get_running_loop()
        if self.active < self.capacity() and not self.queued:
            self.active += 1
            return Slot(self)
        if self.queued >= self.queue_size:
            self.rejected += 1
            raise Overloaded(self.retry_after(), self.queued)
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # release() hands its slot over by resolving this future
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release(0.0)  # the slot was handed over just as we were cancelled
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        return Slot(self)

    def _release_threadsafe(self, held_s: float) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            self._release(held_s)
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._release(held_s)
        else:
            loop.call_soon_threadsafe(self._release, held_s)

    def _release(self, held_s: float) -> None:
        if held_s > 0:
            self._mean_s = 0.8 * self._mean_s + 0.2 * held_s
        if self.active <= 0:  # a release without a slot: a bug, but never a negative count
            log.error("a slot was released that was not held; the count stays at 0")
            return
        self.active -= 1
        while self._waiters and self.active < self.capacity():
            waiter = self._waiters.popleft()
            if waiter.done():
                continue
            self.active += 1
            waiter.set_result(None)

    def stats(self) -> dict[str, int]:
        return {
            "slots": self.slots,
            "capacity": self.capacity(),
            "active": self.active,
            "queued": self.queued,
            "queue_size": self.queue_size,
            "rejected": self.rejected,
        }
