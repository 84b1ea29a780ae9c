"""Continuous batching: one worker thread runs every generation of the service.

Each HTTP generation is a ``Job`` handed to the ``BatchLoop``. The loop's thread, the only
one that runs the engine, repeats one iteration at a time:

1. jobs that arrived take a free row of its ``KVBatch`` (``runtime/batch.py``), seeded with
   the longest prefix of their prompt an earlier request left in the ``PrefixCache``
   (``runtime/prefix_cache.py``; its positions are copied into the row);
2. cancelled jobs (client gone) leave: row and slot are given back;
3. engine calls of other users (voice, through ``LoopEngine``) run, one chunk each;
4. the rest of the prompts is prefilled, at most ``prefill_chunk`` tokens in all (oldest
   job first), so a long prompt costs the others one chunk per step, not its whole prefill;
5. one decode step runs every job whose prompt is in: one batched engine run, then each
   job's next tokens go through its ``Decoding`` (``runtime/generate.py``: sampling, end
   tokens, stop strings, limits, detokenization; the same object ``Generator.decode``
   drives). With speculative decoding on (the generator's ``speculation``), each row
   proposes up to k tokens (prompt lookup or the draft model) and the step verifies every
   row's proposals in the same run (``_decode``).

A job joins at the next iteration and leaves at the one after it ends; its cache (prompt
and reply) then goes into the prefix cache for later requests. The rows are the service's
slots (``config.slots``): the scheduler admits a request only with a slot, and the loop
gives the slot back when the job's row is free, never earlier, so a slot bounds real work.
A cancel is seen at the next chunk or step.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from moe2edge.runtime.batch import KVBatch
from moe2edge.runtime.generate import Decoding, GenerationResult, Generator
from moe2edge.runtime.kv_cache import KVCache
from moe2edge.runtime.prefix_cache import PrefixCache
from moe2edge.runtime.sampling import SamplingParams
from moe2edge.runtime.speculative import Speculator

log = logging.getLogger(__name__)
END = object()  # what a job emits last
PAD = 0  # fills a row's shorter draft up to the step's width; its logits are not read


class Job:
    """One generation: its prompt and sampling, where its text goes (``emit``: pieces, an
    exception, then ``END``), its cancel event and its slot (given back by the loop)."""

    def __init__(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        emit: Callable[[Any], None],
        release_slot: Callable[[], None],
        arrived: float | None = None,
    ):
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.params, self.emit, self.release_slot = params, emit, release_slot
        self.result = GenerationResult(prompt_tokens=len(self.prompt_ids))
        self.cancel = threading.Event()
        self.arrived = arrived if arrived is not None else time.perf_counter()
        self.admitted = time.perf_counter()  # holds a slot
        self.started: float | None = None  # has a row
        self.last_token_at: float | None = None
        self.cache: KVCache | None = None
        self.prefilled = 0  # prompt tokens in the cache (reused from the prefix cache or run)
        self.decoding: Decoding | None = None  # once the prompt is in
        self.speculator: Speculator | None = None
        self.next_token: int | None = None  # chosen, to run at the next decode step
        self._lock = threading.Lock()
        self._submitted = self._finished = False

    def abandon(self) -> None:
        """The client is gone: stop at the next chunk or step (the loop frees the slot); a
        job never submitted gives its slot back here."""
        self.cancel.set()
        with self._lock:
            if self._submitted:
                return
            self._finished = True
        self.release_slot()

    def _submit(self) -> bool:
        with self._lock:
            if self._finished:
                return False
            self._submitted = True
            return True


class BatchLoop:
    """The one thread that runs the engine for the service; see the module docstring.

    ``rows``: sequences decoding together (the service's slots). ``step_hook()`` runs before
    every decode step (the power governor). ``metrics``: ``server.metrics.Metrics`` or None.
    ``prefix_cache``: earlier requests' KV to start from, and where finished ones go.
    """

    def __init__(
        self,
        generator: Generator,
        rows: int,
        prefill_chunk: int = 64,
        step_hook: Callable[[], None] | None = None,
        metrics: Any = None,
        prefix_cache: PrefixCache | None = None,
    ):
        self.generator, self.engine = generator, generator.engine
        self.batch = KVBatch(self.engine, rows)
        self.prefill_chunk, self.step_hook, self.metrics = prefill_chunk, step_hook, metrics
        self.prefix_cache = prefix_cache
        self._wake = threading.Condition()
        self._inbox: deque[Job] = deque()
        self._calls: deque[tuple[Callable[[], Any], list, threading.Event]] = deque()
        self._jobs: list[Job] = []  # holding rows, in arrival order
        self._closed = False
        self.steps = 0  # decode steps run (all rows together count one)
        self.most_rows = 0  # the most rows one decode step ran
        self._thread = threading.Thread(target=self._run, name="batching", daemon=True)
        self._thread.start()

    # --- any thread -----------------------------------------------------------------

    def submit(self, job: Job) -> None:
        if not job._submit():
            return
        with self._wake:
            if self._closed:
                raise RuntimeError("the batching loop is closed")
            self._inbox.append(job)
            self._wake.notify()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the loop's thread between two steps; its result (or error)."""
        if threading.current_thread() is self._thread:
            return fn()
        box: list = []
        done = threading.Event()
        with self._wake:
            if self._closed:
                raise RuntimeError("the batching loop is closed")
            self._calls.append((fn, box, done))
            self._wake.notify()
        done.wait()
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    @property
    def running(self) -> int:
        """Jobs holding a row."""
        return len(self._jobs)

    @property
    def unfinished(self) -> int:
        """Jobs submitted and not yet ended (waiting for a row, or holding one)."""
        with self._wake:
            return len(self._inbox) + len(self._jobs)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(10)

    # --- the loop's thread ----------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._closed or self._inbox or self._calls or self._jobs):
                    self._wake.wait()
                if self._closed:
                    break
            try:
                self._iteration()
            except Exception:  # a bug here must not stop the service's only engine thread
                log.exception("batching loop iteration failed")
                for job in list(self._jobs):
                    self._finish(job, RuntimeError("the batching loop failed; retry"))
        for job in list(self._jobs) + list(self._inbox):
            self._finish(job, RuntimeError("the server is shutting down"))
        for _, box, done in list(self._calls):
            box.append(("error", RuntimeError("the server is shutting down")))
            done.set()

    def _iteration(self) -> None:
        with self._wake:
            admitted = []
            while self._inbox and self.batch.free_rows:
                admitted.append(self._inbox.popleft())
            calls = list(self._calls)
            self._calls.clear()
        for job in admitted:
            self._admit(job)
        for job in [j for j in self._jobs if j.cancel.is_set()]:
            if job.decoding is not None:
                job.decoding.cancel(flush=False)
            else:
                job.result.finish_reason = "cancelled"
            self._finish(job)
        for fn, box, done in calls:
            try:
                box.append(("ok", fn()))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box.append(("error", exc))
            done.set()
        self._prefill()
        self._decode()
        if self.metrics is not None:
            self.metrics.rows_in_use.set(self.batch.in_use)

    def _admit(self, job: Job) -> None:
        """A row for ``job``, holding the longest prefix of its prompt that is cached."""
        prefix = None
        if self.prefix_cache is not None:  # (BOS alone is not worth a lookup hit)
            bos = 1 if self.generator.bos_token_id is not None else 0
            prefix = self.prefix_cache.lookup(job.prompt_ids, min_tokens=bos + 1)
        job.cache, job.started = self.batch.take(prefix), time.perf_counter()
        job.prefilled = job.result.cached_tokens = job.cache.length
        job.result.prompt_tokens = len(job.prompt_ids) - job.prefilled
        self._jobs.append(job)
        if self.metrics is not None:
            self.metrics.queue_wait.observe(job.started - job.arrived)

    def _prefill(self) -> None:
        budget = self.prefill_chunk
        for job in [j for j in self._jobs if j.decoding is None]:
            if budget <= 0:
                break
            chunk = job.prompt_ids[job.prefilled : job.prefilled + budget]
            try:
                logits = self.engine.forward(chunk, job.cache)
            except Exception as exc:  # noqa: BLE001 - the job's error, not the loop's
                self._finish(job, exc)
                continue
            budget -= len(chunk)
            job.prefilled += len(chunk)
            if job.prefilled == len(job.prompt_ids):
                job.speculator = self.generator.new_speculator()
                job.decoding = Decoding(
                    self.generator, job.params, job.result, job.cache.length, job.admitted
                )
                self._choose(job, [job.decoding.sampler(logits, job.cache.tokens)])

    def _decode(self) -> None:
        """One step for every job with a token to run.

        Speculation inside the batch: GroupQueryAttention takes one new-token count per run,
        so every row runs ``width`` = 1 + the longest draft of the step, shorter drafts
        padded (``PAD``; the logits after a row's own proposals are not read and its cache
        is truncated past what it accepts). One run for all rows is the fast choice: decode
        is bound by reading the weights, which one run does once for every row and every
        proposal, where a verify per row would read them once per row and give up the
        batching. Padding costs compute only, and a step runs at most ``prefill_chunk``
        positions in all (the width shrinks with more rows), so it costs no more than a
        prefill chunk. The width also fits the row with the least room in its context.
        """
        jobs = [j for j in self._jobs if j.next_token is not None]
        if not jobs:
            return
        if self.step_hook is not None:
            self.step_hook()
        drafts = [self._propose(job) for job in jobs]
        width = 1 + max(len(draft) for draft, _ in drafts)
        room = min(self.engine.max_length - job.cache.length for job in jobs)
        width = max(1, min(width, room, self.prefill_chunk // len(jobs)))
        drafts = [(d[: width - 1], None if q is None else q[: width - 1]) for d, q in drafts]
        tokens = [[j.next_token, *d] + [PAD] * (width - 1 - len(d)) for j, (d, _) in zip(
            jobs, drafts, strict=True
        )]  # fmt: skip
        try:
            logits = self.batch.forward_many([j.cache for j in jobs], tokens)
        except Exception as exc:  # noqa: BLE001 - every job of the step fails with it
            for job in jobs:
                self._finish(job, exc)
            return
        self.steps += 1
        self.most_rows = max(self.most_rows, len(jobs))
        if self.metrics is not None:
            self.metrics.batch_rows.observe(len(jobs))
        for job, (draft, q), rows in zip(jobs, drafts, logits, strict=True):
            if job.speculator is None:  # width is 1: speculation is off for every row
                self._choose(job, [job.decoding.sampler(rows[0], job.cache.tokens)])
                continue
            chosen, proposed, accepted = job.speculator.settle(
                job.cache, job.next_token, draft, q, rows, job.decoding.sampler
            )
            job.result.proposed_tokens += proposed
            job.result.accepted_tokens += accepted
            if self.metrics is not None and proposed:
                self.metrics.count_speculation(proposed, accepted)
            self._choose(job, chosen)

    def _propose(self, job: Job) -> tuple[list[int], np.ndarray | None]:
        """A row's proposals for this step (none without speculation)."""
        if job.speculator is None:
            return [], None
        limit = job.decoding.draft_limit(job.cache)
        return job.speculator.propose(job.cache, job.next_token, job.decoding.sampler, limit)

    def _choose(self, job: Job, tokens: Sequence[int]) -> None:
        """Hand the step's chosen ``tokens`` to the job's decoding; the last one runs next."""
        decoding, now = job.decoding, time.perf_counter()
        before = len(job.result.token_ids)
        text = ""
        for token in tokens:
            text += decoding.push(token)
            if decoding.done:
                break
        out = len(job.result.token_ids) - before  # (an end token is not a token out)
        if self.metrics is not None:
            if job.last_token_at is None:
                self.metrics.ttft.observe(now - job.admitted)
            elif out:  # a speculative step's tokens share its time
                for _ in range(out):
                    self.metrics.inter_token.observe((now - job.last_token_at) / out)
        job.last_token_at = now
        if text:
            job.emit(text)
        job.next_token = None if decoding.done else int(tokens[-1])
        if decoding.done:
            self._finish(job)

    def _finish(self, job: Job, error: BaseException | None = None) -> None:
        """Free the job's row (its cache first kept for prefix reuse), then its slot; its
        consumer gets the error (if any) and END."""
        if job.cache is not None:
            if job.decoding is not None and job.cache.length > job.decoding.kept:
                job.cache.truncate(job.decoding.kept)  # run past the last token chosen
            if self.prefix_cache is not None and error is None and job.cache.length:
                self.prefix_cache.insert(job.cache)
            self.batch.free(job.cache)
            job.cache = None
        if job in self._jobs:
            self._jobs.remove(job)
        if self.metrics is not None:
            self.metrics.request_time.observe(time.perf_counter() - job.arrived)
        job.release_slot()
        if error is not None:
            job.emit(error)
        job.emit(END)


class LoopEngine:
    """``engine`` as the voice pipeline sees it: every ``forward`` runs on the batching
    loop's thread (``chunk`` tokens per call, so the loop's decode steps go on between
    them) inside ``hold()``, which holds a scheduler slot for it. The rest is the engine's.

    Voice caches are the engine's own (batch 1), not rows of the batch: a voice session
    keeps its cache between turns, longer than a row should be held.
    """

    def __init__(
        self,
        engine: Any,
        loop: BatchLoop,
        hold: Callable[[], contextlib.AbstractContextManager],
        chunk: int = 64,
    ):
        self._engine, self._loop, self._hold, self._chunk = engine, loop, hold, chunk

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def forward(
        self, token_ids: Sequence[int], cache: KVCache, all_logits: bool = False
    ) -> np.ndarray:
        ids = [int(t) for t in token_ids]
        engine = self._engine
        with self._hold():
            if len(ids) <= self._chunk or cache.length + len(ids) > engine.max_length:
                return self._loop.call(lambda: engine.forward(ids, cache, all_logits))
            out = [
                self._loop.call(lambda piece=piece: engine.forward(piece, cache, all_logits))
                for piece in (ids[at : at + self._chunk] for at in range(0, len(ids), self._chunk))
            ]
        return np.concatenate(out) if all_logits else out[-1]
