"""The power governor against a simulated plant (power = idle + per-stream + step energy x
rate, read through a sensor with a 0.3 s first-order lag), in simulated time."""

from __future__ import annotations

from dataclasses import replace

import pytest

from moe2edge.jetson import governor_sim as sim
from moe2edge.jetson.governor import PowerGovernor

BUDGET = 30.0
SCENARIOS = sim.scenarios()


@pytest.fixture(scope="module")
def results():
    out = {
        name: sim.simulate(name, duration_s=120, budget_w=BUDGET, **spec)
        for name, spec in SCENARIOS.items()
    }
    for r in out.values():  # the throughput cost, shown with `pytest -s`
        print(
            f"\n{r.name}: max 5 s average {r.max_rolling_w:.2f} W, {r.tok_s:.1f} tok/s = "
            f"{r.efficiency:.0%} of the {r.best_tok_s:.1f} tok/s the budget allows"
        )
    return out


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_rolling_average_never_exceeds_budget_after_first_window(results, name):
    assert results[name].max_rolling_w <= BUDGET


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_throughput_within_20_percent_of_best(results, name):
    r = results[name]
    assert r.tok_s >= 0.8 * r.best_tok_s, r.to_dict()


def test_unpaced_run_would_break_the_budget():
    spec = SCENARIOS["one stream"]
    free = sim.simulate("one stream", duration_s=30, governed=False, **spec)
    assert free.max_rolling_w > 40  # what the governor is there for


def test_concurrency_cut_when_streams_would_crawl(results):
    # 4 W per stream: four streams could only crawl at ~3 tok/s each inside 30 W
    assert results["4 W per stream (limits concurrency)"].final_concurrency == 2
    best, c = replace(sim.PlantConfig(), per_generation_w=4.0).best_tok_s(BUDGET, 4)
    assert c == 2


def test_releases_when_power_falls(results):
    r = results["other load stops at 60 s (release)"]
    after = sim.simulate(
        "tail", duration_s=120, budget_w=BUDGET, **SCENARIOS["other load stops at 60 s (release)"]
    )
    assert r.final_concurrency >= 2 and after.final_concurrency >= 2
    # after the other load stops, light steps at two streams: close to what 30 W allows
    light = replace(sim.PlantConfig(), step_energy_j=0.4)
    tail = sim.simulate("light only", demand=lambda t: 2, plant_at=light, duration_s=60)
    assert tail.tok_s >= 0.9 * light.best_tok_s(BUDGET, 2)[0]


def test_no_pacing_when_under_budget():
    cheap = replace(sim.PlantConfig(), step_energy_j=0.3)  # 11 + 12 W unpaced: well under 30 W
    r = sim.simulate("cheap", demand=lambda t: 1, plant_at=cheap, duration_s=30)
    assert r.tok_s == pytest.approx(1 / cheap.step_time(1), rel=0.02)


def test_robust_to_sensor_noise_and_slower_sensor():
    for plant in (
        replace(sim.PlantConfig(), sensor_noise_w=1.0),
        replace(sim.PlantConfig(), sensor_tau_s=0.5),
    ):
        r = sim.simulate(
            "robust", demand=lambda t: 1 if t < 40 else 4, plant_at=plant, duration_s=90
        )
        assert r.max_rolling_w <= BUDGET and r.efficiency >= 0.8


def test_paces_with_injected_clock_and_callable_telemetry():
    t = [0.0]
    slept = []

    def sleep(dt):
        slept.append(dt)
        t[0] += dt

    gov = PowerGovernor(lambda: 40.0, budget_w=30, clock=lambda: t[0], sleep=sleep, start_rate=10)
    for _ in range(20):
        gov.before_decode_step(active=1)
        t[0] += 0.02  # the step itself
    assert slept, "over budget: the governor must pace"
    stats = gov.stats()
    assert stats["step_rate_limit"] < 10 and stats["paced_s"] > 0 and stats["last_w"] == 40.0
    assert gov.allowed_concurrency() == 1


def test_rejects_inconsistent_settings():
    with pytest.raises(ValueError):
        PowerGovernor(lambda: 0.0, budget_w=30, window_s=2.0, payback_s=3.0)


def test_failed_power_reading_keeps_pace():
    t = [0.0]

    def broken():
        raise OSError("ina3221 read failed")

    gov = PowerGovernor(broken, clock=lambda: t[0], sleep=lambda dt: t.__setitem__(0, t[0] + dt))
    for _ in range(5):
        gov.before_decode_step()
        t[0] += 0.02
    assert gov.steps == 5 and gov.last_watts is None
