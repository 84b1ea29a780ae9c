"""Speculative decoding: propose a few tokens cheaply, verify them in one run of the target.

Two proposers:

* a **draft bundle**: a small model sharing the target's tokenizer and vocabulary (the
  manifest's ``draft`` object, ``moe2edge distill draft`` + ``export onnx --draft-for``),
  run greedily (greedy decoding) or sampled with the request's settings, on its own KV cache;
* **prompt lookup** (n-gram): the tokens that followed the most recent earlier occurrence of
  the last 3, 2 or 1 tokens of the prompt and reply so far (transformers'
  ``prompt_lookup_num_tokens``, vLLM's ngram proposer); no model, so nothing to prefill.

The target then runs the pending token and the k proposals at once
(``engine.forward(ids, cache, all_logits=True)``: k + 1 rows of logits) and keeps the
accepted prefix plus one token of its own (the correction, or a bonus after a fully accepted
draft); the cache is truncated past the accepted tokens. Acceptance:

* greedy: a proposal is accepted while it equals the target's argmax, so the output is
  token for token that of plain greedy decoding;
* sampled: rejection sampling (Leviathan et al. 2023, Chen et al. 2023): accept proposal x
  with probability min(1, p(x) / q(x)); on rejection draw from norm(max(0, p - q)); after a
  full acceptance draw the bonus from p. For prompt lookup q is a point mass on x. Each
  token is distributed as under plain sampling with the same settings (p and q are the
  filtered distributions: repetition penalty, temperature, top-k, top-p).

The draft length adapts per sequence: +2 after a fully accepted draft, -1 after a rejection,
within [min_draft_tokens, max_draft_tokens] (transformers' "heuristic" schedule).

The propose / verify / accept steps are plain functions over token ids and logits arrays
(``propose_ngram``, ``greedy_choices``, ``target_probs``, ``accept_greedy``,
``accept_sampled``, ``verify``, ``next_draft_length``) so that a batched decode loop can call
them per row; ``Speculator`` is the single-sequence driver ``Generator.decode`` uses.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from moe2edge.runtime.errors import BundleError
from moe2edge.runtime.sampling import Sampler

log = logging.getLogger(__name__)

METHODS = ("off", "ngram", "draft")


@dataclass
class SpeculationConfig:
    """``method``: off, ngram (prompt lookup) or draft (``draft_bundle``, a bundle directory)."""

    method: str = "off"
    draft_bundle: str | Path | None = None
    max_draft_tokens: int = 8
    min_draft_tokens: int = 1
    initial_draft_tokens: int = 4
    ngram_max: int = 3  # longest suffix looked up (then shorter ones, down to ngram_min)
    ngram_min: int = 1

    def validate(self) -> None:
        if self.method not in METHODS:
            raise BundleError(f"speculation method must be one of {METHODS}, not {self.method!r}")
        if self.method == "draft" and not self.draft_bundle:
            raise BundleError(
                "speculative decoding with a draft needs the draft bundle's directory "
                "(draft_bundle=DIR, or serve --draft DIR); or use method ngram"
            )
        if not 1 <= self.min_draft_tokens <= self.max_draft_tokens:
            raise BundleError("need 1 <= min_draft_tokens <= max_draft_tokens")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise BundleError("need 1 <= ngram_min <= ngram_max")

    @property
    def enabled(self) -> bool:
        return self.method != "off"


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64)
    return int(differ.argmax()) if differ.any() else n


# --- proposing ------------------------------------------------------------------------------


def propose_ngram(
    tokens: Sequence[int], k: int, ngram_max: int = 3, ngram_min: int = 1
) -> list[int]:
    """Up to ``k`` tokens that followed the most recent earlier occurrence of the longest
    suffix of ``tokens`` (``ngram_max`` down to ``ngram_min`` long) that occurred before."""
    if k < 1:
        return []
    ids = np.asarray(tokens, dtype=np.int64)
    for n in range(min(ngram_max, len(ids) - 1), ngram_min - 1, -1):
        # windows that start early enough for at least one token to follow them
        windows = sliding_window_view(ids[:-1], n)
        hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return ids[start : start + k].tolist()
    return []


class NgramProposer:
    """Prompt lookup over the sequence so far; no state."""

    def __init__(self, config: SpeculationConfig):
        self.ngram_max, self.ngram_min = config.ngram_max, config.ngram_min

    def propose(
        self, context: list[int], k: int, sampler: Sampler
    ) -> tuple[list[int], np.ndarray | None]:
        return propose_ngram(context, k, self.ngram_max, self.ngram_min), None  # q: point masses

    def copy(self) -> NgramProposer:
        return self


class DraftProposer:
    """A draft model on its own KV cache, kept in step with the sequence by common prefix."""

    def __init__(self, engine: Any, cache: Any = None):
        self.engine = engine
        self.cache = cache if cache is not None else engine.new_cache()

    def propose(
        self, context: list[int], k: int, sampler: Sampler
    ) -> tuple[list[int], np.ndarray | None]:
        """``k`` tokens after ``context`` and, when sampling, the distributions (q) they were
        drawn from ([k, vocab])."""
        k = min(k, self.engine.max_length - len(context) + 1)  # the draft's own context
        if k < 1:
            return [], None
        keep = min(common_prefix_len(self.cache.tokens, context), len(context) - 1)
        if keep < self.cache.length:
            self.cache.truncate(keep)
        logits = self.engine.forward(context[keep:], self.cache)
        tokens: list[int] = []
        probs: list[np.ndarray] = []
        previous = list(context)
        for i in range(k):
            scores = sampler.scores(logits, previous)
            if sampler.params.greedy:
                token = int(np.argmax(scores))
            else:
                probs.append(sampler.probs(scores))
                token = sampler.draw(probs[-1])
            tokens.append(token)
            previous.append(token)
            if i + 1 < k:
                logits = self.engine.forward([token], self.cache)
        return tokens, np.stack(probs) if probs else None

    def copy(self) -> DraftProposer:
        return DraftProposer(self.engine, self.cache.copy())


# --- verifying ------------------------------------------------------------------------------


def greedy_choices(
    sampler: Sampler, rows: np.ndarray, context: Sequence[int], draft: Sequence[int]
) -> list[int]:
    """The target's greedy token at each of the ``len(draft) + 1`` rows (row i follows
    ``context + draft[:i]``; the repetition penalty sees that context)."""
    if sampler.params.repetition_penalty == 1.0:
        return np.argmax(rows, axis=1).tolist()
    prefix = list(context)
    out = []
    for i, row in enumerate(rows):
        out.append(int(np.argmax(sampler.scores(row, prefix + list(draft[:i])))))
    return out


def target_probs(
    sampler: Sampler, rows: np.ndarray, context: Sequence[int], draft: Sequence[int]
) -> np.ndarray:
    """The target's sampling distribution (p) at each row, as plain sampling would draw from."""
    prefix = list(context)
    return np.stack(
        [sampler.probs(sampler.scores(row, prefix + list(draft[:i]))) for i, row in enumerate(rows)]
    )


def accept_greedy(draft: Sequence[int], choices: Sequence[int]) -> int:
    """How many leading proposals equal the target's greedy choices."""
    n = 0
    while n < len(draft) and draft[n] == choices[n]:
        n += 1
    return n


def accept_sampled(
    draft: Sequence[int],
    p: np.ndarray,
    q: np.ndarray | None,
    rng: np.random.Generator,
) -> tuple[int, int]:
    """Rejection sampling of ``draft`` against the target's ``p`` ([k + 1, vocab]).

    ``q`` ([k, vocab]): the distributions the proposals were drawn from; None: point masses
    (prompt lookup). Returns (accepted count n, the token after them).
    """
    for i, token in enumerate(draft):
        q_token = 1.0 if q is None else float(q[i, token])
        if rng.random() * q_token < p[i, token]:  # u < p/q: accepted with min(1, p/q)
            continue
        residual = p[i].copy()
        if q is None:
            residual[token] = 0.0
        else:
            residual = np.maximum(residual - q[i], 0.0)
        total = residual.sum()
        residual = residual / total if total > 0 else p[i]  # total > 0 unless rounding
        return i, int(rng.choice(residual.size, p=residual))
    return len(draft), int(rng.choice(p.shape[1], p=p[len(draft)]))


def verify(
    sampler: Sampler,
    rows: np.ndarray,
    context: Sequence[int],
    draft: Sequence[int],
    q: np.ndarray | None,
) -> tuple[int, int]:
    """(accepted count, next token) for ``draft`` given the target's ``rows`` of logits."""
    if sampler.params.greedy:
        choices = greedy_choices(sampler, rows, context, draft)
        n = accept_greedy(draft, choices)
        return n, choices[n]
    return accept_sampled(draft, target_probs(sampler, rows, context, draft), q, sampler.rng)


def next_draft_length(k: int, proposed: int, accepted: int, low: int, high: int) -> int:
    """Grow by 2 after a fully accepted draft, shrink by 1 after a rejection, in [low, high]."""
    if proposed == 0:
        return k
    return min(high, k + 2) if accepted == proposed else max(low, k - 1)


# --- the single-sequence driver -------------------------------------------------------------


class Speculator:
    """One sequence's speculation: its proposer (a draft model's cache), its draft length."""

    def __init__(self, config: SpeculationConfig, draft_engine: Any = None, proposer: Any = None):
        self.config = config
        if proposer is None:
            proposer = (
                DraftProposer(draft_engine) if config.method == "draft" else NgramProposer(config)
            )
        self.proposer = proposer
        self.draft_length = min(
            max(config.initial_draft_tokens, config.min_draft_tokens), config.max_draft_tokens
        )

    def step(
        self, engine: Any, cache: Any, token: int, sampler: Sampler, limit: int
    ) -> tuple[list[int], int, int]:
        """Run ``token`` (chosen, not yet in ``cache``) and up to ``limit`` proposals after it.

        Returns (the tokens chosen: accepted proposals and one more, proposed, accepted).
        ``cache`` then holds ``token`` and the accepted proposals.
        """
        draft, q = self.propose(cache, token, sampler, limit)
        rows = engine.forward([token, *draft], cache, all_logits=True)
        return self.settle(cache, token, draft, q, rows, sampler)

    def propose(
        self, cache: Any, token: int, sampler: Sampler, limit: int
    ) -> tuple[list[int], np.ndarray | None]:
        """Up to ``min(draft length, limit)`` proposals after ``cache``'s tokens and ``token``,
        and the distributions they were drawn from (None: point masses)."""
        k = min(self.draft_length, limit)
        if k <= 0:
            return [], None
        return self.proposer.propose(cache.tokens + [token], k, sampler)

    def settle(
        self,
        cache: Any,
        token: int,
        draft: Sequence[int],
        q: np.ndarray | None,
        rows: np.ndarray,
        sampler: Sampler,
    ) -> tuple[list[int], int, int]:
        """After the target ran ``token`` and ``draft`` (and maybe padding after them) into
        ``cache`` with ``rows`` of logits: verify, truncate the cache past the accepted
        proposals, adapt the draft length. Returns (tokens chosen, proposed, accepted)."""
        ran = len(rows)  # token, the proposals and any padding
        before = cache.length - ran
        context = cache.tokens[:before] + [token]
        n, following = verify(sampler, rows[: len(draft) + 1], context, draft, q)
        cache.truncate(before + 1 + n)
        c = self.config
        self.draft_length = next_draft_length(
            self.draft_length, len(draft), n, c.min_draft_tokens, c.max_draft_tokens
        )
        return [*draft[:n], following], len(draft), n

    def copy(self) -> Speculator:
        clone = Speculator(self.config, proposer=self.proposer.copy())
        clone.draft_length = self.draft_length
        return clone


def check_draft(target_manifest: dict, draft_manifest: dict, draft_dir: str | Path) -> None:
    """A draft must share the target's vocabulary and tokenizer; a draft made for another
    target still works (only the acceptance suffers), so that is a warning."""
    vocab, theirs = draft_manifest["model"]["vocab_size"], target_manifest["model"]["vocab_size"]
    if vocab != theirs:
        raise BundleError(
            f"draft bundle {draft_dir} has a vocabulary of {vocab} tokens, the target {theirs}: "
            "a draft must share the target's vocabulary (export it with --draft-for TARGET)"
        )

    def tokenizer_sha(manifest: dict) -> str | None:
        name = manifest["io"].get("tokenizer_file", "tokenizer.json")
        return manifest["files"].get(name, {}).get("sha256")

    if tokenizer_sha(draft_manifest) != tokenizer_sha(target_manifest):
        raise BundleError(
            f"draft bundle {draft_dir} has another tokenizer.json than the target: a draft must "
            "use the target's tokenizer"
        )
    named = draft_manifest.get("draft", {}).get("target")
    if named is None:
        log.warning("%s has no 'draft' object: not made as a draft, used as one anyway", draft_dir)
        return
    source = target_manifest.get("source", {}).get("student_dir")
    shas = {f.get("sha256") for f in target_manifest["files"].values()}
    if named.get("model_sha256") not in shas and named.get("student_dir") != source:
        log.warning(
            "draft %s was made for %s, not for this target; acceptance may be low",
            draft_dir,
            named.get("name") or named.get("student_dir"),
        )
