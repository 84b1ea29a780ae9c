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
   drives). With speculative decoding on (the generator's ``speculation``), the rows whose
   proposals pay for a run of their own (``_decode``) propose up to k tokens (prompt lookup
   or the draft model) and verify them; the others decode one token in the batched run.

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
from moe2edge.runtime.constrained import Constraint
from moe2edge.runtime.generate import Decoding, GenerationResult, Generator
from moe2edge.runtime.kv_cache import KVCache
from moe2edge.runtime.prefix_cache import PrefixCache
from moe2edge.runtime.sampling import SamplingParams
from moe2edge.runtime.server.heap import release_free_heap
from moe2edge.runtime.speculative import Speculator

log = logging.getLogger(__name__)
# after this long with nothing to run, freed heap goes back to the OS (heap.py)
IDLE_TRIM_S = 1.0
END = object()  # what a job emits last
EXPECTATION_WEIGHT = 0.3  # of the latest verify in a row's running mean of accepted tokens


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
        constraint: Constraint | None = None,
    ):
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.constraint = constraint  # a grammar the reply follows (runtime/constrained.py)
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
        self.expected_accepted = 0.0  # proposals a verify of this job accepts (running mean)
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
        self.verified = 0  # speculative verify runs (one row's proposals each)
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
        worked = False  # since the last trim
        while True:
            trim = False
            with self._wake:
                while not (self._closed or self._inbox or self._calls or self._jobs):
                    if not worked:
                        self._wake.wait()
                    elif not self._wake.wait(IDLE_TRIM_S):  # idle a while after work
                        trim = True
                        break
                if self._closed:
                    break
            if trim:  # outside the lock: submitting work does not wait for it
                release_free_heap(idle=True)
                worked = False
                continue
            worked = True
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
            with self._alone(job):
                logits = self.engine.forward(chunk, job.cache)
                budget -= len(chunk)
                job.prefilled += len(chunk)
                if job.prefilled == len(job.prompt_ids):
                    self._start_decoding(job, logits)

    def _start_decoding(self, job: Job, logits: np.ndarray) -> None:
        job.speculator = self.generator.new_speculator(priced=False)
        if job.speculator is not None:  # a prior: half of a first draft accepted
            job.expected_accepted = job.speculator.draft_length / 2
        job.decoding = Decoding(
            self.generator,
            job.params,
            job.result,
            job.cache.length,
            job.admitted,
            constraint=job.constraint,
        )
        self._choose(job, [job.decoding.choose(logits, job.cache.tokens)])

    @contextlib.contextmanager
    def _alone(self, job: Job):
        """One job's own work (its sampler, grammar, speculator, detokenizer, engine run):
        an error there ends that job with the error, not the step of every row."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - the job's error, not the loop's
            log.warning("a generation failed: %r", exc, exc_info=log.isEnabledFor(logging.DEBUG))
            if job.cache is not None or job in self._jobs:
                self._finish(job, exc)

    def _decode(self) -> None:
        """One step for every job with a token to run: one batched run of one token per
        row, and a verify run of its own for each row that speculates this step.

        A row's verify runs alone: GroupQueryAttention runs several new tokens of a row only
        at batch 1 (``runtime/batch.py``). Decode is bound by reading the weights, so a run
        costs about the same for one token or a few, for one row or all: the batched step
        gives every row one token per run, a row's verify gives it 1 + the proposals it
        accepts. ``_speculating`` picks the rows whose verify pays for its run (by each
        row's recent acceptance): every row alone, none at a full batch of poor guesses.
        """
        jobs = [j for j in self._jobs if j.next_token is not None]
        if not jobs:
            return
        if self.step_hook is not None:
            self.step_hook()
        # tokens a grammar forces: a run of their row alone (as a verify) when that pays,
        # else the first one is the row's next token of the batched run
        forced: dict[int, list[int]] = {}
        for job in jobs:
            with self._alone(job):
                if f := job.decoding.forced(job.cache):
                    forced[id(job)] = f
        jobs = [j for j in jobs if j in self._jobs]  # (one whose grammar failed is gone)
        picked = self._speculating(jobs, forced)
        fast = [(j, forced[id(j)]) for j in picked if id(j) in forced]
        alone = {id(job) for job, _ in fast}
        verifies = []
        for job in [j for j in picked if id(j) not in alone]:
            with self._alone(job):
                limit = job.decoding.draft_limit(job.cache)
                draft, q = job.decoding.admit_draft(
                    *job.speculator.propose(job.cache, job.next_token, job.decoding.sampler, limit)
                )
                if draft:
                    verifies.append((job, draft, q))
        alone |= {id(job) for job, _, _ in verifies}
        batched = [j for j in jobs if id(j) not in alone and j in self._jobs]
        try:
            logits = self.batch.forward([j.cache for j in batched], [j.next_token for j in batched])
        except Exception as exc:  # noqa: BLE001 - every job of the run fails with it
            for job in batched:
                self._finish(job, exc)
            batched, logits = [], []
        self.steps += 1
        self.most_rows = max(self.most_rows, len(jobs))
        if self.metrics is not None:
            self.metrics.batch_rows.observe(len(jobs))
        for job, row in zip(batched, logits, strict=True):
            with self._alone(job):
                tokens = forced.get(id(job))
                if tokens:  # forced: no choice to make; the rest is forced again next step
                    job.decoding.unforce(len(tokens) - 1)
                    self._choose(job, tokens[:1])
                else:
                    self._choose(job, [job.decoding.choose(row, job.cache.tokens)])
        for job, tokens in fast:
            with self._alone(job):
                row = self.engine.forward([job.next_token, *tokens], job.cache)
                self._choose(job, [*tokens, job.decoding.choose(row, job.cache.tokens)])
        for job, draft, q in verifies:
            with self._alone(job):
                self._verify(job, draft, q)

    def _verify(self, job: Job, draft: list[int], q: Any) -> None:
        """Run ``job``'s proposals in one run of its own and keep what the target accepts."""
        token = job.next_token
        rows = self.engine.forward([token, *draft], job.cache, all_logits=True)
        rows = job.decoding.mask_rows(rows, draft)
        chosen, proposed, accepted = job.speculator.settle(
            job.cache, token, draft, q, rows, job.decoding.sampler
        )
        job.result.proposed_tokens += proposed
        job.result.accepted_tokens += accepted
        job.expected_accepted += EXPECTATION_WEIGHT * (accepted - job.expected_accepted)
        self.verified += 1
        if self.metrics is not None:
            self.metrics.count_speculation(proposed, accepted)
        self._choose(job, chosen)

    @staticmethod
    def _speculating(jobs: list[Job], forced: dict[int, list[int]] | None = None) -> list[Job]:
        """The rows that run alone this step (a verify, or forced tokens): the set that
        gives the most tokens per engine run, taking each row's recent accepted count per
        verify as what its next verify gains, and a row's forced tokens as what its run
        gains. With s rows alone out of n: n tokens plus their gains, over s runs and one
        batched run for the others (none when s == n)."""
        forced = forced or {}

        def gain(j: Job) -> float:  # forced tokens are certain gains
            return len(forced[id(j)]) if id(j) in forced else j.expected_accepted

        candidates = sorted(
            (
                j
                for j in jobs
                if id(j) in forced
                or (j.speculator is not None and j.decoding.draft_limit(j.cache) > 0)
            ),
            key=lambda j: -gain(j),
        )
        n, best, best_rate, gained = len(jobs), 0, 1.0 * len(jobs), 0.0
        for s, job in enumerate(candidates, start=1):
            gained += gain(job)
            rate = (n + gained) / (s + (s < n))
            if rate > best_rate:
                best, best_rate = s, rate
        return candidates[:best]

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
