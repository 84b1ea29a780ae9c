"""The priced draft length (runtime/draft_length.py): costs measured per k, interpolated where
not measured; a fresh table explores, then the k with the most expected tokens per second
wins (0 when verifying costs more than the proposals save). On real bundles:
tests/test_speculative.py (a priced speculator stays greedy-equal whatever it picks)."""

from __future__ import annotations

import pytest

from moe2edge.runtime.draft_length import (
    EXPLORE_EVERY,
    PROBE_EVERY,
    PROBE_MAX,
    Acceptance,
    StepCosts,
    choose_draft_length,
    expected_tokens,
)


def costs_of(table: dict[int, float], high: int = 8, initial: int = 4) -> StepCosts:
    costs = StepCosts(high, initial)
    for k, seconds in table.items():
        for _ in range(3):
            costs.observe(k, seconds)
    return costs


def pick(costs: StepCosts, acceptance: Acceptance, limit: int, high: int) -> int:
    """One step's draft length (draft lengths from 1 up)."""
    costs.tick()
    return choose_draft_length(costs, acceptance, limit, 1, high)


def test_estimate_interpolates_and_extrapolates():
    costs = costs_of({0: 1.0, 2: 2.0, 4: 2.4})
    known = costs.measured()
    assert known == {0: 1.0, 2: 2.0, 4: 2.4}
    assert costs.estimate(1, known) == pytest.approx(1.5)
    assert costs.estimate(3, known) == pytest.approx(2.2)
    assert costs.estimate(6, known) == pytest.approx(2.8)  # the slope of the last two
    single = costs_of({4: 3.0})
    assert single.estimate(0, single.measured()) == 3.0


def test_median_of_the_latest_shrugs_off_one_slow_step():
    costs = costs_of({1: 1.0})
    costs.observe(1, 50.0)  # a step that waited on something else
    assert costs.measured()[1] == 1.0


def test_fresh_table_explores_initial_zero_high_then_picks():
    costs, acceptance = StepCosts(8, 4), Acceptance()
    seen = []
    for seconds in (3.2, 1.0, 9.0):  # k = initial 4, then 0, then 8
        k = pick(costs, acceptance, 100, 8)
        seen.append(k)
        costs.observe(k, seconds)
    assert seen == [4, 0, 8]
    # measured: 0 -> 1.0, 4 -> 3.2, 8 -> 9.0; at acceptance 0.5 every k > 0 loses to plain
    assert pick(costs, acceptance, 100, 8) == 0


def test_cheap_verify_and_high_acceptance_pick_long_drafts():
    costs, acceptance = costs_of({0: 1.0, 4: 1.2, 8: 1.4}), Acceptance()
    for _ in range(10):
        acceptance.update(8, 8)
    assert acceptance.rate > 0.95
    assert pick(costs, acceptance, 100, 8) == 8
    assert pick(costs, acceptance, 3, 8) == 3  # the limit caps it
    assert pick(costs, acceptance, 0, 8) == 0


def test_expensive_verify_keeps_it_plain_until_acceptance_is_high():
    costs, acceptance = costs_of({0: 1.0, 1: 1.5, 2: 2.0, 4: 3.0, 8: 5.0}), Acceptance()
    for _ in range(10):
        acceptance.update(2, 0)  # every verify rejected at once
    assert pick(costs, acceptance, 100, 8) == 0
    for _ in range(30):
        acceptance.update(8, 8)
    # E(8) ~ 9 tokens for 5x the cost beats plain; so does every k, but 8 the most
    assert pick(costs, acceptance, 100, 8) == 8


def test_every_k_is_measured_again_in_turn():
    costs, acceptance = costs_of({0: 1.0, 1: 2.0, 2: 3.0}, high=2, initial=1), Acceptance()
    picks = [pick(costs, acceptance, 100, 2) for _ in range(3 * EXPLORE_EVERY)]
    assert set(picks) == {0, 1, 2}
    assert picks.count(0) > 3 * EXPLORE_EVERY - 4


def test_acceptance_estimate_and_expected_tokens():
    acceptance = Acceptance(prior=0.5)
    assert acceptance.rate == 0.5
    acceptance.update(4, 2)  # two accepted, then a rejection
    assert acceptance.rate == pytest.approx((0.4 + 2) / (0.8 + 3))
    acceptance.update(0, 0)  # nothing proposed: no evidence
    assert acceptance.rate == pytest.approx((0.4 + 2) / (0.8 + 3))
    acceptance.shadow = 7
    acceptance.check_shadow(7)
    assert acceptance.shadow is None and acceptance.rate > (0.4 + 2) / (0.8 + 3)
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 2) == 1.75
    assert sum(acceptance.probe_due() for _ in range(3 * PROBE_EVERY)) == 3


def test_probes_back_off_while_the_plan_stays_plain():
    acceptance = Acceptance()
    intervals = []
    for _ in range(6):
        steps = 1
        while not acceptance.probe_due():
            steps += 1
        intervals.append(steps)
        acceptance.after_probe(0)  # the probe did not make proposals pay
    assert intervals == [
        PROBE_EVERY,
        2 * PROBE_EVERY,
        4 * PROBE_EVERY,
        PROBE_MAX,
        PROBE_MAX,
        PROBE_MAX,
    ]
    acceptance.after_probe(2)  # now they pay: probe often again
    assert sum(acceptance.probe_due() for _ in range(PROBE_EVERY)) == 1
