"""Prefix reuse across requests: KV caches of earlier requests, keyed by their tokens.

A chat client sends the whole history with every turn. After a request, the service keeps
its conversation's cache (prompt and reply); the next request whose tokens start the same
way continues from a copy of it, so turn N prefills only what is new since turn N-1.

* **Lookup** takes the entry sharing the longest common prefix with the request's tokens
  (not only entries that are a prefix of it: a reply re-encoded from its text may tokenise
  differently from the tokens generated, and a regenerated turn shares everything up to its
  last user message) and hands out a copy truncated to that prefix, at most all tokens but
  the request's last (that one runs, so the reply has logits to start from).
* **Copies are O(1)**: a copy shares the entry's storage until it writes where the entry has
  positions (copy on write, ``runtime/engine.py``), so entries are never changed by their
  users and any number of requests may continue from one entry at once.
* **Bounded by bytes**: the KV buffers the entries hold (counted once per buffer: entries and
  their copies share them; a shared-buffer cache holds its whole capacity), least recently
  used entries evicted first. An entry whose tokens start another's is dropped when that
  other is kept (the longer one serves every lookup the shorter one could).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from moe2edge.runtime.generate import Generator
from moe2edge.runtime.kv_cache import KVCache
from moe2edge.runtime.session import Conversation
from moe2edge.runtime.speculative import common_prefix_len

log = logging.getLogger(__name__)


def buffer_bytes(buffer: Any) -> int:
    """Bytes of one per-layer KV buffer (a numpy array or an ONNX Runtime OrtValue)."""
    if isinstance(buffer, ort.OrtValue):
        itemsize = 2 if "float16" in buffer.data_type() else 4
        return int(np.prod(buffer.shape())) * itemsize
    return int(np.asarray(buffer).nbytes)


def kv_bytes(caches: Sequence[KVCache]) -> int:
    """Bytes of the KV buffers ``caches`` hold, each buffer counted once."""
    seen: dict[int, int] = {}
    for cache in caches:
        for buffer in [*cache.keys, *cache.values]:
            if id(buffer) not in seen:
                seen[id(buffer)] = buffer_bytes(buffer)
    return sum(seen.values())


class PrefixCache:
    """Caches of earlier requests, LRU by the bytes of KV they hold (``max_bytes``).

    Thread-safe: ``lookup`` and ``insert`` may be called from any number of threads.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple[int, ...], KVCache] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0  # what the entries hold now
        self.hits = self.misses = self.evictions = 0
        self.reused_tokens = 0  # over all hits

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, tokens: Sequence[int]) -> bool:
        """Is there an entry of exactly ``tokens``? (No use recorded.)"""
        with self._lock:
            return tuple(int(t) for t in tokens) in self._entries

    def lookup(self, tokens: Sequence[int], min_tokens: int = 1) -> KVCache | None:
        """A private cache holding the longest cached prefix of ``tokens`` (all but the last
        at most), or None when fewer than ``min_tokens`` would be reused."""
        tokens = [int(t) for t in tokens]
        with self._lock:
            best, best_len = None, 0
            for key in reversed(self._entries):  # the most recent wins ties
                n = common_prefix_len(key, tokens)
                if n > best_len:
                    best, best_len = key, n
            use = min(best_len, len(tokens) - 1)
            if best is None or use < max(min_tokens, 1):
                self.misses += 1
                return None
            self._entries.move_to_end(best)
            clone = self._entries[best].copy()
            self.hits += 1
            self.reused_tokens += use
        clone.truncate(use)  # O(1) for shared buffers; concat caches slice their arrays
        return clone

    def insert(self, cache: KVCache) -> None:
        """Keep (a copy of) ``cache`` for later requests; evict down to ``max_bytes``."""
        key = tuple(cache.tokens)
        if not key or self.max_bytes == 0:
            return
        with self._lock:
            for other in list(self._entries):
                if len(other) >= len(key) and other[: len(key)] == key:  # already covered
                    self._entries.move_to_end(other)
                    return
            for other in [o for o in self._entries if key[: len(o)] == o]:
                del self._entries[other]  # covered by the new, longer entry
            self._entries[key] = cache.copy()
            self.bytes = kv_bytes(list(self._entries.values()))
            while self.bytes > self.max_bytes and self._entries:
                dropped, _ = self._entries.popitem(last=False)
                self.evictions += 1
                log.debug("prefix cache: evicted %d tokens", len(dropped))
                self.bytes = kv_bytes(list(self._entries.values()))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self.bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "reused_tokens": self.reused_tokens,
            }


def conversation_for(
    generator: Generator, prefixes: PrefixCache | None, tokens: Sequence[int]
) -> Conversation:
    """A ``Conversation`` for a request of ``tokens``: from the longest cached prefix when
    ``prefixes`` has one, else fresh (the engine's shared BOS prefix)."""
    bos = 1 if generator.bos_token_id is not None else 0
    cache = prefixes.lookup(tokens, min_tokens=bos + 1) if prefixes is not None else None
    if cache is None:
        return Conversation(generator)
    return Conversation(generator, cache=cache)
