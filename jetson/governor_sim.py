"""A simulated Jetson for the power governor: power as a function of load, a lagging sensor.

Plant (all numbers stated, none measured on a device):

* static power = ``idle_w + per_generation_w * active``: the module at rest plus what each
  admitted generation costs even while paced (CPU work, KV-cache traffic);
* a decode step for ``c`` generations takes ``step_time_s * (1 + step_time_growth*(c-1))``
  and uses ``step_energy_j * (1 + step_energy_growth*(c-1))`` joules on top;
* the sensor is a first-order lag of ``sensor_tau_s`` (the INA3221 averages, ~0.3 s).

Defaults: 9 W idle, 0.9 J and 25 ms per single-stream step, i.e. 47 W unpaced at 40 tok/s,
the shape of a 13B INT4 student at MAXN-like clocks. Everything runs in simulated time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from moe2edge.jetson.governor import PowerGovernor


@dataclass(frozen=True)
class PlantConfig:
    idle_w: float = 9.0
    per_generation_w: float = 2.0
    step_energy_j: float = 0.9
    step_energy_growth: float = 0.25
    step_time_s: float = 0.025
    step_time_growth: float = 0.10
    sensor_tau_s: float = 0.3
    sensor_noise_w: float = 0.0  # std of white noise on each reading (seeded)

    def static_w(self, active: int) -> float:
        return self.idle_w + self.per_generation_w * active

    def step_time(self, c: int) -> float:
        return self.step_time_s * (1 + self.step_time_growth * (c - 1))

    def step_energy(self, c: int) -> float:
        return self.step_energy_j * (1 + self.step_energy_growth * (c - 1))

    def best_tok_s(self, budget_w: float, max_c: int) -> tuple[float, int]:
        """Highest steady tokens/s within the budget, over concurrencies 1..max_c."""
        best = (0.0, 0)
        for c in range(1, max_c + 1):
            headroom = budget_w - self.static_w(c)
            if headroom <= 0:
                continue
            rate = min(1.0 / self.step_time(c), headroom / self.step_energy(c))
            best = max(best, (c * rate, c))
        return best


class Plant:
    """True power integrated exactly; a lagged sensor; a clock that sleep() advances."""

    def __init__(self, config: PlantConfig):
        self.config = config
        self.t = 0.0
        self.active = 0
        self.sensor_w = config.static_w(0)
        self.times = [0.0]
        self.energy = [0.0]  # cumulative joules at self.times
        self._rng = np.random.default_rng(0)

    def advance(self, dt: float, power_w: float) -> None:
        if dt <= 0:
            return
        tau = self.config.sensor_tau_s
        self.sensor_w += (power_w - self.sensor_w) * (1 - math.exp(-dt / tau))
        self.t += dt
        self.times.append(self.t)
        self.energy.append(self.energy[-1] + power_w * dt)

    # the clock/sleep/telemetry the governor sees
    def now(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        self.advance(dt, self.config.static_w(self.active))

    def read_watts(self) -> float:
        noise = self.config.sensor_noise_w
        return self.sensor_w + (float(self._rng.normal(0.0, noise)) if noise else 0.0)

    def rolling_average(self, window_s: float) -> tuple[np.ndarray, np.ndarray]:
        """Exact sliding-window mean power, at every point where it can peak."""
        ts, es = np.asarray(self.times), np.asarray(self.energy)
        points = np.unique(np.concatenate([ts, ts + window_s]))
        points = points[(points > window_s) & (points <= ts[-1])]
        avg = (np.interp(points, ts, es) - np.interp(points - window_s, ts, es)) / window_s
        return points, avg


@dataclass
class SimResult:
    name: str
    budget_w: float
    duration_s: float
    max_rolling_w: float  # after the first window
    tok_s: float  # after the first window
    best_tok_s: float  # what the budget allows, same period
    unpaced_tok_s: float  # without a governor, same demand
    final_concurrency: int
    mean_power_w: float

    @property
    def efficiency(self) -> float:
        return self.tok_s / self.best_tok_s if self.best_tok_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["efficiency"] = self.efficiency
        return d


GEN_LENGTHS = (96, 128, 160, 192, 112, 144)  # tokens per generation, cycled (no randomness)


def simulate(
    name: str,
    demand: Callable[[float], int],
    plant_at: Callable[[float], PlantConfig] | PlantConfig = PlantConfig(),
    duration_s: float = 120.0,
    budget_w: float = 30.0,
    window_s: float = 5.0,
    max_concurrency: int = 4,
    governed: bool = True,
    **governor_kwargs: Any,
) -> SimResult:
    """Run the runtime's decode loop against the plant for ``duration_s`` simulated seconds.

    ``demand(t)``: how many generations users want running at once at time t (new ones
    arrive as soon as one finishes). ``plant_at(t)``: the plant, which may change over time.
    """
    config_at = plant_at if callable(plant_at) else (lambda _t, c=plant_at: c)
    plant = Plant(config_at(0.0))
    gov = PowerGovernor(
        plant.read_watts,
        budget_w=budget_w,
        window_s=window_s,
        max_concurrency=max_concurrency,
        clock=plant.now,
        sleep=plant.sleep,
        **governor_kwargs,
    )
    active: list[int] = []
    started = 0
    tokens_after_window = 0
    best_area = 0.0
    while plant.t < duration_s:
        plant.config = config_at(plant.t)
        limit = gov.allowed_concurrency() if governed else max_concurrency
        while len(active) < min(demand(plant.t), limit):
            active.append(GEN_LENGTHS[started % len(GEN_LENGTHS)])
            started += 1
        plant.active = len(active)
        t0 = plant.t
        if not active:
            plant.advance(0.05, plant.config.static_w(0))
        else:
            if governed:
                gov.before_decode_step(active=len(active))
            c = len(active)
            dt = plant.config.step_time(c)
            plant.advance(dt, plant.config.static_w(c) + plant.config.step_energy(c) / dt)
            if plant.t > window_s:
                tokens_after_window += c
            active = [n - 1 for n in active if n > 1]
        if plant.t > window_s:
            span = plant.t - max(t0, window_s)
            best, _ = plant.config.best_tok_s(budget_w, min(demand(t0), max_concurrency))
            best_area += best * span
    _, avg = plant.rolling_average(window_s)
    measured = plant.t - window_s
    return SimResult(
        name=name,
        budget_w=budget_w,
        duration_s=plant.t,
        max_rolling_w=float(avg.max()) if avg.size else float("nan"),
        tok_s=tokens_after_window / measured,
        best_tok_s=best_area / measured,
        unpaced_tok_s=float("nan"),
        final_concurrency=gov.allowed_concurrency(),
        mean_power_w=plant.energy[-1] / plant.t,
    )


def scenarios() -> dict[str, dict[str, Any]]:
    """The cases in tests and docs/jetson.md."""
    base = PlantConfig()
    heavy = replace(base, per_generation_w=4.0)
    light = replace(base, step_energy_j=0.4)
    busy = replace(light, idle_w=23.0)
    return {
        "one stream": {"demand": lambda t: 1, "plant_at": base},
        "four streams": {"demand": lambda t: 4, "plant_at": base},
        "load step 1->4 at 40 s": {"demand": lambda t: 1 if t < 40 else 4, "plant_at": base},
        "4 W per stream (limits concurrency)": {"demand": lambda t: 4, "plant_at": heavy},
        "other load stops at 60 s (release)": {
            "demand": lambda t: 2,
            "plant_at": lambda t: busy if t < 60 else light,
        },
    }


def run_all(duration_s: float = 120.0, budget_w: float = 30.0) -> list[SimResult]:
    results = []
    for name, spec in scenarios().items():
        res = simulate(name, duration_s=duration_s, budget_w=budget_w, **spec)
        free = simulate(name, duration_s=duration_s, budget_w=budget_w, governed=False, **spec)
        res.unpaced_tok_s = free.tok_s
        results.append(res)
    return results


def format_table(results: list[SimResult]) -> str:
    lines = [
        "| scenario | max 5 s avg (W) | tok/s | best within budget | ratio | unpaced tok/s | streams at end |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.max_rolling_w:.2f} | {r.tok_s:.1f} | {r.best_tok_s:.1f} | "
            f"{r.efficiency:.0%} | {r.unpaced_tok_s:.1f} | {r.final_concurrency} |"
        )
    return "\n".join(lines)
