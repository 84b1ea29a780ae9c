"""Continuous batching: one worker thread runs every generation of the service.

Each HTTP generation is a ``Job`` handed to the ``BatchLoop``. The loop's thread, the only
one that runs the engine, repeats one iteration at a time:

1. jobs that arrived take a free row of its ``KVBatch`` (``runtime/batch.py``);
2. cancelled jobs (client gone) leave: row and slot are given back;
3. engine calls of other users (voice, through ``LoopEngine``) run, one chunk each;
4. prompts are prefilled, at most ``prefill_chunk`` tokens in all (oldest job first), so a
   long prompt costs the others one chunk per step, not its whole prefill;
5. one decode step runs every job whose prompt is in: one batched engine run, then each
   job's next token (``Reply``: sampling, stop tokens and strings, detokenization, the
   same as ``Generator.decode``).

A job joins at the next iteration and leaves at the one after it ends. The rows are the
service's slots (``config.slots``): the scheduler admits a request only with a slot, and
the loop gives the slot back when the job's row is free, never earlier, so a slot bounds
real work. A cancel is seen at the next chunk or step.
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
from moe2edge.runtime.detokenize import StreamDecoder
from moe2edge.runtime.generate import GenerationResult, Generator, _StopMatcher
from moe2edge.runtime.kv_cache import KVCache
from moe2edge.runtime.sampling import Sampler, SamplingParams

log = logging.getLogger(__name__)
END = object()  # what a job emits last


class Reply:
    """One reply decoded a step at a time: ``Generator.decode``'s loop, turned inside out so
    that many replies share one engine step. Feed it the logits of its last position."""

    def __init__(self, generator: Generator, params: SamplingParams, result: GenerationResult):
        self.params, self.result = params, result
        self.max_length = generator.engine.max_length
        self.sampler = Sampler(params)
        self.stop_ids = set(params.stop_token_ids) | (
            set() if params.ignore_eos else set(generator.eos_token_ids)
        )
        self.decoder, self.stops = StreamDecoder(generator.tokenizer), _StopMatcher(params.stop)
        self.first_token_at: float | None = None
        self.done = False

    def push(self, logits: np.ndarray, cache: KVCache, started: float) -> tuple[str, int | None]:
        """Choose the next token: (text now final, token to run next or None at the end)."""
        result = self.result
        token = self.sampler(logits, cache.tokens)
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
            result.ttft_ms = (now - started) * 1000
        if token in self.stop_ids:
            result.finish_reason, result.stop_token = "stop", token
            return self._end(""), None
        result.token_ids.append(token)
        piece, stopped = self.stops.push(self.decoder.push(token))
        if stopped:
            result.finish_reason = "stop"
            return self._end(piece, flush=False), None
        if len(result.token_ids) >= self.params.max_new_tokens or cache.length >= self.max_length:
            result.finish_reason = "length"
            return self._end(piece), None
        result.text += piece
        return piece, token

    def cancel(self) -> None:
        if not self.done:
            self.result.finish_reason = "cancelled"
            self._end("", flush=False)

    def _end(self, piece: str, flush: bool = True) -> str:
        self.done = True
        if flush:
            piece += self.stops.push(self.decoder.flush())[0] + self.stops.flush()
        self.result.text += piece
        if self.first_token_at is not None:
            self.result.decode_ms = (time.perf_counter() - self.first_token_at) * 1000
        return piece


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
        self.prefilled = 0
        self.reply: Reply | None = None
        self.next_token: int | None = None
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
    """

    def __init__(
        self,
        generator: Generator,
        rows: int,
        prefill_chunk: int = 64,
        step_hook: Callable[[], None] | None = None,
        metrics: Any = None,
    ):
        self.generator, self.engine = generator, generator.engine
        self.batch = KVBatch(self.engine, rows)
        self.prefill_chunk, self.step_hook, self.metrics = prefill_chunk, step_hook, metrics
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
            while self._inbox and self.batch.free_rows:
                job = self._inbox.popleft()
                job.cache, job.started = self.batch.take(), time.perf_counter()
                self._jobs.append(job)
                if self.metrics is not None:
                    self.metrics.queue_wait.observe(job.started - job.arrived)
            calls = list(self._calls)
            self._calls.clear()
        for job in [j for j in self._jobs if j.cancel.is_set()]:
            if job.reply is not None:
                job.reply.cancel()
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

    def _prefill(self) -> None:
        budget = self.prefill_chunk
        for job in [j for j in self._jobs if j.reply is None]:
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
                job.reply = Reply(self.generator, job.params, job.result)
                self._choose(job, logits)

    def _decode(self) -> None:
        jobs = [j for j in self._jobs if j.next_token is not None]
        if not jobs:
            return
        if self.step_hook is not None:
            self.step_hook()
        try:
            logits = self.batch.forward([j.cache for j in jobs], [j.next_token for j in jobs])
        except Exception as exc:  # noqa: BLE001 - every job of the step fails with it
            for job in jobs:
                self._finish(job, exc)
            return
        self.steps += 1
        self.most_rows = max(self.most_rows, len(jobs))
        if self.metrics is not None:
            self.metrics.batch_rows.observe(len(jobs))
        for job, row in zip(jobs, logits, strict=True):
            self._choose(job, row)

    def _choose(self, job: Job, logits: np.ndarray) -> None:
        chosen = len(job.result.token_ids)
        piece, job.next_token = job.reply.push(logits, job.cache, job.admitted)
        now = time.perf_counter()
        if self.metrics is not None:
            if job.last_token_at is None:
                self.metrics.ttft.observe(now - job.admitted)
            elif len(job.result.token_ids) > chosen:  # (an end token is not a token out)
                self.metrics.inter_token.observe(now - job.last_token_at)
        job.last_token_at = now
        if piece:
            job.emit(piece)
        if job.next_token is None:
            self._finish(job)

    def _finish(self, job: Job, error: BaseException | None = None) -> None:
        """Free the job's row, then its slot; its consumer gets the error (if any) and END."""
        if job.cache is not None:
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
