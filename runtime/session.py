"""A conversation over one KV cache: incremental prefill, a shared system prefix, the chat
format, forks, cancel. The voice pipeline and the HTTP API both run on it.

A voice reply has ~150 ms after the end of speech, so nearly all of the prompt must already
be in the KV cache by then. ``Conversation`` makes that possible:

* the system prompt's KV is computed once per process and engine (``PrefixStore``) and
  every conversation starts from a copy of it (copies share storage until written);
* ``append`` runs tokens (or text) into the cache as they arrive, any number of times
  before and between replies; ``user_turn(partial_text, final=False)`` keeps the cache in
  step with a partial transcript (it rewinds to the longest common prefix when the
  recogniser revises words and runs only the rest); ``sync(ids)`` does the same for any
  token list, e.g. a whole chat rendered by ``render_chat``;
* ``fork`` gives a copy to draft a reply in (storage shared until one of them writes);
* ``reply``/``stream`` generate from what is cached; ``cancel()`` stops a reply between
  two decode steps (barge-in); the reply's tokens stay in the conversation, however the
  reply ends (a caller that stops reading the stream included).

Every call reports what it ran and how long it took (``AppendStats``, ``GenerationResult``).
"""

from __future__ import annotations

import copy
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from moe2edge.runtime.constrained import Constraint
from moe2edge.runtime.engine import KVCache
from moe2edge.runtime.generate import GenerationResult, Generator
from moe2edge.runtime.plain_text import encode_plain, has_control
from moe2edge.runtime.sampling import SamplingParams
from moe2edge.runtime.speculative import common_prefix_len


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


# --- the chat format -------------------------------------------------------------------
#
# A bundle whose chat template is turn by turn (the demo's) carries it rendered for one user
# turn (``prompt_template``, e.g. ``<user> {prompt} <assistant>``); an assistant turn is
# `` reply`` and the end-of-turn token, as that template renders it. Every message is encoded
# on its own, so a conversation's tokens only grow as turns are added. Any other template
# (ChatML, Llama-3, DeepSeek-V3, ...) is in the bundle as Jinja (``Generator.chat_template``):
# the whole conversation is rendered and tokenised at once, exactly as training encodes it
# (moe2edge.distill.data.encode_chat); ``Conversation.sync`` reuses the cached prefix.

SYSTEM_ROLES = ("system", "developer")
_MARK = "\x00MOE2EDGE\x00"


def _head_ids(generator: Generator, head: str, text: str) -> list[int]:
    """``head + text`` encoded; with no text yet, the head tokens every text starts with (the
    whitespace before the first word may merge into the first word)."""
    if text:
        return generator.encode(head + text)
    probes = [generator.encode(head + word) for word in ("the", "turn", "what", "I", "a", "x")]
    return probes[0][: min(common_prefix_len(probes[0], p) for p in probes[1:])]


def user_tokens(generator: Generator, text: str, final: bool = True) -> list[int]:
    """A user turn in the prompt template (no BOS).

    ``final=False`` (a turn still being spoken): the template's head and ``text`` only; with
    no text yet, the head tokens every text starts with (``_head_ids``).
    """
    template = generator.prompt_template
    if has_control(generator.tokenizer, text):  # the template's tokens, the text as plain text
        head, _, tail = template.partition("{prompt}")
        ids = generator.encode(head.format()) + encode_plain(generator.tokenizer, text)
        return ids + (generator.encode(tail.format()) if final else [])
    if final:
        return generator.encode(template.format(prompt=text))
    if "{prompt}" not in template:
        return []  # nothing of the turn is known before it is complete
    return _head_ids(generator, template.partition("{prompt}")[0].format(), text)  # {{ }} undone


def assistant_tokens(generator: Generator, text: str) -> list[int]:
    """An assistant turn: `` text`` and the end-of-turn token."""
    return encode_plain(generator.tokenizer, f" {text}") + generator.eos_token_ids[:1]


def _chat_messages(messages: list[tuple[str, str]]) -> list[dict[str, str]]:
    chat = []
    for role, text in messages:
        if role not in ("user", "assistant", *SYSTEM_ROLES):
            raise ValueError(
                f"unknown chat role {role!r}; use user, assistant, {' or '.join(SYSTEM_ROLES)}"
            )
        chat.append({"role": "system" if role in SYSTEM_ROLES else role, "content": text})
    return chat


def _template_ids(
    generator: Generator, messages: list[tuple[str, str]], partial: bool
) -> list[int]:
    """The conversation rendered by the bundle's Jinja chat template and tokenised at once;
    the generation prompt follows unless the last message is the assistant's."""
    chat, template = _chat_messages(messages), generator.chat_template
    if not chat:
        return generator.with_bos([])
    if any(has_control(generator.tokenizer, m["content"]) for m in chat):
        return generator.with_bos(_marked_ids(generator, chat, partial))
    if partial:
        marked = chat[:-1] + [{"role": "user", "content": _MARK}]
        head = template.render(marked, True).partition(_MARK)[0]
        return generator.with_bos(_head_ids(generator, head, chat[-1]["content"]))
    text = template.render(chat, chat[-1]["role"] != "assistant")
    return generator.with_bos(generator.encode(text))


def _marked_ids(generator: Generator, chat: list[dict[str, str]], partial: bool) -> list[int]:
    """The conversation with the template's own text (its control tokens) encoded as usual
    and every message's content as plain text (``encode_plain``): for contents that hold a
    control token's string, which must not open or close a turn. ``partial``: up to and
    including the last message's text so far."""
    marks = [f"\x00MOE2EDGE{i}\x00" for i in range(len(chat))]
    marked = [{**m, "content": mark} for m, mark in zip(chat, marks, strict=True)]
    text = generator.chat_template.render(marked, partial or chat[-1]["role"] != "assistant")
    if partial:
        text = text.partition(marks[-1])[0] + marks[-1]
    content = dict(zip(marks, (m["content"] for m in chat), strict=True))
    ids: list[int] = []
    for piece in re.split("(" + "|".join(map(re.escape, marks)) + ")", text):
        if piece in content:
            ids += encode_plain(generator.tokenizer, content[piece])
        elif piece:
            ids += generator.encode(piece)
    return ids


def render_chat(
    generator: Generator, messages: Iterable[tuple[str, str]], partial: bool = False
) -> list[int]:
    """``(role, text)`` messages as the token ids of one conversation: BOS, then each turn.

    With the bundle's Jinja chat template (``Generator.chat_template``), the template decides
    (system turns included); otherwise system (and developer) texts lead the first user turn,
    one per line, when a user turn comes first (the prompt template has no system role).
    ``partial``: the last message is a user turn still being spoken (its text so far).
    """
    messages = list(messages)
    if generator.chat_template is not None:
        return _template_ids(generator, messages, partial)
    system = "\n".join(text for role, text in messages if role in SYSTEM_ROLES)
    ids = generator.with_bos([])
    turns = [(i, role, text) for i, (role, text) in enumerate(messages) if role not in SYSTEM_ROLES]
    for n, (i, role, text) in enumerate(turns):
        if role == "user":
            if system and n == 0:
                text = f"{system}\n{text}"
            ids += user_tokens(generator, text, final=not (partial and i == len(messages) - 1))
        elif role == "assistant":
            ids += assistant_tokens(generator, text)
        else:
            raise ValueError(
                f"unknown chat role {role!r}; use user, assistant, {' or '.join(SYSTEM_ROLES)}"
            )
    return ids


class _AnyEvent:
    def __init__(self, *events: threading.Event | None):
        self.events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


class Conversation:
    """One conversation's cache. ``system``: text (or ids) every conversation starts with;
    its KV comes from ``prefixes`` (default: the engine's process-wide store).

    Use a conversation from one thread at a time (a call waits while another thread's reply
    is streaming); ``cancel`` may come from any thread.
    """

    def __init__(
        self,
        generator: Generator,
        system: str | Sequence[int] | None = None,
        prefixes: PrefixStore | None = None,
        cache: KVCache | None = None,
    ):
        """``cache``: start from this cache (it must begin with the system prefix; e.g. an
        earlier request's, from ``runtime.prefix_cache.PrefixCache``) instead of the store's."""
        self.generator = generator
        self.engine = generator.engine
        bos = [generator.bos_token_id] if generator.bos_token_id is not None else []
        if isinstance(system, str):
            prefix = bos + generator.encode(system)
        else:
            prefix = bos + [int(t) for t in system or []]
        self.prefix_tokens = prefix
        if cache is not None:
            if common_prefix_len(cache.tokens, prefix) < len(prefix):
                raise ValueError("the cache given does not start with the conversation's prefix")
            self.cache, self._logits = cache, None
        elif prefix:
            store = prefixes if prefixes is not None else shared_prefixes(self.engine)
            self.cache, self._logits = store.get(self.engine, prefix)
        else:
            self.cache, self._logits = self.engine.new_cache(), None
        self._pending: list[int] = []  # chosen by the last reply, not yet run
        self._turn_start = len(prefix)
        self._open_stream: weakref.ref | None = None  # a reply a caller has not finished
        self._cancel = threading.Event()
        self._lock = threading.RLock()
        self._speculator = generator.new_speculator()  # kept across turns (a draft's cache)
        self.prefill_tokens = 0  # totals over the conversation
        self.prefill_ms = 0.0

    def fork(self) -> Conversation:
        """An independent copy, e.g. to draft a reply in: it shares the cache's storage until
        one of the two writes where the other has positions (copy on write)."""
        with self._lock:
            self._end_open_stream()
            clone = copy.copy(self)
            clone.cache = self.cache.copy()
            clone._logits = None if self._logits is None else self._logits.copy()
            clone._pending = list(self._pending)
            clone._speculator = self._speculator and self._speculator.copy()
            clone._cancel, clone._lock = threading.Event(), threading.RLock()
            return clone

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

    def _end_open_stream(self) -> None:
        """Close a reply stream its caller left suspended, so its bookkeeping runs first."""
        ref, self._open_stream = self._open_stream, None
        stream = ref() if ref is not None else None
        if stream is not None:
            stream.close()

    def append(self, item: str | Sequence[int]) -> AppendStats:
        """Run text (encoded without special tokens) or token ids into the cache now."""
        with self._lock:
            self._end_open_stream()
            ids = self._pending + self._ids(item)
            ms = self._run(ids) if ids else 0.0
            self._pending = []
            return AppendStats(len(ids), ms, 0, self.cache.length)

    def rewind(self, length: int) -> None:
        """Keep only the first ``length`` tokens (not into the shared system prefix)."""
        with self._lock:
            self._end_open_stream()
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
            self._end_open_stream()
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
            self._end_open_stream()
            base = self.tokens[: self._turn_start]
            return self.sync(base + user_tokens(self.generator, text, final))

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
        constraint: Constraint | None = None,
    ) -> Iterator[str]:
        """Generate from what the conversation holds; yields text pieces (``constraint``: a
        grammar the reply follows, runtime/constrained.py).

        However the reply ends (done, cancelled, an error, or the caller no longer reading:
        ``break``, ``close()``, a new call on the conversation), the conversation then holds
        the prompt and exactly the reply tokens chosen so far (``result.token_ids``, and the
        end token that stopped it); the last one is run with whatever comes next.
        """
        with self._lock:
            self._end_open_stream()
            stream = self._generate(params, result, cancel, step_hook, constraint)
            self._open_stream = weakref.ref(stream)  # weak: a dropped stream closes at once
            return stream

    def _generate(
        self,
        params: SamplingParams | None,
        result: GenerationResult | None,
        cancel: threading.Event | None,
        step_hook: Callable[[], None] | None,
        constraint: Constraint | None = None,
    ) -> Iterator[str]:
        # The lock guards the setup and the bookkeeping, not the decode steps in between: a
        # stream may be resumed from another thread (Starlette iterates a streaming response
        # in a thread pool) and an RLock held across a yield could only be released by the
        # thread that took it. Steps run by one reader at a time; cancel() is thread-safe.
        with self._lock:
            self._cancel.clear()
            result = result if result is not None else GenerationResult()
            started = time.perf_counter()
            if not self._pending and self._logits is None:
                if not self.cache.length:
                    raise ValueError("the conversation is empty: append a prompt before a reply")
                self._pending = [self.cache.tokens[-1]]  # logits dropped by a rewind: rerun it
                self.cache.truncate(self.cache.length - 1)
            todo = self._pending
            if todo:
                self._run(todo)
                self._pending = []
            result.prompt_tokens = len(todo)
            before, chosen_before = self.cache.length, len(result.token_ids)
        try:
            yield from self.generator.decode(
                self._logits,
                self.cache,
                params,
                result,
                step_hook,
                _AnyEvent(self._cancel, cancel),
                started,
                self._speculator,
                constraint,
            )
        finally:  # every chosen token but the last one is in the cache
            with self._lock:
                chosen = result.token_ids[chosen_before:]
                if result.stop_token is not None:
                    chosen = chosen + [result.stop_token]
                self._pending = chosen[self.cache.length - before :]
                self._logits = None  # the cache's logits are the decode loop's, not kept
                self._turn_start = self.length
                self._open_stream = None  # (a newer stream is only opened after this one ends)

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
