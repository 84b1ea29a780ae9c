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

The draft length adapts per sequence. Alone (``Generator.decode``) each step takes the length,
0 (a plain step) included, with the most expected tokens per second from the step times
measured on this machine and the sequence's recent acceptance (runtime/draft_length.py). In
the service's batching loop, whose ``_speculating`` already prices a verify against the
batched step, it follows transformers' "heuristic" schedule: +2 after a fully accepted draft,
-1 after a rejection, within [min_draft_tokens, max_draft_tokens].

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

from moe2edge.runtime.draft_length import Acceptance, StepCosts, choose_draft_length, could_pay
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
    if k < 1 or len(tokens) < 2:
        return []
    ids = np.asarray(tokens, dtype=np.int64)
    # earlier positions holding the last token, then how far back each match goes: one
    # comparison per candidate and length (a window view of the whole context cost ~10x)
    ends = np.flatnonzero(ids[:-1] == ids[-1])
    if ends.size == 0:
        return []
    length = np.ones(ends.size, dtype=np.int64)
    matching = np.ones(ends.size, dtype=bool)
    for back in range(1, min(ngram_max, len(ids) - 1)):
        before = ends - back
        matching &= before >= 0
        matching[matching] = ids[before[matching]] == ids[-1 - back]
        length += matching
    best = min(int(length.max()), ngram_max)
    if best < ngram_min:
        return []
    start = int(ends[np.flatnonzero(length >= best)[-1]]) + 1
    return ids[start : start + k].tolist()


class NgramProposer:
    """Prompt lookup over the sequence so far; no state."""

    free = True  # proposing costs no model run

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

    free = False

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
    """One sequence's speculation: its proposer (a draft model's cache), its draft length.

    ``costs``: the generator's measured step times; with them the length is chosen per step
    by expected tokens per second (``choose_draft_length``, 0 allowed), and the caller
    reports each step's wall time (``observe``); None: the heuristic schedule.
    """

    def __init__(
        self,
        config: SpeculationConfig,
        draft_engine: Any = None,
        proposer: Any = None,
        costs: StepCosts | None = None,
    ):
        self.config, self.costs = config, costs
        if proposer is None:
            proposer = (
                DraftProposer(draft_engine) if config.method == "draft" else NgramProposer(config)
            )
        self.proposer = proposer
        self.draft_length = min(
            max(config.initial_draft_tokens, config.min_draft_tokens), config.max_draft_tokens
        )
        self.acceptance = Acceptance()
        self._ran = 0  # proposals the last settled step ran
        self._planned_at = -1.0  # the acceptance the last draft length was planned with
        self._probed = False  # whether the last step probed the acceptance

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
        c = self.config
        if self.costs is None:
            k = min(self.draft_length, limit)
        else:
            may_explore, rate = self.costs.tick(), self.acceptance.rate
            if self.draft_length == 0 and rate == self._planned_at and not may_explore:
                k = 0  # nothing has changed since a plain step was planned (a cheap step)
            else:
                k = choose_draft_length(
                    self.costs, self.acceptance, limit, c.min_draft_tokens, c.max_draft_tokens
                )
            if self._probed:
                self.acceptance.after_probe(k)
            self._planned_at, self._probed = rate, False
            low, high = c.min_draft_tokens, c.max_draft_tokens
            if (
                k == 0
                and limit >= 1
                and self.acceptance.probe_due()
                and could_pay(self.costs, limit, low, high)
            ):
                self._probed = True
                if self.proposer.free:  # a proposal checked against the token chosen
                    shadow, _ = self.proposer.propose(cache.tokens + [token], 1, sampler)
                    self.acceptance.shadow = shadow[0] if shadow else None
                else:
                    k = min(c.min_draft_tokens, limit)
            self.draft_length = k
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
        if draft:
            self.acceptance.update(len(draft), n)
        else:
            self.acceptance.check_shadow(following)
        if self.costs is None:
            self.draft_length = next_draft_length(
                self.draft_length, len(draft), n, c.min_draft_tokens, c.max_draft_tokens
            )
        self._ran = len(draft)
        return [*draft[:n], following], len(draft), n

    def observe(self, seconds: float) -> None:
        """The wall time of the step just settled (proposing, the target's run, verifying)."""
        if self.costs is not None:
            self.costs.observe(self._ran, seconds)

    def settle_plain(self, chosen: int, seconds: float) -> None:
        """After a step without proposals that the caller ran as plain decoding (the fast
        path: no verify): ``chosen`` its token, ``seconds`` its wall time."""
        self.acceptance.check_shadow(chosen)
        if self.costs is None:
            return
        self.costs.observe(0, seconds)
        self._ran = 0

    def copy(self) -> Speculator:
        clone = Speculator(self.config, proposer=self.proposer.copy(), costs=self.costs)
        clone.draft_length = self.draft_length
        clone.acceptance.accepted = self.acceptance.accepted
        clone.acceptance.trials = self.acceptance.trials
        clone.acceptance.probe_every = self.acceptance.probe_every
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
