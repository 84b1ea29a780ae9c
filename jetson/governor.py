"""Power governor: keep the rolling average module power at or under a budget (30 W).

The runtime calls ``before_decode_step()`` before every decode step (it sleeps there to
pace steps) and admits at most ``allowed_concurrency()`` generations at once.

How it works (every ``sample_interval_s``, checked at each decode step and while pacing):

1. Read the module power. The INA3221 averages, so readings lag the load by ~0.3 s
   (``sensor_lag_s``); energy from readings is corrected for that lag, which is exact
   for a first-order lag: integral(true) = integral(reading) + lag * (rise of reading).
2. Power target ``p_ref = min(budget - margin, payback)``. ``payback`` is the most power
   the coming seconds may use so that no ``window_s`` window ending within ``payback_s``
   tops the budget, given the energy already spent in it and assuming power stays where
   it is for ``response_s`` (the loop cannot move it faster). A burst (a load step, one
   more stream) is thus paid back inside the window instead of lifting the average.
3. A PI controller on log(step rate) drives measured power to ``p_ref``. Steps are paced
   by start time: at most one per ``1 / rate`` s. Waits are slept in slices with a reading
   after each, so readings cover the whole step cycle, not only the post-step peak.
   The rate starts at ``min_stream_tok_s`` and rises at most 2x per second (no start-up
   burst the lagging sensor would hide); it is capped at 1.5x the unpaced step rate, so
   when power falls pacing releases fully instead of winding up.
4. Concurrency: admission starts at ``initial_concurrency``. When pacing holds each stream
   under ``min_stream_tok_s`` for ``hold_s`` while the runtime runs at its limit, admit one
   generation fewer; when streams run at ``release_factor`` times that floor for
   ``release_hold_s`` at the limit, admit one more (slowing steps by c/(c+1) first, so the
   new load arrives without a power step). Fewer streams at a usable speed rather than
   many that stall: a voice reply needs ~8 tok/s to stay ahead of speech.

Clock and sleep are injectable so tests run in simulated time (see ``governor_sim``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def _read_watts(telemetry: Any) -> float:
    """Telemetry is a ``PowerTelemetry`` (``read().watts``) or a callable returning watts."""
    if hasattr(telemetry, "read"):
        return float(telemetry.read().watts)
    return float(telemetry())


class PowerGovernor:
    def __init__(
        self,
        telemetry: Any,
        budget_w: float = 30.0,
        window_s: float = 5.0,
        *,
        margin_w: float = 0.8,
        payback_s: float = 3.0,
        response_s: float = 0.8,
        sample_interval_s: float = 0.1,
        max_concurrency: int = 4,
        initial_concurrency: int = 1,
        min_stream_tok_s: float = 8.0,
        release_factor: float = 1.5,
        hold_s: float = 1.5,
        release_hold_s: float = 3.0,
        kp: float = 0.02,
        ki: float = 0.12,
        min_rate: float = 0.2,
        min_sample_gap_s: float = 0.01,
        sensor_lag_s: float = 0.3,
        start_rate: float | None = None,
        max_rise_per_s: float = math.log(2.0),
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if budget_w <= margin_w or window_s <= payback_s or payback_s <= response_s:
            raise ValueError("need budget_w > margin_w and window_s > payback_s > response_s")
        self.telemetry = telemetry
        self.budget_w = budget_w
        self.window_s = window_s
        self.margin_w = margin_w
        self.payback_s = payback_s
        self.response_s = response_s
        self.sample_interval_s = sample_interval_s
        self.max_concurrency = max_concurrency
        self.min_stream_tok_s = min_stream_tok_s
        self.release_factor = release_factor
        self.hold_s = hold_s
        self.release_hold_s = release_hold_s
        self.kp, self.ki = kp, ki
        self.min_rate = min_rate
        self.min_sample_gap_s = min_sample_gap_s
        self.sensor_lag_s = sensor_lag_s
        self.max_rise_per_s = max_rise_per_s
        self.clock, self.sleep = clock, sleep

        self._lock = threading.Lock()
        self._samples: deque[tuple[float, float]] = deque()  # (t, watts)
        # Start paced at the per-stream floor and let the loop raise it (slew-limited):
        # an unpaced start would burst before the lagging sensor shows it.
        self._rate = start_rate if start_rate is not None else min_stream_tok_s
        self._log_rate = math.log(self._rate)
        self._work_s: float | None = None  # EMA of a step's own duration (unpaced rate = 1/x)
        self._last_start: float | None = None
        self._last_return: float | None = None
        self._last_control_t: float | None = None
        self._limit = initial_concurrency

        self._low_since: float | None = None
        self._high_since: float | None = None
        self._last_limit_change = -math.inf
        self.p_ref = budget_w - margin_w
        self.last_watts: float | None = None
        self.steps = 0
        self.paced_s = 0.0
        self.trace: list[tuple[float, ...]] | None = None  # set to [] to record updates

    # --- what the runtime calls --------------------------------------------------------

    def before_decode_step(self, active: int | None = None) -> None:
        """Block until the next decode step may start. ``active``: generations in this step.

        Long waits are slept in slices of ``sample_interval_s / 2`` with a power reading
        after each, so readings are spread over the step cycle (not only right after a
        step, when the lagged sensor peaks) and the wait shortens as soon as power drops.
        """
        now = self.clock()
        with self._lock:
            if self._last_return is not None:
                work = now - self._last_return
                if work < 10 * self.window_s:  # ignore idle gaps between requests
                    self._work_s = work if self._work_s is None else 0.8 * self._work_s + 0.2 * work
            self._tick(now, active)
            wait = self._wait(now)
        while wait > 0:
            chunk = min(wait, self.sample_interval_s / 2)
            self.sleep(chunk)
            self.paced_s += chunk
            now = self.clock()
            with self._lock:
                self._tick(now, active)
                wait = self._wait(now)
        with self._lock:
            self._last_start = now
            self.steps += 1
            self._last_return = self.clock()

    def allowed_concurrency(self) -> int:
        with self._lock:
            return self._limit

    # --- control ------------------------------------------------------------------------

    def _wait(self, now: float) -> float:
        if self._last_start is None:
            return 0.0
        return self._last_start + 1.0 / self._rate - now

    def _energy_since(self, start: float, now: float) -> float:
        """Joules from ``start`` to ``now``: trapezoids between readings, the last one held."""
        pts = list(self._samples)
        if not pts:
            return 0.0
        if start < pts[0][0]:  # before the first reading: assume that reading
            pts.insert(0, (start, pts[0][1]))
        pts.append((now, pts[-1][1]))
        energy = 0.0
        for (t0, w0), (t1, w1) in zip(pts, pts[1:], strict=False):
            a, b = max(t0, start), min(t1, now)
            if b <= a or t1 <= t0:
                continue
            # linear between readings: value at a and b by interpolation
            wa = w0 + (w1 - w0) * (a - t0) / (t1 - t0)
            wb = w0 + (w1 - w0) * (b - t0) / (t1 - t0)
            energy += 0.5 * (wa + wb) * (b - a)
        return energy

    def _payback_limit(self, now: float, measured: float) -> float:
        """Most power the coming seconds may use so no window ending soon tops the budget.

        For each horizon h, the window ending at now + h already holds the energy spent
        since now + h - window_s; power stays near ``measured`` for ``response_s`` (the
        loop cannot change it faster) and the rest of h must make up the difference.
        """
        limit = math.inf
        h = self.response_s + self.sample_interval_s
        while h <= self.payback_s + 1e-9:
            start = now + h - self.window_s
            spent = self._energy_since(start, now)
            # A first-order-lag sensor under-reads a rise by lag * (rise):
            # integral(reading) = integral(true) - lag * (reading(now) - reading(start)).
            spent += self.sensor_lag_s * (self._samples[-1][1] - self._reading_at(start))
            allowed = self.budget_w * self.window_s - spent - measured * self.response_s
            limit = min(limit, allowed / (h - self.response_s))
            h += 0.5
        return limit

    def _reading_at(self, t: float) -> float:
        prev = self._samples[0]
        for cur in self._samples:
            if cur[0] >= t:
                if cur[0] == prev[0]:
                    return cur[1]
                return prev[1] + (cur[1] - prev[1]) * (t - prev[0]) / (cur[0] - prev[0])
            prev = cur
        return prev[1]

    def _tick(self, now: float, active: int | None) -> None:
        if self._samples and now - self._samples[-1][0] < self.min_sample_gap_s:
            return
        try:
            watts = _read_watts(self.telemetry)
        except (OSError, ValueError) as exc:  # a failed read must not stop generation
            log.warning("power governor: reading power failed (%s); keeping the current pace", exc)
            return
        self.last_watts = watts
        self._samples.append((now, watts))
        while len(self._samples) > 2 and self._samples[1][0] < now - self.window_s - 1.0:
            self._samples.popleft()
        if self._last_control_t is None:
            self._last_control_t = now
            return
        if now - self._last_control_t >= self.sample_interval_s:
            self._control(now, active)

    def _control(self, now: float, active: int | None) -> None:
        dt = min(now - self._last_control_t, 1.0)
        measured = self._energy_since(self._last_control_t, now) / max(dt, 1e-9)
        self._last_control_t = now

        self.p_ref = min(self.budget_w - self.margin_w, self._payback_limit(now, measured))

        error = self.p_ref - measured
        cap = 1000.0 if self._work_s is None else 1.5 / max(self._work_s, 1e-4)
        ceiling = min(cap, self._rate * math.exp(self.max_rise_per_s * dt))  # slew limit up
        self._log_rate += self.ki * error * dt
        self._log_rate = min(max(self._log_rate, math.log(self.min_rate)), math.log(ceiling))
        rate = math.exp(self._log_rate + self.kp * error)
        self._rate = min(max(rate, self.min_rate), ceiling)
        self._adjust_concurrency(now, active)
        if self.trace is not None:
            self.trace.append((now, measured, self.p_ref, self._rate, self._limit, active or 0))

    def _adjust_concurrency(self, now: float, active: int | None) -> None:
        paced_rate = self._rate
        if self._work_s is not None:
            paced_rate = min(paced_rate, 1.0 / self._work_s)
        at_limit = active is None or active >= self._limit
        low = paced_rate < self.min_stream_tok_s and at_limit and self._limit > 1
        high = (
            paced_rate >= self.release_factor * self.min_stream_tok_s
            and at_limit
            and self._limit < self.max_concurrency
        )
        self._low_since = (self._low_since or now) if low else None
        self._high_since = (self._high_since or now) if high else None
        # without ``active`` we cannot see when the runtime caught up: wait longer
        settle = self.hold_s if active is not None else 4 * self.hold_s
        if low and now - self._low_since >= self.hold_s and now - self._last_limit_change >= settle:
            self._limit -= 1
            self._last_limit_change, self._low_since = now, None
            log.info(
                "power governor: %.1f W, streams paced to %.1f tok/s: admitting %d at once",
                self.last_watts,
                paced_rate,
                self._limit,
            )
        elif high and now - self._high_since >= self.release_hold_s:
            # one more stream: slow the steps so tokens/s (and power) stay about the same
            # until the loop has measured the new load
            self._rate *= self._limit / (self._limit + 1)
            self._log_rate = math.log(self._rate)
            self._limit += 1
            self._last_limit_change, self._high_since = now, None
            log.info(
                "power governor: headroom at %.1f W: admitting %d at once",
                self.last_watts,
                self._limit,
            )

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "budget_w": self.budget_w,
                "target_w": self.p_ref,
                "last_w": self.last_watts,
                "step_rate_limit": self._rate,
                "allowed_concurrency": self._limit,
                "steps": self.steps,
                "paced_s": self.paced_s,
            }
