"""When a user's turn is over: the endpointing policy of the voice pipeline.

``fixed``: the turn ends after ``end_silence_ms`` of silence (OpenAI's ``server_vad``
waits 500 ms, Pipecat 800 ms). ``predictive``: the silence the turn needs depends on what
was said so far. Each signal is a probability that the turn is over:

- the grammar (``is_complete``): 1 when the transcript so far is a whole sentence of the
  recognizer's JSGF grammar (its FSG reaches a final state), 0 when it is a prefix; and
  (``can_continue``) whether the grammar lets it go on: a whole sentence after which the
  grammar allows no word ("... and close the window", "close it") is *closed* and waits
  only ``closed_silence_ms``, since nothing the user could still say would be recognized;
- optionally the student (``scorer``): its probability of the chat template's
  end-of-user-turn tokens after the transcript (``StudentTurnEndScorer``).

Their weighted mean ``p`` sets the silence to wait, between ``complete_silence_ms`` (p = 1:
a whole command, 112 ms, counted from the drop in energy: runtime/voice/vad.py) and ``incomplete_silence_ms`` (p = 0: "turn
on the ...", 800 ms):
``wait = incomplete - p * (incomplete - complete)``. With no signal at all (no grammar, no
scorer) the fixed ``end_silence_ms`` applies. The VAD keeps ``incomplete_silence_ms`` as its
own end-of-speech silence, a backstop; the pipeline asks ``should_end`` after every VAD
window of silence and ends the turn itself when it says so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from moe2edge.runtime.session import common_prefix_len

log = logging.getLogger(__name__)

ENDPOINTING = ("fixed", "predictive")


class TurnEndScorer(Protocol):
    """P(the user's turn is over | the transcript so far), or None when it cannot tell."""

    def __call__(self, transcript: str) -> float | None: ...


@dataclass(frozen=True)
class EndpointJudgement:
    """What the policy made of one transcript: the silence it needs and why."""

    wait_ms: float
    complete: bool | None = None  # the grammar's verdict (None: no grammar)
    turn_end_p: float | None = None  # the scorer's probability (None: no scorer)
    p: float | None = None  # the combined probability (None: fixed policy)
    closed: bool = False  # a whole sentence the grammar allows nothing after


class EndpointPolicy:
    """Decides, after each window of silence, whether the turn is over (module docstring)."""

    def __init__(
        self,
        mode: str = "predictive",
        end_silence_ms: float = 300.0,
        complete_silence_ms: float = 112.0,
        incomplete_silence_ms: float = 800.0,
        is_complete: Callable[[str], bool | None] | None = None,
        closed_silence_ms: float | None = None,
        can_continue: Callable[[str], bool | None] | None = None,
        scorer: TurnEndScorer | None = None,
        scorer_weight: float = 0.5,
    ) -> None:
        if mode not in ENDPOINTING:
            raise ValueError(f"unknown endpointing {mode!r}: use one of {', '.join(ENDPOINTING)}")
        if not 0 < complete_silence_ms <= incomplete_silence_ms:
            raise ValueError(
                f"complete_silence_ms ({complete_silence_ms}) must be > 0 and <= "
                f"incomplete_silence_ms ({incomplete_silence_ms})"
            )
        if closed_silence_ms is not None and not 0 < closed_silence_ms <= complete_silence_ms:
            raise ValueError(
                f"closed_silence_ms ({closed_silence_ms}) must be > 0 and <= "
                f"complete_silence_ms ({complete_silence_ms})"
            )
        if not 0.0 <= scorer_weight <= 1.0:
            raise ValueError(f"scorer_weight must be in [0, 1], got {scorer_weight}")
        self.mode = mode
        self.end_silence_ms = end_silence_ms
        self.complete_silence_ms = complete_silence_ms
        self.incomplete_silence_ms = incomplete_silence_ms
        self.is_complete = is_complete
        self.closed_silence_ms = closed_silence_ms
        self.can_continue = can_continue if closed_silence_ms is not None else None
        self.scorer = scorer
        self.scorer_weight = scorer_weight
        self._cache: dict[str, EndpointJudgement] = {}

    @property
    def min_wait_ms(self) -> float:
        """No transcript ends a turn after less silence than this."""
        if self.mode == "fixed" or not self._has_signal:
            return self.end_silence_ms
        if self.can_continue is not None:
            return self.closed_silence_ms
        return self.complete_silence_ms

    @property
    def max_wait_ms(self) -> float:
        """The longest silence any transcript waits for (the VAD's backstop)."""
        if self.mode == "fixed" or not self._has_signal:
            return self.end_silence_ms
        return self.incomplete_silence_ms

    @property
    def _has_signal(self) -> bool:
        return self.is_complete is not None or self.scorer is not None

    def judge(self, transcript: str) -> EndpointJudgement:
        """The silence ``transcript`` needs (computed once per distinct transcript)."""
        if self.mode == "fixed":
            return EndpointJudgement(self.end_silence_ms)
        transcript = " ".join(transcript.split())
        cached = self._cache.get(transcript)
        if cached is not None:
            return cached
        complete = self.is_complete(transcript) if self.is_complete and transcript else None
        turn_end_p = None
        if self.scorer is not None and transcript:
            try:
                turn_end_p = self.scorer(transcript)
            except Exception:  # a scorer that fails leaves the decision to the grammar
                log.debug("turn-end scorer failed on %r", transcript, exc_info=True)
        signals = []
        if complete is not None:
            signals.append((1.0 - self.scorer_weight if turn_end_p is not None else 1.0, complete))
        if turn_end_p is not None:
            signals.append((self.scorer_weight if complete is not None else 1.0, turn_end_p))
        closed = (
            bool(complete)
            and self.can_continue is not None
            and (self.can_continue(transcript) is False)
        )
        if not signals:
            judgement = EndpointJudgement(self.end_silence_ms, complete, turn_end_p)
        elif closed:  # nothing more the user says can be recognized: the grammar decides
            judgement = EndpointJudgement(self.closed_silence_ms, complete, turn_end_p, 1.0, True)
        else:
            p = sum(w * float(v) for w, v in signals) / sum(w for w, _ in signals)
            span = self.incomplete_silence_ms - self.complete_silence_ms
            judgement = EndpointJudgement(
                self.incomplete_silence_ms - p * span, complete, turn_end_p, p
            )
        if len(self._cache) > 256:
            self._cache.clear()
        self._cache[transcript] = judgement
        return judgement

    def should_end(self, silence_ms: float, transcript: str) -> bool:
        """Is ``silence_ms`` of silence after ``transcript`` the end of the turn?"""
        if silence_ms < self.min_wait_ms:
            return False
        return silence_ms >= self.judge(transcript).wait_ms


class StudentTurnEndScorer:
    """The student's probability that the user's turn is over after ``transcript``.

    The chat template closes a user turn with fixed tokens (``<|im_end|>`` in ChatML, the
    demo's `` <|assistant|>``): their probability after the transcript, read from the
    logits of a fork of the session's conversation (its KV cache already holds most of the
    transcript, so a few positions are run). ``prompt``: the session's
    ``VoiceConversation``; ``max_tokens``: how many of the closing tokens are multiplied
    (the first ones carry the decision; the rest are near-certain once those are chosen).
    """

    def __init__(self, prompt, max_tokens: int = 2) -> None:
        self.prompt = prompt
        self.engine = prompt.generator.engine
        self.max_tokens = max_tokens

    def __call__(self, transcript: str) -> float | None:
        partial = self.prompt.prompt(transcript, final=False)
        final = self.prompt.prompt(transcript, final=True)
        n = common_prefix_len(partial, final)
        closing = final[n : n + self.max_tokens]
        if n < 1 or not closing or len(final) >= self.engine.max_length:
            return None
        conversation = self.prompt.fork()
        conversation.sync(final[: n - 1])
        logits = self.engine.forward(final[n - 1 : n - 1 + len(closing)], conversation.cache, True)
        logits = np.asarray(logits, dtype=np.float64).reshape(len(closing), -1)
        log_p = 0.0
        for row, token in zip(logits, closing, strict=True):
            top = row.max()
            log_p += row[token] - top - math.log(np.exp(row - top).sum())
        return math.exp(log_p)
