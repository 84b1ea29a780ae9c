"""Text generation over an engine: prompt formatting, the decode loop, streaming, stops.

``Generator.stream`` yields text pieces as they become final; ``Generator.generate``
returns the whole reply with token ids and timings. A ``step_hook`` is called before
every decode step (the Jetson power governor paces decoding through it); a ``cancel``
event, or a caller that stops reading the stream, ends a generation between two steps
(``finish_reason="cancelled"``).

Context policy: a prompt that does not fit the context raises ``ContextOverflowError``
before anything runs; a reply that fills the context stops with ``finish_reason="length"``.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from moe2edge.runtime.chat_template import ChatTemplate
from moe2edge.runtime.constrained import Constraint, Grammars
from moe2edge.runtime.detokenize import StreamDecoder
from moe2edge.runtime.draft_length import StepCosts
from moe2edge.runtime.engine import KVCache, open_engine
from moe2edge.runtime.errors import BundleError, ContextOverflowError
from moe2edge.runtime.manifest import tokenizer_path
from moe2edge.runtime.sampling import Sampler, SamplingParams
from moe2edge.runtime.speculative import SpeculationConfig, Speculator, check_draft


@dataclass
class GenerationResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0  # tokens prefilled for this reply (not those already cached)
    finish_reason: str = "length"  # "stop", "length" or "cancelled"
    stop_token: int | None = None  # the end token that stopped it (not in token_ids)
    ttft_ms: float = 0.0  # prompt in -> first token chosen
    decode_ms: float = 0.0  # first token -> last token
    proposed_tokens: int = 0  # speculative decoding: tokens drafted for verification
    accepted_tokens: int = 0  # ... and accepted by the target
    cached_tokens: int = 0  # prompt tokens whose KV came from a cache (set by the caller)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else 0.0

    @property
    def decode_tok_s(self) -> float:
        steps = len(self.token_ids) - 1
        return steps / (self.decode_ms / 1000) if steps > 0 and self.decode_ms > 0 else 0.0


class StopMatcher:
    """Holds back text that could still turn into a stop string."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        self.pending += text
        found = [(at, stop) for stop in self.stops if (at := self.pending.find(stop)) >= 0]
        if found:
            at = min(found)[0]
            out, self.pending = self.pending[:at], ""
            return out, True
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Decoding:
    """One reply decoded a token at a time: sampling, end tokens, stop strings, the length
    limits, detokenization and timings. ``Generator.decode`` drives one; the service's
    batching loop (``server/batching.py``) drives one per row, so both end a reply the same.

    ``push(token)`` takes each chosen token (from ``sampler``, or several from a speculative
    step) and returns the text it makes final; ``done`` tells when the reply has ended.
    ``kept`` is what the cache must hold when it ends: every chosen token but the last.
    """

    def __init__(
        self,
        generator: Generator,
        params: SamplingParams,
        result: GenerationResult,
        cache_length: int,
        started: float | None = None,
        speculator: Speculator | None = None,
        constraint: Constraint | None = None,
    ):
        self.params, self.result, self.speculator = params, result, speculator
        self.constraint = constraint  # a grammar every chosen token must follow
        self._consumed = 0  # tokens the constraint took ahead of ``push`` (forced ones)
        self.sampler = Sampler(params)
        self.max_length = generator.engine.max_length
        self.stop_ids = set(params.stop_token_ids) | (
            set() if params.ignore_eos else set(generator.eos_token_ids)
        )
        self.decoder, self.stops = StreamDecoder(generator.tokenizer), StopMatcher(params.stop)
        self.started = started if started is not None else time.perf_counter()
        self.base, self.chosen = cache_length, 0  # cache length at the start, tokens chosen
        self.first_token_at: float | None = None
        self.done = False

    @property
    def kept(self) -> int:
        return self.base + max(self.chosen - 1, 0)

    def draft_limit(self, cache: KVCache) -> int:
        """Proposals a speculative step may still use: they fit the reply and the context."""
        return min(
            self.params.max_new_tokens - len(self.result.token_ids) - 1,
            self.max_length - cache.length - 1,
        )

    def choose(self, logits: np.ndarray, previous: list[int]) -> int:
        """The next token from ``logits`` (masked by the constraint, if any). Greedy: the
        model's own choice is kept when the grammar accepts it, which costs one check instead
        of a whole vocabulary mask (the mask only changes the argmax when it refuses it)."""
        if self.constraint is None:
            return self.sampler(logits, previous)
        if self.sampler.params.greedy:
            top = int(np.argmax(self.sampler.scores(logits, previous)))
            if self.constraint.accepts(top, top in self.stop_ids):
                return top
        return self.sampler(self.constraint.mask(logits), previous)

    def forced(self, cache: KVCache) -> list[int]:
        """Tokens the constraint forces after the last one pushed (taken by it now; the
        caller runs them with that token in one engine run and pushes them next)."""
        if self.constraint is None or self.done:
            return []
        tokens = self.constraint.forced(self.draft_limit(cache))
        for token in tokens:
            self.constraint.consume(token)
        self._consumed += len(tokens)
        return tokens

    def unforce(self, count: int) -> None:
        """Give back the last ``count`` forced tokens (they will be chosen again later)."""
        if count > 0:
            self.constraint.matcher.rollback(count)
            self._consumed -= count

    def admit_draft(
        self, draft: list[int], q: np.ndarray | None
    ) -> tuple[list[int], np.ndarray | None]:
        """Speculative proposals cut at the first one the constraint refuses."""
        if self.constraint is None or not draft:
            return draft, q
        n = self.constraint.valid_prefix(draft)
        return draft[:n], (q[:n] if q is not None and n else None)

    def mask_rows(self, rows: np.ndarray, draft: list[int]) -> np.ndarray:
        """A verify's rows of logits, each masked as its position allows (no constraint: as
        they are)."""
        return rows if self.constraint is None else self.constraint.mask_rows(rows, draft)

    def push(self, token: int) -> str:
        """Take the next chosen token; the text now final (ends the reply when it should)."""
        result = self.result
        self.chosen += 1
        if self.constraint is not None and token not in self.stop_ids:
            if self._consumed:
                self._consumed -= 1
            elif not self.constraint.consume(token):
                result.finish_reason = "stop"
                return self._end("")
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
            result.ttft_ms = (self.first_token_at - self.started) * 1000
        if token in self.stop_ids:
            result.finish_reason, result.stop_token = "stop", token
            return self._end("")
        result.token_ids.append(token)
        piece, stopped = self.stops.push(self.decoder.push(token))
        if stopped:
            result.finish_reason = "stop"
            return self._end(piece, flush=False)
        if (
            len(result.token_ids) >= self.params.max_new_tokens
            or self.base + self.chosen - 1 >= self.max_length
        ):
            result.finish_reason = "length"
            return self._end(piece)
        result.text += piece
        return piece

    def cancel(self, flush: bool = True) -> str:
        """End the reply here (``finish_reason="cancelled"``); the held-back text, if
        ``flush``."""
        if self.done:
            return ""
        self.result.finish_reason = "cancelled"
        return self._end("", flush)

    def _end(self, piece: str, flush: bool = True) -> str:
        self.done = True
        if flush:
            piece += self.stops.push(self.decoder.flush())[0] + self.stops.flush()
        self.result.text += piece
        if self.first_token_at is not None:
            self.result.decode_ms = (time.perf_counter() - self.first_token_at) * 1000
        return piece


class Generator:
    """A bundle's tokenizer, prompt format and engine, ready to generate.

    ``speculation``: speculative decoding (runtime/speculative.py; default off);
    ``draft_engine``: the opened draft bundle when its method is ``draft``.
    """

    def __init__(
        self,
        engine: Any,
        tokenizer: Tokenizer,
        speculation: SpeculationConfig | None = None,
        draft_engine: Any = None,
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.speculation = speculation or SpeculationConfig()
        self.speculation.validate()
        if self.speculation.method == "draft" and draft_engine is None:
            raise BundleError("speculation method 'draft' needs an opened draft engine")
        self.draft_engine = draft_engine
        # what a decode step with k proposals costs here (runtime/draft_length.py)
        c = self.speculation
        self.step_costs = StepCosts(
            c.max_draft_tokens, max(c.initial_draft_tokens, c.min_draft_tokens)
        )
        gen = engine.manifest["generation"]
        self.prompt_template: str = gen.get("prompt_template", "{prompt}")
        self.bos_token_id: int | None = gen.get("bos_token_id") if gen.get("add_bos") else None
        self.eos_token_ids: list[int] = list(gen.get("eos_token_ids", []))  # end of turn first
        self.default_max_new_tokens: int = int(gen.get("max_new_tokens", 64))
        # The tokenizer's Jinja chat template, when the bundle has one that the prompt template
        # cannot reproduce turn by turn (see runtime/session.py ``render_chat``)
        source = gen.get("chat_template")
        self.chat_template: ChatTemplate | None = (
            ChatTemplate(source, gen.get("template_variables")) if source else None
        )

    @classmethod
    def from_bundle(
        cls,
        bundle_dir: str | Path,
        device: str | None = "cpu",
        threads: int = 0,
        verify: bool = True,
        max_length: int | None = None,
        spinning: str | bool | None = "run",
        speculation: SpeculationConfig | None = None,
    ) -> Generator:
        """``device``: cpu, cuda, tensorrt (ORT providers), tensorrt-native, or None (manifest).

        ``speculation`` with method ``draft`` opens its draft bundle on the same device."""
        engine = open_engine(bundle_dir, device, threads, verify, max_length, spinning)
        tokenizer_file = tokenizer_path(bundle_dir, engine.manifest)
        draft = None
        if speculation is not None and speculation.method == "draft":
            speculation.validate()
            draft_dir = Path(speculation.draft_bundle)
            if not (draft_dir / "manifest.json").is_file():
                raise BundleError(f"draft bundle {draft_dir} has no manifest.json")
            draft = open_engine(draft_dir, device, threads, verify, None, spinning)
            check_draft(engine.manifest, draft.manifest, draft_dir)
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises plain Exceptions for a damaged file
            raise BundleError(
                f"{tokenizer_file} is not a tokenizer file ({exc}); re-export the bundle"
            ) from exc
        try:
            return cls(engine, tokenizer, speculation, draft)
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(
                f"{Path(bundle_dir) / 'manifest.json'}: its generation settings are malformed "
                f"({type(exc).__name__}: {exc}); re-export the bundle"
            ) from exc

    def with_speculation(
        self, speculation: SpeculationConfig | None, draft_engine: Any = None
    ) -> Generator:
        """This generator (same engine and tokenizer) with other speculation settings."""
        if draft_engine is not None:
            check_draft(self.engine.manifest, draft_engine.manifest, draft_engine.bundle_dir)
        return Generator(self.engine, self.tokenizer, speculation, draft_engine)

    @functools.cached_property
    def grammars(self) -> Grammars:
        """Grammars compiled against this bundle's tokenizer (constrained decoding)."""
        vocab = int(self.engine.manifest["model"]["vocab_size"])
        return Grammars(self.tokenizer.to_str(), vocab, self.eos_token_ids)

    def new_speculator(self, priced: bool = True) -> Speculator | None:
        """Per-sequence speculation state (None: off). A conversation keeps one across turns,
        so the draft model prefills only what is new. ``priced``: its draft length from this
        generator's measured step times (``decode`` measures them); else the heuristic
        schedule (the batching loop, which prices a verify against its batched step)."""
        if not self.speculation.enabled:
            return None
        return Speculator(
            self.speculation, self.draft_engine, costs=self.step_costs if priced else None
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens, no template)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def with_bos(self, ids: list[int]) -> list[int]:
        """``ids`` with BOS first, unless the bundle has none or ``ids`` start with it (a chat
        template that writes it itself), as training encodes."""
        bos = self.bos_token_id
        return ids if bos is None or ids[:1] == [bos] else [bos] + ids

    def encode_prompt(self, prompt: str, template: bool = True) -> list[int]:
        """One user message in the chat format (``template``), or raw text, with BOS."""
        if template and self.chat_template is not None:
            text = self.chat_template.render([{"role": "user", "content": prompt}], True)
        else:
            text = self.prompt_template.format(prompt=prompt) if template else prompt
        return self.with_bos(self.encode(text))

    def check_fits(self, cache: KVCache, new_tokens: int) -> None:
        room = self.engine.max_length - cache.length
        if new_tokens >= room:
            raise ContextOverflowError(
                f"the prompt needs {new_tokens} tokens but only {room - 1} fit after the "
                f"{cache.length} already in the conversation (context {self.engine.max_length}, "
                "one position is kept for the reply); shorten the prompt or start a new "
                "conversation"
            )

    def stream(
        self,
        prompt_ids: list[int],
        params: SamplingParams | None = None,
        cache: KVCache | None = None,
        result: GenerationResult | None = None,
        step_hook: Callable[[], None] | None = None,
        cancel: threading.Event | None = None,
        speculator: Speculator | None = None,
        constraint: Constraint | None = None,
    ) -> Iterator[str]:
        """Yield reply text pieces. ``cache`` may hold earlier turns (continued in place).
        ``constraint``: a grammar the reply follows (runtime/constrained.py)."""
        cache = cache if cache is not None else self.engine.new_cache()
        if not prompt_ids:
            raise ValueError("an empty prompt has nothing to continue; pass at least one token")
        self.check_fits(cache, len(prompt_ids))
        result = result if result is not None else GenerationResult()
        result.prompt_tokens = len(prompt_ids)
        started = time.perf_counter()
        logits = self.engine.forward(prompt_ids, cache)
        yield from self.decode(
            logits, cache, params, result, step_hook, cancel, started, speculator, constraint
        )

    def decode(
        self,
        logits: np.ndarray,
        cache: KVCache,
        params: SamplingParams | None = None,
        result: GenerationResult | None = None,
        step_hook: Callable[[], None] | None = None,
        cancel: threading.Event | None = None,
        started: float | None = None,
        speculator: Speculator | None = None,
        constraint: Constraint | None = None,
    ) -> Iterator[str]:
        """The decode loop from the logits of the cache's last position.

        Every chosen token but the last one is run into ``cache``; the last (an end token
        included) is in ``result.token_ids`` / ``result.finish_reason`` only. With
        speculation on (``self.speculation``; ``speculator``: a sequence's own state, else a
        fresh one) a step may choose several tokens; the cache ends the same way.
        """
        params = params or SamplingParams(max_new_tokens=self.default_max_new_tokens)
        result = result if result is not None else GenerationResult()
        speculator = speculator if speculator is not None else self.new_speculator()
        decoding = Decoding(self, params, result, cache.length, started, speculator, constraint)
        tokens = [decoding.choose(logits, cache.tokens)]
        try:
            while True:
                for token in tokens:
                    piece = decoding.push(token)
                    if not decoding.done and cancel is not None and cancel.is_set():
                        piece += decoding.cancel()
                    if piece:
                        yield piece
                    if decoding.done:
                        return
                if step_hook is not None:
                    step_hook()
                forced = decoding.forced(cache)
                step_started, draft, q = time.perf_counter(), [], None
                if speculator is not None and not forced:
                    limit = decoding.draft_limit(cache)
                    draft, q = decoding.admit_draft(
                        *speculator.propose(cache, token, decoding.sampler, limit)
                    )
                if not draft:  # forced tokens (one run for all of them) or a plain step
                    logits = self.engine.forward([token, *forced], cache)
                    tokens = [*forced, decoding.choose(logits, cache.tokens)]
                    if speculator is not None and not forced:
                        speculator.settle_plain(tokens[-1], time.perf_counter() - step_started)
                    continue
                rows = self.engine.forward([token, *draft], cache, all_logits=True)
                tokens, proposed, accepted = speculator.settle(
                    cache, token, draft, q, decoding.mask_rows(rows, draft), decoding.sampler
                )
                speculator.observe(time.perf_counter() - step_started)
                result.proposed_tokens += proposed
                result.accepted_tokens += accepted
        except GeneratorExit:  # the caller stopped reading (break, close): a cancelled reply
            decoding.cancel(flush=False)
            raise
        finally:  # a speculative step may have run tokens past the last one chosen
            if cache.length > decoding.kept:
                cache.truncate(decoding.kept)

    def generate(
        self, prompt: str, params: SamplingParams | None = None, template: bool = True, **kwargs
    ) -> GenerationResult:
        result = GenerationResult()
        for _ in self.stream(self.encode_prompt(prompt, template), params, result=result, **kwargs):
            pass
        return result
