"""Batch > 1: many sequences in one engine, one row each, in one decode step.

``KVBatch(engine, rows)`` hands out up to ``rows`` KV caches (``take``) and runs one decode
token for any number of them at once (``forward``). On the shared-buffer graph (the model
builder's GroupQueryAttention, ``io.kv_cache.shared_buffer``) the batch owns one
``[rows, kv_heads, max_length, head_dim]`` buffer per layer and side, and each cache is a
row of it:

* row ``b`` of a C-contiguous ``[B, H, L, D]`` buffer is itself a contiguous
  ``[1, H, L, D]`` block, so a row's cache is an ordinary shared-buffer ``KVCache`` over
  views (``RowStorage``): ``engine.forward(ids, cache)`` prefills it alone, at batch 1,
  exactly as a cache of its own (copies, copy on write and ``truncate`` included);
* a decode step binds rows ``lo..hi`` of the buffers as one ``[hi - lo, H, L, D]`` batch
  with ``seqlens_k[b]`` = the positions row ``b`` holds. GroupQueryAttention takes every
  row's past length, new-key position and rotary position from its ``seqlens_k`` (the
  graph has no position input), so rows of different lengths run in one step;
  ``total_sequence_length`` is the longest row after the step. A row inside the span that
  does not decode this step runs a dummy token at the position after its last one, which
  its next run overwrites (rows where that position is full, or held by a copy, split the
  span instead);
* ``free`` gives a row back for the next ``take``; no other row moves or is copied;
* ``take(prefix)`` starts a row from what another cache holds (the service's prefix
  cache): its positions are copied into the row, O(prefix).

A step runs one new token per row: GroupQueryAttention (ONNX Runtime's CPU kernel) refuses
more than one new token per row at batch > 1 once there is a past ("batch_size must be 1
when sequence_length > 1 and past context is given"), so several tokens of one row (a
prefill chunk, a speculative verify) run through ``engine.forward`` on its row alone.

Any other engine (the concat graph, TensorRT, CUDA buffers, bundles with a mask input)
gets the same interface with one ``engine.forward`` per cache: correct, not batched.
Use a batch from one thread at a time (the service's batching loop).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from moe2edge.runtime.engine import (
    LOGITS_TO_KEEP,
    SEQLENS,
    TOTAL_LENGTH,
    OnnxEngine,
    SharedStorage,
)
from moe2edge.runtime.errors import ContextOverflowError
from moe2edge.runtime.kv_cache import KVCache

log = logging.getLogger(__name__)


class RowStorage(SharedStorage):
    """One row of a ``KVBatch``'s buffers: a shared-buffer storage over views."""

    def __init__(self, batch: KVBatch, row: int):
        super().__init__(
            batch.engine,
            batch.engine.max_length,
            keys=[k[row : row + 1] for k in batch.keys],
            values=[v[row : row + 1] for v in batch.values],
        )
        self.batch, self.row = batch, row


@dataclass
class _Span:
    """The IO binding of rows ``lo..hi`` for a decode step, bound once, written per step."""

    binding: ort.IOBinding
    ids: np.ndarray  # [rows, 1] int64
    seqlens: np.ndarray  # [rows] int32
    total: np.ndarray  # () int32
    logits: np.ndarray  # [rows, 1, vocab]


def batches_rows(engine) -> bool:
    """Does ``engine`` run many rows in one step (else one ``forward`` per cache)?"""
    return (
        isinstance(engine, OnnxEngine)
        and engine.shared_buffer
        and engine.direct_lengths
        and engine.ort_device == "cpu"
    )


class KVBatch:
    """Up to ``rows`` caches of ``engine`` that decode together; see the module docstring."""

    def __init__(self, engine, rows: int):
        if rows < 1:
            raise ValueError(f"a batch needs at least one row, not {rows}")
        self.engine, self.rows = engine, rows
        self.batched = batches_rows(engine)
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        if self.batched:  # np.zeros: pages are only touched as rows fill
            shape = engine._kv_shape(engine.max_length, rows)
            for _ in range(engine.num_layers):
                self.keys.append(np.zeros(shape, dtype=engine.kv_dtype))
                self.values.append(np.zeros(shape, dtype=engine.kv_dtype))
        self._free = list(range(rows))  # lowest first: busy rows stay together
        self._row_of: dict[KVCache, int] = {}
        self._cache_in: list[KVCache | None] = [None] * rows
        self._storage: list[RowStorage | None] = [None] * rows
        self._spans: dict[tuple[int, int], _Span] = {}

    # --- rows -----------------------------------------------------------------------

    @property
    def in_use(self) -> int:
        return self.rows - len(self._free)

    @property
    def free_rows(self) -> int:
        return len(self._free)

    def take(self, prefix: KVCache | None = None) -> KVCache:
        """An empty cache in a free row (``RuntimeError`` when every row is taken), or one
        holding what ``prefix`` holds (a cache of the same engine, e.g. from
        ``runtime.prefix_cache``): its positions are copied into the row, O(prefix)."""
        if not self._free:
            raise RuntimeError(f"all {self.rows} rows of the batch are taken")
        row = self._free.pop(0)
        if self.batched:
            storage = RowStorage(self, row)
            cache = KVCache(keys=storage.keys, values=storage.values, storage=storage)
            storage.attach(cache)
            self._storage[row] = storage
            if prefix is not None and prefix.length:
                for src, dst in zip(
                    prefix.keys + prefix.values, storage.keys + storage.values, strict=True
                ):
                    self.engine._copy_positions(src, dst, prefix.length)
                cache.length, cache.tokens = prefix.length, list(prefix.tokens)
        else:  # a cache of its own: a copy of the prefix (shared until written) will do
            cache = prefix.copy() if prefix is not None else self.engine.new_cache()
        self._row_of[cache] = row
        self._cache_in[row] = cache
        return cache

    def free(self, cache: KVCache) -> None:
        """Give ``cache``'s row back. Copies of it that still read the row first get storage
        of their own (the row is about to be overwritten); ``cache`` itself is emptied."""
        row = self._row_of.pop(cache)
        self._cache_in[row] = None
        storage, self._storage[row] = self._storage[row], None
        if storage is not None:
            with storage.lock:
                storage.sharers.discard(cache)
                others = list(storage.sharers)
                if others:
                    own = storage.clone_prefix(max(c.length for c in others))
                    for other in others:
                        self.engine._adopt(other, own)
        cache.keys, cache.values, cache.storage = [], [], None
        cache.length, cache.tokens = 0, []
        self._free.append(row)
        self._free.sort()

    # --- one decode step --------------------------------------------------------------

    def forward(self, caches: Sequence[KVCache], token_ids: Sequence[int]) -> np.ndarray:
        """Run ``token_ids[i]`` after what ``caches[i]`` holds, all in one step where the
        graph allows; returns the logits [n, vocab] (float32, the caller's)."""
        if len(caches) != len(token_ids):
            raise ValueError(f"{len(caches)} caches but {len(token_ids)} tokens")
        if len({id(c) for c in caches}) != len(caches):
            raise ValueError("a cache may take one token per step")
        for cache in caches:
            if cache.length + 1 > self.engine.max_length:
                raise ContextOverflowError(
                    f"a cache of {cache.length} positions is full (the model's context is "
                    f"{self.engine.max_length} tokens); end that sequence before this step"
                )
        out = np.empty((len(caches), self.engine.vocab_size), dtype=np.float32)
        rows: dict[int, int] = {}  # row -> index into caches
        for i, cache in enumerate(caches):
            row = self._batched_row(cache)
            if row is None:  # outside the buffers, or a copy holds what it would write
                out[i] = self.engine.forward([int(token_ids[i])], cache)
            else:
                rows[row] = i
        for lo, hi in self._segments(sorted(rows)):
            in_span = {r: rows[r] for r in range(lo, hi) if r in rows}
            self._run_span(lo, hi, in_span, caches, token_ids, out)
        return out

    def _batched_row(self, cache: KVCache) -> int | None:
        row = self._row_of.get(cache) if self.batched else None
        if row is None or cache.storage is not self._storage[row]:
            return None  # (a copy on write moved it to storage of its own)
        if cache.storage.claimed_beyond(cache, cache.length):
            return None  # engine.forward copies it out first
        return row

    def _idle_position(self, row: int) -> int | None:
        """Where a dummy token may go in ``row`` this step: after the last position any
        cache on it holds (None: the row is full there)."""
        storage = self._storage[row]
        if storage is None:
            return 0
        with storage.lock:
            filled = max((c.length for c in list(storage.sharers)), default=0)
        return filled if filled < self.engine.max_length else None

    def _segments(self, active: list[int]) -> list[tuple[int, int]]:
        """Spans ``lo..hi`` covering the ``active`` rows, split at idle rows that are full."""
        spans: list[tuple[int, int]] = []
        for row in active:
            gap = range(spans[-1][1], row) if spans else range(0)
            if spans and all(self._idle_position(r) is not None for r in gap):
                spans[-1] = (spans[-1][0], row + 1)
            else:
                spans.append((row, row + 1))
        return spans

    def _run_span(
        self,
        lo: int,
        hi: int,
        rows: dict[int, int],
        caches: Sequence[KVCache],
        token_ids: Sequence[int],
        out: np.ndarray,
    ) -> None:
        span = self._span(lo, hi)
        span.ids.fill(0)
        for row in range(lo, hi):
            if row in rows:
                span.seqlens[row - lo] = caches[rows[row]].length
                span.ids[row - lo, 0] = int(token_ids[rows[row]])
            else:
                span.seqlens[row - lo] = self._idle_position(row) or 0
        span.total[()] = int(span.seqlens.max()) + 1
        with contextlib.ExitStack() as locks:  # rows' copies may live in other threads
            for row in range(lo, hi):
                if self._storage[row] is not None:
                    locks.enter_context(self._storage[row].lock)
            self.engine.session.run_with_iobinding(span.binding)
        for row, i in rows.items():
            out[i] = span.logits[row - lo, 0]
            caches[i].length += 1
            caches[i].tokens.append(int(token_ids[i]))

    def _span(self, lo: int, hi: int) -> _Span:
        span = self._spans.get((lo, hi))
        if span is not None:
            return span
        eng, n = self.engine, hi - lo
        binding = eng.session.io_binding()
        for layer in range(eng.num_layers):
            for kind, bufs in (("key", self.keys), ("value", self.values)):
                value = ort.OrtValue.ortvalue_from_numpy(bufs[layer][lo:hi])
                binding.bind_ortvalue_input(eng._name(f"past_{kind}", layer), value)
                binding.bind_ortvalue_output(eng._name(f"present_{kind}", layer), value)
        span = _Span(
            binding,
            ids=np.zeros((n, 1), dtype=np.int64),
            seqlens=np.zeros((n,), dtype=np.int32),
            total=np.zeros((), dtype=np.int32),
            logits=np.zeros((n, 1, eng.vocab_size), dtype=eng.logits_dtype),
        )
        binding.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(span.ids))
        binding.bind_ortvalue_input(SEQLENS, ort.OrtValue.ortvalue_from_numpy(span.seqlens))
        binding.bind_ortvalue_input(TOTAL_LENGTH, ort.OrtValue.ortvalue_from_numpy(span.total))
        if eng.logits_to_keep:
            binding.bind_cpu_input(LOGITS_TO_KEEP, np.array(1, dtype=np.int64))
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(span.logits))
        self._spans[(lo, hi)] = span
        return span
