"""A conversation over one KV cache: incremental prefill, a shared system prefix, cancel.

A voice reply has ~150 ms after the end of speech, so nearly all of the prompt must already
be in the KV cache by then. ``Conversation`` makes that possible:

* the system prompt's KV is computed once per process and engine (``PrefixStore``) and
  every conversation starts from a copy of it (copies share storage until written);
* ``append`` runs tokens (or text) into the cache as they arrive, any number of times
  before and between replies; ``user_turn(partial_text, final=False)`` keeps the cache in
  step with a partial transcript (it rewinds to the longest common prefix when the
  recogniser revises words and runs only the rest);
* ``reply``/``stream`` generate from what is cached; ``cancel()`` stops a reply between
  two decode steps (barge-in); the reply's tokens stay in the conversation.

Every call reports what it ran and how long it took (``AppendStats``, ``GenerationResult``).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from moe2edge.runtime.engine import KVCache
from moe2edge.runtime.generate import GenerationResult, Generator
from moe2edge.runtime.sampling import SamplingParams


@dataclass
class AppendStats:
    tokens: int  # tokens run into the cache by this call
    ms: float  # wall time of that prefill
    rewound: int = 0  # cached tokens dropped first (a revised partial transcript)
    length: int = 0  # cache length afterwards


class PrefixStore:
    """KV caches of token prefixes (system prompts), computed once, handed out as copies."""

    def __init__(self, max_entries: int = 8):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[int, ...], tuple[KVCache, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, engine, tokens: Sequence[int]) -> tuple[KVCache, np.ndarray]:
        """A private copy of the cache holding ``tokens`` and the logits after them."""
        key = tuple(int(t) for t in tokens)
        if not key:
            raise ValueError("a prefix needs at least one token")
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                cache = engine.new_cache()
                logits = engine.forward(list(key), cache)
                entry = (cache, logits)
                self._entries[key] = entry
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
            else:
                self.hits += 1
                self._entries.move_to_end(key)
            return entry[0].copy(), entry[1].copy()


_STORES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_STORES_LOCK = threading.Lock()


def shared_prefixes(engine) -> PrefixStore:
    """The process-wide prefix store of ``engine``."""
    with _STORES_LOCK:
        store = _STORES.get(engine)
        if store is None:
            store = _STORES[engine] = PrefixStore()
        return store


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class _AnyEvent:
    def __init__(self, *events: threading.Event | None):
        self.events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


class Conversation:
    """One conversation's cache. ``system``: text (or ids) every conversation starts with;
    its KV comes from ``prefixes`` (default: the engine's process-wide store)."""

    def __init__(
        self,
        generator: Generator,
        system: str | Sequence[int] | None = None,
        prefixes: PrefixStore | None = None,
    ):
        self.generator = generator
        self.engine = generator.engine
        bos = [generator.bos_token_id] if generator.bos_token_id is not None else []
        if isinstance(system, str):
            prefix = bos + generator.encode(system)
        else:
            prefix = bos + [int(t) for t in system or []]
        self.prefix_tokens = prefix
        if prefix:
            store = prefixes if prefixes is not None else shared_prefixes(self.engine)
            self.cache, self._logits = store.get(self.engine, prefix)
        else:
            self.cache, self._logits = self.engine.new_cache(), None
        self._pending: list[int] = []  # chosen by the last reply, not yet run
        self._turn_start = len(prefix)
        template = generator.prompt_template
        head, _, tail = template.partition("{prompt}")
        self._head, self._tail = head.format(), tail.format()  # format() undoes {{ }}
        self._cancel = threading.Event()
        self._lock = threading.RLock()
        self.prefill_tokens = 0  # totals over the conversation
        self.prefill_ms = 0.0

    # --- what the conversation holds ---------------------------------------------------

    @property
    def tokens(self) -> list[int]:
        """Every token of the conversation (cached ones and the reply's last, pending)."""
        return self.cache.tokens + self._pending

    @property
    def length(self) -> int:
        return len(self.cache.tokens) + len(self._pending)

    @property
    def room(self) -> int:
        return self.engine.max_length - self.length

    # --- feeding ------------------------------------------------------------------------

    def _ids(self, item: str | Sequence[int]) -> list[int]:
        return self.generator.encode(item) if isinstance(item, str) else [int(t) for t in item]

    def _run(self, ids: list[int]) -> float:
        started = time.perf_counter()
        self.generator.check_fits(self.cache, len(ids))
        self._logits = self.engine.forward(ids, self.cache)
        ms = (time.perf_counter() - started) * 1000
        self.prefill_tokens += len(ids)
        self.prefill_ms += ms
        return ms

    def append(self, item: str | Sequence[int]) -> AppendStats:
        """Run text (encoded without special tokens) or token ids into the cache now."""
        with self._lock:
            ids = self._pending + self._ids(item)
            self._pending = []
            ms = self._run(ids) if ids else 0.0
            return AppendStats(len(ids), ms, 0, self.cache.length)

    def rewind(self, length: int) -> None:
        """Keep only the first ``length`` tokens (not into the shared system prefix)."""
        with self._lock:
            if not len(self.prefix_tokens) <= length <= self.length:
                raise ValueError(
                    f"can rewind to {len(self.prefix_tokens)}..{self.length} tokens, not {length}"
                )
            if length >= self.cache.length:
                self._pending = self._pending[: length - self.cache.length]
                return
            self._pending = []
            self.cache.truncate(length)
            self._logits = None
            self._turn_start = min(self._turn_start, length)

    def sync(self, target: Sequence[int]) -> AppendStats:
        """Make the conversation hold exactly ``target``: keep the common prefix, run the rest."""
        with self._lock:
            target = [int(t) for t in target]
            if common_prefix_len(target, self.prefix_tokens) < len(self.prefix_tokens):
                raise ValueError("sync target must start with the conversation's system prefix")
            keep = common_prefix_len(self.tokens, target)
            dropped = self.length - keep
            self.rewind(keep)
            todo = target[self.length :]
            stats = self.append(todo) if todo else AppendStats(0, 0.0, 0, self.cache.length)
            stats.rewound = dropped
            return stats

    def user_turn(self, text: str, final: bool = True) -> AppendStats:
        """Prefill the user's turn (the bundle's prompt template around ``text``).

        With ``final=False`` (a partial transcript) only the template's head and the text are
        run; call it again as the transcript grows or changes, then with ``final=True``.
        """
        with self._lock:
            rendered = self._head + text + (self._tail if final else "")
            base = self.tokens[: self._turn_start]
            return self.sync(base + self.generator.encode(rendered))

    # --- generating ---------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop the reply in progress after its current step (thread-safe)."""
        self._cancel.set()

    def stream(
        self,
        params: SamplingParams | None = None,
        result: GenerationResult | None = None,
        cancel: threading.Event | None = None,
        step_hook: Callable[[], None] | None = None,
    ) -> Iterator[str]:
        """Generate from what the conversation holds; yields text pieces."""
        with self._lock:
            self._cancel.clear()
            result = result if result is not None else GenerationResult()
            started = time.perf_counter()
            todo = self._pending
            if not todo and self._logits is None:
                if not self.cache.length:
                    raise ValueError("the conversation is empty: append a prompt before a reply")
                todo = [self.cache.tokens[-1]]  # logits were dropped by a rewind: rerun one
                self.cache.truncate(self.cache.length - 1)
            self._pending = []
            if todo:
                self._run(todo)
            result.prompt_tokens = len(todo)
            before = self.cache.length
            yield from self.generator.decode(
                self._logits,
                self.cache,
                params,
                result,
                step_hook,
                _AnyEvent(self._cancel, cancel),
                started,
            )
            chosen = result.token_ids + (
                [result.stop_token] if result.stop_token is not None else []
            )
            self._pending = chosen[self.cache.length - before :]
            self._logits = None if self._pending else self._logits
            self._turn_start = self.length

    def reply(
        self,
        params: SamplingParams | None = None,
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        step_hook: Callable[[], None] | None = None,
    ) -> GenerationResult:
        """``stream`` to the end; ``on_text`` gets each piece as it is final."""
        result = GenerationResult()
        for piece in self.stream(params, result, cancel, step_hook):
            if on_text is not None:
                on_text(piece)
        return result

    def say(self, user_text: str, params: SamplingParams | None = None) -> GenerationResult:
        """One whole turn: the user's text through the prompt template, then the reply."""
        self.user_turn(user_text, final=True)
        return self.reply(params)
