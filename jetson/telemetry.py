"""Module power telemetry on a Jetson: one interface over four sources.

Sources, tried in this order by ``source="auto"``:

* ``hwmon``: INA3221 through hwmon (JetPack 5.1+/6):
  ``/sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon*/in{N}_label``, ``in{N}_input`` (mV),
  ``curr{N}_input`` (mA); P = mV x mA / 1000 mW. The hwmon number changes between boots,
  so it is globbed.
* ``iio``: the older ``ina3221x`` driver: ``.../ina3221x/1-0040/iio:device0/rail_name_{k}``
  with ``in_power{k}_input`` (mW) or ``in_voltage{k}_input`` x ``in_current{k}_input``.
* ``jtop``: jetson-stats, when installed and its service answers: ``jetson.power['rail']``
  and ``jetson.power['tot']`` (mW).
* ``tegrastats``: parses ``NAME <instant>mW/<average>mW`` fields of its lines.

Module total: the ``VDD_IN`` rail where the board has one (Orin NX/Nano measure the module
input there); AGX Orin has no ``VDD_IN``, so the total is the sum of its rails
(``VDD_GPU_SOC + VDD_CPU_CV + VIN_SYS_5V0 + VDDQ_VDD2_1V8AO``), as jetson-stats does.
The INA3221 averages its samples, so readings lag the load by roughly 0.3 s.
"""

from __future__ import annotations

import importlib
import logging
import re
import shutil
import statistics
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from moe2edge.jetson.board import require_jetson
from moe2edge.jetson.errors import JetsonError

log = logging.getLogger(__name__)

TOTAL_RAILS = ("VDD_IN",)
SOURCES = ("hwmon", "iio", "jtop", "tegrastats")

# `VDD_GPU_SOC 3150mW/2971mW` (JetPack 5/6) or `VDD_GPU_SOC 3150/2971` (older); the lookahead
# keeps `RAM 2281/62780MB` and `IRAM 0/252kB` out.
_TEGRASTATS_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*)\s+(\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")


@dataclass
class PowerSample:
    t: float  # seconds, from the telemetry clock
    rails_mw: dict[str, float]
    total_mw: float
    source: str

    @property
    def watts(self) -> float:
        return self.total_mw / 1000.0


class RailSource(Protocol):
    name: str

    def read_rails(self) -> dict[str, float]: ...

    def close(self) -> None: ...


def module_total_mw(rails_mw: dict[str, float]) -> float:
    for name in TOTAL_RAILS:
        if name in rails_mw:
            return rails_mw[name]
    return sum(rails_mw.values())


def _read_number(path: Path) -> float:
    return float(path.read_text().split()[0])


class HwmonSource:
    """INA3221 channels under ``ina3221/*/hwmon/hwmon*`` (JetPack 5.1+ and 6)."""

    name = "hwmon"

    def __init__(self, root: Path = Path("/")):
        base = Path(root) / "sys/bus/i2c/drivers/ina3221"
        self.channels: list[tuple[str, Path, Path]] = []
        for dev in sorted(base.glob("*/hwmon/hwmon*")):
            for label_file in sorted(dev.glob("in*_label")):
                n = re.match(r"in(\d+)_label", label_file.name)
                label = label_file.read_text().strip()
                if not n or not label or label.lower().startswith("sum"):
                    continue
                volt, curr = dev / f"in{n.group(1)}_input", dev / f"curr{n.group(1)}_input"
                if volt.is_file() and curr.is_file():
                    self.channels.append((label, volt, curr))
        if not self.channels:
            raise JetsonError(f"no INA3221 hwmon channels under {base}/*/hwmon/hwmon*")

    def read_rails(self) -> dict[str, float]:
        return {lab: _read_number(v) * _read_number(c) / 1000.0 for lab, v, c in self.channels}

    def close(self) -> None:
        pass


class IioSource:
    """INA3221 channels under the older ``ina3221x/*/iio:device*`` driver."""

    name = "iio"

    def __init__(self, root: Path = Path("/")):
        base = Path(root) / "sys/bus/i2c/drivers/ina3221x"
        self.channels: list[tuple[str, Path, Path, Path]] = []
        for dev in sorted(base.glob("*/iio:device*")):
            for name_file in sorted(dev.glob("rail_name_*")):
                k = name_file.name.rsplit("_", 1)[1]
                label = name_file.read_text().strip()
                power = dev / f"in_power{k}_input"
                volt, curr = dev / f"in_voltage{k}_input", dev / f"in_current{k}_input"
                if label and (power.is_file() or (volt.is_file() and curr.is_file())):
                    self.channels.append((label, power, volt, curr))
        if not self.channels:
            raise JetsonError(f"no INA3221 iio channels under {base}/*/iio:device*")

    def read_rails(self) -> dict[str, float]:
        out = {}
        for label, power, volt, curr in self.channels:
            if power.is_file():
                out[label] = _read_number(power)
            else:
                out[label] = _read_number(volt) * _read_number(curr) / 1000.0
        return out

    def close(self) -> None:
        pass


class JtopSource:
    """jetson-stats (``pip install jetson-stats``; needs its ``jtop`` service running)."""

    name = "jtop"
    total_mw: float | None = None

    def __init__(self) -> None:
        try:
            jtop_module = importlib.import_module("jtop")
        except ImportError as exc:
            raise JetsonError("jetson-stats is not installed (pip install jetson-stats)") from exc
        self._jetson = jtop_module.jtop()
        try:
            self._jetson.start()
        except Exception as exc:  # jtop raises JtopException when its service is down
            raise JetsonError(
                f"jetson-stats is installed but its service did not answer ({exc}); "
                "`sudo systemctl restart jtop.service`"
            ) from exc

    def read_rails(self) -> dict[str, float]:
        power = self._jetson.power
        rails = power.get("rail", {})

        def mw(v: Any) -> float:
            return float(v["power"] if isinstance(v, dict) else v)

        self.total_mw = mw(power["tot"]) if "tot" in power else None
        return {name: mw(v) for name, v in rails.items()}

    def close(self) -> None:
        try:
            self._jetson.close()
        except Exception:  # closing a dead service connection must not mask the real error
            log.debug("jtop close failed", exc_info=True)


def parse_tegrastats_line(line: str) -> dict[str, tuple[float, float]]:
    """Rail -> (instant mW, average mW) from one tegrastats line."""
    return {
        m.group(1): (float(m.group(2)), float(m.group(3))) for m in _TEGRASTATS_RAIL.finditer(line)
    }


class TegrastatsSource:
    """Runs ``tegrastats --interval MS`` and keeps the latest parsed line."""

    name = "tegrastats"

    def __init__(
        self, executable: str = "tegrastats", interval_ms: int = 100, first_timeout_s: float = 5.0
    ):
        exe = shutil.which(executable)
        if exe is None:
            raise JetsonError(f"'{executable}' was not found on PATH (it ships with L4T)")
        self._proc = subprocess.Popen(
            [exe, "--interval", str(int(interval_ms))],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        self._latest: dict[str, float] | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._pump, name="tegrastats", daemon=True)
        self._thread.start()
        with self._cond:
            self._cond.wait_for(
                lambda: self._latest is not None or self._proc.poll() is not None, first_timeout_s
            )
        if self._latest is None:
            self.close()
            raise JetsonError(
                f"'{executable}' printed no power rails within {first_timeout_s:.0f} s"
            )

    def _pump(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            rails = parse_tegrastats_line(line)
            if rails:
                with self._cond:
                    self._latest = {name: inst for name, (inst, _avg) in rails.items()}
                    self._cond.notify_all()

    def read_rails(self) -> dict[str, float]:
        with self._cond:
            assert self._latest is not None
            return dict(self._latest)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()


class PowerTelemetry:
    """Samples a rail source, keeps a rolling history, reports the module total.

    ``read()`` samples now; ``start()`` samples in a background thread at ``rate_hz``;
    ``average_w()`` is the mean over the last ``window_s`` seconds.
    """

    def __init__(
        self,
        source: RailSource,
        rate_hz: float = 10.0,
        window_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if rate_hz <= 0:
            raise JetsonError("the sampling rate must be positive")
        self.source = source
        self.rate_hz = rate_hz
        self.window_s = window_s
        self.clock = clock
        self.history: deque[PowerSample] = deque(maxlen=max(16, int(rate_hz * window_s * 4)))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> PowerSample:
        rails = self.source.read_rails()
        total = getattr(self.source, "total_mw", None)
        sample = PowerSample(
            t=self.clock(),
            rails_mw=rails,
            total_mw=float(total) if total is not None else module_total_mw(rails),
            source=self.source.name,
        )
        with self._lock:
            self.history.append(sample)
        return sample

    def average_w(self, window_s: float | None = None) -> float | None:
        window_s = self.window_s if window_s is None else window_s
        with self._lock:
            if not self.history:
                return None
            cutoff = self.history[-1].t - window_s
            recent = [s.watts for s in self.history if s.t >= cutoff]
        return statistics.fmean(recent)

    def collect(
        self, seconds: float, sleep: Callable[[float], None] = time.sleep
    ) -> list[PowerSample]:
        """Sample for ``seconds`` at ``rate_hz`` in this thread."""
        period = 1.0 / self.rate_hz
        samples = []
        start = self.clock()
        next_t = start
        while True:
            samples.append(self.read())
            next_t += period
            if next_t - start > seconds + 1e-9:
                break
            delay = next_t - self.clock()
            if delay > 0:
                sleep(delay)
        return samples

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="power-telemetry", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0 / self.rate_hz):
            try:
                self.read()
            except (OSError, ValueError):
                log.warning("power sample failed", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None

    def close(self) -> None:
        self.stop()
        self.source.close()


def summarize(samples: list[PowerSample]) -> dict[str, Any]:
    if not samples:
        return {"samples": 0}
    totals = [s.watts for s in samples]
    rails = sorted({name for s in samples for name in s.rails_mw})
    return {
        "source": samples[0].source,
        "samples": len(samples),
        "seconds": samples[-1].t - samples[0].t,
        "total_w": {"mean": statistics.fmean(totals), "min": min(totals), "max": max(totals)},
        "rails_w": {
            name: statistics.fmean(s.rails_mw[name] / 1000 for s in samples if name in s.rails_mw)
            for name in rails
        },
    }


def open_source(
    source: str = "auto",
    root: Path = Path("/"),
    tegrastats: str = "tegrastats",
    interval_ms: int = 100,
) -> RailSource:
    """Open one rail source by name, or the first that works with ``auto``."""
    require_jetson(root)
    names = SOURCES if source == "auto" else (source,)
    errors = []
    for name in names:
        try:
            if name == "hwmon":
                return HwmonSource(root)
            if name == "iio":
                return IioSource(root)
            if name == "jtop":
                return JtopSource()
            if name == "tegrastats":
                return TegrastatsSource(tegrastats, interval_ms=interval_ms)
            raise JetsonError(
                f"unknown telemetry source {name!r}; choose from {', '.join(SOURCES)}"
            )
        except JetsonError as exc:
            errors.append(f"{name}: {exc}")
            log.debug("telemetry source %s unavailable: %s", name, exc)
    raise JetsonError("no power telemetry source works on this machine: " + "; ".join(errors))


def open_telemetry(
    source: str = "auto",
    root: Path = Path("/"),
    rate_hz: float = 10.0,
    window_s: float = 5.0,
    tegrastats: str = "tegrastats",
) -> PowerTelemetry:
    src = open_source(source, root, tegrastats, interval_ms=max(10, int(1000 / rate_hz)))
    log.info("power telemetry from %s at %.1f Hz", src.name, rate_hz)
    return PowerTelemetry(src, rate_hz=rate_hz, window_s=window_s)
