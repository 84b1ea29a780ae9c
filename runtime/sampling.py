"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty.

The semantics follow Hugging Face ``generate``: the repetition penalty (CTRL) divides positive
and multiplies negative logits of every token already in the context (prompt included),
then temperature, top-k and top-p filter, then one draw from a seeded generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output)
    stop_token_ids: list[int] = field(default_factory=list)  # added to the model's end tokens
    ignore_eos: bool = False  # keep going past end tokens (benchmarks: a fixed length)

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def apply_repetition_penalty(
    logits: np.ndarray, previous: Sequence[int], penalty: float
) -> np.ndarray:
    """A penalised copy of ``logits`` (HF/CTRL: positive / penalty, negative * penalty)."""
    out = np.array(logits, dtype=np.float64)
    if penalty != 1.0 and len(previous):
        seen = np.unique(np.asarray(previous, dtype=np.int64))
        seen = seen[(seen >= 0) & (seen < out.size)]
        chosen = out[seen]
        with np.errstate(over="ignore", under="ignore"):  # +-inf: filtered_probs clips it
            out[seen] = np.where(chosen > 0, chosen / penalty, chosen * penalty)
    return out


def filtered_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Probabilities after temperature, top-k and top-p (the smallest set reaching top_p)."""
    # Shifted before scaling and clipped (a repetition penalty near 0 makes logits infinite):
    # finite at any temperature, down to the smallest float (5e-324 is close to greedy).
    scaled = np.clip(np.asarray(logits, dtype=np.float64), -1e300, 1e300)
    with np.errstate(over="ignore"):
        scaled = (scaled - scaled.max()) / temperature
    if top_k and top_k < scaled.size:
        kth = np.partition(scaled, -top_k)[-top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled)
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        cut = min(int(np.searchsorted(cumulative, top_p)) + 1, order.size)
        kept = np.zeros_like(probs)
        kept[order[:cut]] = probs[order[:cut]]
        probs = kept / kept.sum()
    return probs


class Sampler:
    """Stateful only in its RNG, so a seed reproduces a whole generation.

    ``__call__`` is one decoding step; ``scores``, ``probs`` and ``draw`` are its parts, for
    speculative decoding (runtime/speculative.py), which scores several positions at once.
    """

    def __init__(self, params: SamplingParams):
        params.validate()
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, previous: Sequence[int]) -> int:
        logits = self.scores(logits, previous)
        if self.params.greedy:
            return int(np.argmax(logits))  # no copy: the hot path of greedy decoding
        return self.draw(self.probs(logits))

    def scores(self, logits: np.ndarray, previous: Sequence[int]) -> np.ndarray:
        """``logits`` after the repetition penalty over ``previous`` (the same array without one)."""
        penalty = self.params.repetition_penalty
        return logits if penalty == 1.0 else apply_repetition_penalty(logits, previous, penalty)

    def probs(self, scores: np.ndarray) -> np.ndarray:
        """The distribution a sampled step draws from, given ``scores`` (``scores()``)."""
        p = self.params
        return filtered_probs(scores, p.temperature, p.top_k, p.top_p)

    def draw(self, probs: np.ndarray) -> int:
        return int(self.rng.choice(probs.size, p=probs))
