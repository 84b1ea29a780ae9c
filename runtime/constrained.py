"""Constrained decoding: a grammar masks the logits so that every reply parses.

Built on llguidance (the library onnxruntime-genai and vLLM use for structured outputs):
it takes the bundle's ``tokenizer.json`` directly (no transformers), compiles a JSON schema,
a regex or a Lark grammar (``%json {...}`` embeds a schema in a grammar) lazily against the
vocabulary, and computes a token mask in tens of microseconds. It also tells which tokens
the grammar forces (``compute_ff_tokens``): those are fed to the engine as one multi-token
run instead of one decode step each.

``Grammars`` (one per generator: the tokenizer, its vocabulary size, the end tokens) makes a
``Constraint`` per reply; ``Decoding`` (runtime/generate.py) drives it: ``mask`` before each
sampling, ``consume`` for each chosen token, ``forced`` for fast-forwarding, ``valid_prefix``
and ``mask_rows`` for speculative decoding (a draft token the grammar refuses ends the
proposal; each verified row is masked with the state after the draft tokens before it).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class GrammarError(ValueError):
    """A grammar or schema llguidance refuses; the message says what is wrong."""


def _llguidance():
    try:
        import llguidance
    except ImportError as exc:  # the runtime extra has it
        raise GrammarError(
            "constrained decoding needs llguidance: pip install 'moe2edge[runtime]'"
        ) from exc
    return llguidance


def json_schema_grammar(schema: dict[str, Any] | None) -> str:
    """The grammar of JSON text matching ``schema`` (None: any JSON object), compact (no
    free whitespace: a small model must not loop on blanks)."""
    ll = _llguidance()
    return ll.LLMatcher.grammar_from_json_schema(
        schema if schema is not None else {"type": "object"},
        overrides={"whitespace_flexible": False},
    )


def lark_grammar(lark: str) -> str:
    return _llguidance().LLMatcher.grammar_from_lark(lark)


def regex_grammar(regex: str) -> str:
    return _llguidance().LLMatcher.grammar_from_regex(regex)


def lark_literal(text: str) -> str:
    """``text`` as a Lark string literal."""
    return json.dumps(text)


def lark_json(schema: dict[str, Any]) -> str:
    """A JSON schema embedded in a Lark grammar (llguidance's ``%json`` extension)."""
    return "%json " + json.dumps(schema, separators=(",", ":"))


class Grammars:
    """Compiles grammars against one tokenizer; keeps recently used matchers to copy."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int]):
        ll = _llguidance()
        eos = list(eos_token_ids) or None
        self.tokenizer = ll.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos)
        self.vocab_size = vocab_size
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, grammar: str) -> None:
        """Raise ``GrammarError`` naming the problem if ``grammar`` does not compile."""
        failed, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(
            grammar, self.tokenizer
        )
        if failed:
            raise GrammarError(messages[0].strip())

    def constraint(self, grammar: str) -> Constraint:
        """A fresh reply's state for ``grammar`` (compiled once, then copied)."""
        ll = _llguidance()
        with self._lock:
            proto = self._cache.get(grammar)
            if proto is not None:
                self._cache.move_to_end(grammar)
        if proto is None:
            self.check(grammar)
            proto = ll.LLMatcher(self.tokenizer, grammar, log_level=0)
            if proto.is_error():
                raise GrammarError(proto.get_error())
            with self._lock:
                self._cache[grammar] = proto
                while len(self._cache) > 64:
                    self._cache.popitem(last=False)
        return Constraint(proto.deep_copy(), self.vocab_size)


class Constraint:
    """One reply's grammar state (an ``LLMatcher``)."""

    def __init__(self, matcher: Any, vocab_size: int):
        from llguidance.numpy import allocate_token_bitmask

        self.matcher, self.vocab_size = matcher, vocab_size
        self._bits = allocate_token_bitmask(1, vocab_size)
        self.mask_calls = 0

    @property
    def failed(self) -> str:
        """The matcher's error ('' when fine): a token it refused, a resource limit."""
        return self.matcher.get_error() if self.matcher.is_error() else ""

    def allowed(self) -> np.ndarray:
        """Which tokens the grammar admits next (bool [vocab])."""
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, self._bits)
        self.mask_calls += 1
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")
        return bits[: self.vocab_size].astype(bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` with the tokens the grammar refuses at -inf (a copy)."""
        allowed = self.allowed()
        n = min(allowed.size, logits.shape[-1])
        out = np.full(logits.shape, -np.inf, dtype=logits.dtype)
        out[:n] = np.where(allowed[:n], logits[:n], -np.inf)
        return out

    def consume(self, token: int) -> bool:
        ok = self.matcher.consume_token(int(token))
        if not ok:
            log.warning("grammar refused token %d: %s", token, self.matcher.get_error())
        return ok

    def forced(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens the grammar forces next (empty when it leaves a choice)."""
        if limit <= 0 or self.matcher.is_stopped():
            return []
        return [int(t) for t in self.matcher.compute_ff_tokens()[:limit]]

    def accepts(self, token: int, is_stop: bool = False) -> bool:
        """Whether the grammar admits ``token`` next (state unchanged). An end token is
        admitted only where the grammar may end (``validate_tokens`` says 0 for it)."""
        if is_stop:
            return bool(self.matcher.is_accepting())
        return self.valid_prefix([token]) == 1

    def valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many leading ``tokens`` the grammar accepts from here (state unchanged)."""
        return int(self.matcher.validate_tokens([int(t) for t in tokens])) if tokens else 0

    def mask_rows(self, rows: np.ndarray, draft: Sequence[int]) -> np.ndarray:
        """A speculative verify's ``rows`` (row i follows ``draft[:i]``) masked by the state
        after ``draft[:i]``; ``draft`` must be a valid prefix. The state is unchanged."""
        out = np.array(rows, copy=True)
        for i in range(len(draft) + 1):
            out[i] = self.mask(rows[i])
            if i < len(draft):
                self.matcher.consume_token(int(draft[i]))
        if draft:
            self.matcher.rollback(len(draft))
        return out
