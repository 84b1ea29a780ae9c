"""How many tokens a speculative step proposes, from what a step costs on this machine.

Proposals pay only when verifying them costs less than the tokens they save. On a 2-core
CPU a verify of k + 1 tokens cost 1.1x a plain step for a 100M FP32 model but 2-3x at INT4
(MatMulNBits' int8 kernels are compute-bound past one row), and 4x for the tiny demo
student, whose plain step (0.1 ms) is mostly binding overhead: one fixed schedule cannot be
right for all three. So each step takes the k (0 = a plain step, else ``low`` .. ``high``)
with the most expected tokens per second:

    E(k) / cost(k),  E(k) = 1 + a + a^2 + ... + a^k

where ``a`` is the sequence's recent per-token acceptance (``Acceptance``) and ``cost(k)``
the measured wall time of a whole decode step with k proposals (proposing, the target's
run, verifying), the median of its latest few (``StepCosts``; shared by the sequences of
one generator, since it is a property of the model and the machine). Costs not measured yet
are interpolated from the measured ones; a fresh table tries the initial length, 0 and
``high`` first, and every ``EXPLORE_EVERY`` steps one k is measured again in turn, so a cost measured
under a passing load does not stick.

While k is 0 the acceptance is still sampled every ``PROBE_EVERY`` plain steps, so a sequence
that starts repeating itself is noticed: prompt lookup proposes one token for free and checks
it against the token chosen (``Acceptance.shadow``); a draft model is probed with k = ``low``
(which costs its catch-up prefill and a verify). Each probe after which the plan stays at 0
doubles the interval, up to ``PROBE_MAX``; a plan with proposals resets it. No probe runs
where proposals would not pay even at an acceptance of ``CEILING`` (``could_pay``: the demo
student, whose verify costs 4x its plain step).
"""

from __future__ import annotations

from collections import deque

KEEP = 5  # step times kept per k (the median of these is its cost)
EXPLORE_EVERY = 64  # steps between two measurements of a k chosen in turn (each one a
# verify, which costs 4x a plain step on the demo student: 1 in 64 keeps that to ~5%)
PROBE_EVERY = 8  # plain steps between two probes of the acceptance, at first
PROBE_MAX = 64  # ... doubled after each probe that leaves the plan at 0, up to this
DECAY = 0.8  # weight of the past in the acceptance counts, per update
CEILING = 0.9  # the acceptance a probe hopes for: no probe where even this would not pay


class StepCosts:
    """Seconds a decode step with k proposals takes, per k in 0 .. ``high``."""

    def __init__(self, high: int, initial: int):
        self.high, self.initial = high, min(initial, high)
        self.samples: list[deque[float]] = [deque(maxlen=KEEP) for _ in range(high + 1)]
        self.steps = 0
        self._explored = 0

    def observe(self, k: int, seconds: float) -> None:
        if 0 <= k <= self.high and seconds > 0:
            self.samples[k].append(seconds)

    def measured(self) -> dict[int, float]:
        """k -> median seconds, for the ks measured so far."""
        out = {}
        for k, times in enumerate(self.samples):
            if times:
                ordered = sorted(times)
                out[k] = ordered[len(ordered) // 2]
        return out

    def estimate(self, k: int, known: dict[int, float]) -> float:
        """``known[k]``, else linear between the nearest measured ks around it, else the
        line through the two nearest on its side (never below the nearest measured)."""
        if k in known:
            return known[k]
        below = [j for j in known if j < k]
        above = [j for j in known if j > k]
        if below and above:
            lo, hi = max(below), min(above)
            return known[lo] + (known[hi] - known[lo]) * (k - lo) / (hi - lo)
        side = sorted(below or above, key=lambda j: abs(j - k))[:2]
        if len(side) == 1:
            return known[side[0]]
        (j1, c1), (j2, c2) = ((j, known[j]) for j in side)
        return max(c1 + (c1 - c2) / (j1 - j2) * (k - j1), min(c1, c2))

    def explore(self, candidates: list[int]) -> int | None:
        """The k to measure this step instead of the best one, if any: the first of
        ``initial``, 0, ``high`` not measured yet, then one candidate in turn every
        ``EXPLORE_EVERY`` steps (counted by ``tick``)."""
        for k in (self.initial, 0, candidates[-1]):
            if k in candidates and not self.samples[k]:
                return k
        if self.steps % EXPLORE_EVERY == 0:
            self._explored += 1
            return candidates[self._explored % len(candidates)]
        return None

    def tick(self) -> bool:
        """Count a step; whether it is one that may explore (so a plan cannot be reused)."""
        self.steps += 1
        fresh = (self.initial, 0, self.high)
        return self.steps % EXPLORE_EVERY == 0 or not all(self.samples[k] for k in fresh)


class Acceptance:
    """A sequence's recent per-token acceptance: accepted proposals over accepted ones plus
    rejections (the geometric model's estimate), with older verifies decayed."""

    def __init__(self, prior: float = 0.5):
        self.accepted, self.trials = prior, 1.0
        self.plain_steps = 0  # since the acceptance was last sampled
        self.probe_every = PROBE_EVERY
        self.shadow: int | None = None  # a free proposal to check a plain step's token against

    @property
    def rate(self) -> float:
        return self.accepted / self.trials

    def update(self, proposed: int, accepted: int) -> None:
        if proposed <= 0:
            return
        self.accepted = DECAY * self.accepted + accepted
        self.trials = DECAY * self.trials + accepted + (accepted < proposed)

    def probe_due(self) -> bool:
        """Whether this plain step samples the acceptance (every ``probe_every``)."""
        self.plain_steps += 1
        if self.plain_steps < self.probe_every:
            return False
        self.plain_steps = 0
        return True

    def after_probe(self, planned: int) -> None:
        """The plan (k) made right after a probe: 0 backs the probes off, else resets them."""
        self.probe_every = min(2 * self.probe_every, PROBE_MAX) if planned == 0 else PROBE_EVERY

    def check_shadow(self, chosen: int) -> None:
        """After a plain step: the free proposal ``shadow`` as a one-token draft."""
        if self.shadow is not None:
            self.update(1, int(chosen == self.shadow))
            self.shadow = None


def expected_tokens(rate: float, k: int) -> float:
    """Tokens a step with k proposals yields when each is accepted with ``rate`` in turn
    (the accepted ones and the target's own token after them)."""
    return float(sum(rate**i for i in range(k + 1)))


def choose_draft_length(
    costs: StepCosts, acceptance: Acceptance, limit: int, low: int, high: int
) -> int:
    """k for the next step: 0 or ``low`` .. min(``high``, ``limit``), see the module doc.
    (The caller counts the step with ``costs.tick()``.)"""
    top = min(high, limit)
    candidates = [0, *range(low, top + 1)] if top >= low else [0]
    if len(candidates) == 1:
        return 0
    explored = costs.explore(candidates)
    if explored is not None:
        return explored
    known = costs.measured()
    rate = acceptance.rate
    return max(
        candidates, key=lambda k: expected_tokens(rate, k) / max(costs.estimate(k, known), 1e-9)
    )


def could_pay(costs: StepCosts, limit: int, low: int, high: int) -> bool:
    """Whether some k > 0 would beat a plain step at an acceptance of ``CEILING`` (True
    while nothing is measured)."""
    known = costs.measured()
    if 0 not in known:
        return True
    plain = 1.0 / max(known[0], 1e-9)
    return any(
        expected_tokens(CEILING, k) / max(costs.estimate(k, known), 1e-9) > plain
        for k in range(low, min(high, limit) + 1)
    )
