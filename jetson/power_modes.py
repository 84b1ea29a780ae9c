"""Jetson power modes: ``/etc/nvpmodel.conf``, ``nvpmodel -q`` / ``-m``, and current clocks.

The conf file format (NVIDIA's ``nvpmodel_p3701_000X.conf`` and friends)::

    < PARAM TYPE=FILE NAME=CPU_ONLINE >
    CORE_0 /sys/devices/system/cpu/cpu0/online
    < PARAM TYPE=CLOCK NAME=GPU >
    MAX_FREQ /sys/devices/.../devfreq/.../max_freq
    < POWER_MODEL ID=2 NAME=MODE_30W >
    CPU_ONLINE CORE_0 1
    TPC_POWER_GATING TPC_PG_MASK 240
    CPU_A78_0 MAX_FREQ 1728000        (kHz; -1 = the hardware maximum)
    GPU MAX_FREQ 612000000            (Hz;  -1 = the hardware maximum)
    EMC MAX_FREQ 0                    (Hz;   0 = no cap)
    < PM_CONFIG DEFAULT=2 >

``nvpmodel -q`` prints ``NV Power Mode: MODE_30W`` then the mode id on the next line.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe2edge.jetson.board import require_jetson
from moe2edge.jetson.errors import JetsonError

log = logging.getLogger(__name__)

DEFAULT_CONF = Path("/etc/nvpmodel.conf")
DEFAULT_NVPMODEL = "nvpmodel"

_SECTION = re.compile(r"<\s*(\w+)\s+([^>]*)>")
_ATTR = re.compile(r"(\w+)=(\S+)")


@dataclass
class PowerMode:
    id: int
    name: str
    settings: list[tuple[str, str, str]] = field(default_factory=list)  # (param, key, value)

    def value(self, param: str, key: str) -> str | None:
        for p, k, v in self.settings:
            if p == param and k == key:
                return v
        return None

    @property
    def watts(self) -> float | None:
        """Nominal budget from the name (``MODE_30W`` -> 30); None for MAXN."""
        m = re.search(r"(\d+(?:\.\d+)?)W", self.name, re.IGNORECASE)
        return float(m.group(1)) if m else None

    @property
    def cpu_online(self) -> int:
        return sum(1 for p, _k, v in self.settings if p == "CPU_ONLINE" and v.strip() == "1")

    @property
    def cpu_max_khz(self) -> int | None:
        """Highest CPU cluster cap in kHz; None when uncapped (-1)."""
        caps = [int(v) for p, k, v in self.settings if p.startswith("CPU_") and k == "MAX_FREQ"]
        caps = [c for c in caps if c > 0]
        if any(int(v) < 0 for p, k, v in self.settings if p.startswith("CPU_") and k == "MAX_FREQ"):
            return None
        return max(caps) if caps else None

    @property
    def gpu_max_hz(self) -> int | None:
        v = self.value("GPU", "MAX_FREQ")
        return int(v) if v is not None and int(v) > 0 else None

    @property
    def emc_max_hz(self) -> int | None:
        v = self.value("EMC", "MAX_FREQ")
        return int(v) if v is not None and int(v) > 0 else None

    @property
    def tpc_gated_mask(self) -> int | None:
        v = self.value("TPC_POWER_GATING", "TPC_PG_MASK")
        return int(v, 0) if v is not None else None

    def gpu_tpcs(self, total_tpcs: int) -> int:
        mask = self.tpc_gated_mask or 0
        return total_tpcs - bin(mask & ((1 << total_tpcs) - 1)).count("1")

    def summary(self, total_tpcs: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "watts": self.watts,
            "cpu_online": self.cpu_online,
            "cpu_max_mhz": self.cpu_max_khz / 1000 if self.cpu_max_khz else None,
            "gpu_max_mhz": self.gpu_max_hz / 1e6 if self.gpu_max_hz else None,
            "emc_max_mhz": self.emc_max_hz / 1e6 if self.emc_max_hz else None,
            "tpc_pg_mask": self.tpc_gated_mask,
        }
        if total_tpcs:
            out["gpu_tpcs"] = self.gpu_tpcs(total_tpcs)
        return out


@dataclass
class NvpModelConf:
    modes: list[PowerMode]
    default_id: int | None
    params: dict[str, dict[str, str]]  # PARAM NAME -> {key: sysfs path}
    path: Path | None = None

    def by_id(self, mode_id: int) -> PowerMode | None:
        return next((m for m in self.modes if m.id == mode_id), None)


def parse_nvpmodel_conf(text: str, path: Path | None = None) -> NvpModelConf:
    modes: list[PowerMode] = []
    params: dict[str, dict[str, str]] = {}
    default_id = None
    current_mode: PowerMode | None = None
    current_param: dict[str, str] | None = None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        sec = _SECTION.match(line)
        if sec:
            kind, attrs = sec.group(1).upper(), dict(_ATTR.findall(sec.group(2)))
            current_mode, current_param = None, None
            if kind == "POWER_MODEL":
                current_mode = PowerMode(id=int(attrs["ID"]), name=attrs.get("NAME", attrs["ID"]))
                modes.append(current_mode)
            elif kind == "PARAM":
                current_param = params.setdefault(attrs.get("NAME", "?"), {})
            elif kind == "PM_CONFIG" and "DEFAULT" in attrs:
                default_id = int(attrs["DEFAULT"])
            continue
        fields = line.split()
        if current_mode is not None and len(fields) >= 3:
            current_mode.settings.append((fields[0], fields[1], " ".join(fields[2:])))
        elif current_param is not None and len(fields) >= 2:
            current_param[fields[0]] = fields[1]
    if not modes:
        raise JetsonError(
            f"{path or 'nvpmodel conf'} has no '< POWER_MODEL ID=.. NAME=.. >' sections: "
            "not an nvpmodel.conf"
        )
    return NvpModelConf(modes=modes, default_id=default_id, params=params, path=path)


def load_nvpmodel_conf(path: str | Path = DEFAULT_CONF) -> NvpModelConf:
    path = Path(path)
    if not path.is_file():
        raise JetsonError(
            f"{path} does not exist: power modes are defined there on a Jetson (JetPack "
            "installs it as a link to /etc/nvpmodel/nvpmodel_<board>.conf); pass --nvpmodel-conf "
            "to read another file"
        )
    return parse_nvpmodel_conf(path.read_text(encoding="utf-8", errors="replace"), path)


def find_mode(conf: NvpModelConf, spec: str | int) -> PowerMode:
    """A mode by id (``2``), wattage (``30W``/``30``) or name (``MODE_30W``, ``maxn``)."""
    s = str(spec).strip()
    if s.isdigit() and conf.by_id(int(s)):
        return conf.by_id(int(s))  # type: ignore[return-value]
    for m in conf.modes:
        if m.name.upper() in (s.upper(), f"MODE_{s.upper()}"):
            return m
    w = re.fullmatch(r"(\d+(?:\.\d+)?)\s*W?", s, re.IGNORECASE)
    if w:
        matches = [m for m in conf.modes if m.watts == float(w.group(1))]
        if len(matches) == 1:
            return matches[0]
    known = ", ".join(f"{m.id}={m.name}" for m in conf.modes)
    raise JetsonError(f"no power mode {spec!r} in {conf.path or 'the conf'}; modes: {known}")


def parse_nvpmodel_query(text: str) -> tuple[int | None, str | None]:
    """``NV Power Mode: MODE_30W\\n2`` -> (2, "MODE_30W")."""
    name = None
    m = re.search(r"NV Power Mode:\s*(\S+)", text)
    if m:
        name = m.group(1)
    mode_id = None
    for line in text[m.end() :].splitlines() if m else text.splitlines():
        if line.strip().isdigit():
            mode_id = int(line.strip())
            break
    return mode_id, name


def _nvpmodel_path(nvpmodel: str) -> str:
    exe = shutil.which(nvpmodel)
    if exe is None:
        raise JetsonError(
            f"'{nvpmodel}' was not found on PATH: JetPack installs it (Debian package "
            "nvidia-l4t-nvpmodel); pass --nvpmodel PATH if it lives elsewhere"
        )
    return exe


def query_mode(
    nvpmodel: str = DEFAULT_NVPMODEL, root: Path = Path("/"), timeout_s: float = 10.0
) -> tuple[int | None, str | None]:
    """The current mode as (id, name) from ``nvpmodel -q``."""
    require_jetson(root)
    proc = subprocess.run(
        [_nvpmodel_path(nvpmodel), "-q"], capture_output=True, text=True, timeout=timeout_s
    )
    if proc.returncode != 0:
        raise JetsonError(f"`{nvpmodel} -q` failed ({proc.returncode}): {proc.stderr.strip()}")
    return parse_nvpmodel_query(proc.stdout)


def set_mode(
    spec: str | int,
    conf_path: str | Path = DEFAULT_CONF,
    nvpmodel: str = DEFAULT_NVPMODEL,
    root: Path = Path("/"),
    euid: int | None = None,
    timeout_s: float = 30.0,
) -> str:
    """Switch to a mode with ``nvpmodel -m ID``; returns a one-line report.

    Refuses when not on a Jetson or not root. nvpmodel asks before rebooting when a mode
    change needs one: we answer "no" and say so, never rebooting the device ourselves.
    """
    require_jetson(root)
    mode = find_mode(load_nvpmodel_conf(conf_path), spec)
    euid = os.geteuid() if euid is None else euid
    if euid != 0:
        raise JetsonError(
            f"setting the power mode needs root: run `sudo moe2edge jetson mode --set {spec}` "
            f"(or `sudo nvpmodel -m {mode.id}`)"
        )
    exe = _nvpmodel_path(nvpmodel)
    log.info("switching to power mode %d (%s)", mode.id, mode.name)
    proc = subprocess.run(
        [exe, "-m", str(mode.id)], input="no\n", capture_output=True, text=True, timeout=timeout_s
    )
    output = (proc.stdout + proc.stderr).strip()
    if "reboot" in output.lower():
        return (
            f"mode {mode.id} ({mode.name}) needs a reboot to take effect; nvpmodel said: "
            f"{output.splitlines()[-1] if output else ''}. Reboot the device, then check with "
            "`moe2edge jetson mode`"
        )
    if proc.returncode != 0:
        raise JetsonError(f"`nvpmodel -m {mode.id}` failed ({proc.returncode}): {output}")
    now_id, now_name = query_mode(nvpmodel, root)
    if now_id != mode.id:
        raise JetsonError(
            f"asked for mode {mode.id} ({mode.name}) but nvpmodel reports {now_id} ({now_name})"
        )
    return f"power mode is now {mode.id} ({mode.name})"


# --- clocks ---------------------------------------------------------------------------


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def parse_cpu_list(text: str) -> list[int]:
    """``0-3,6`` -> [0, 1, 2, 3, 6]."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if "-" in part:
            a, b = part.split("-")
            cpus.extend(range(int(a), int(b) + 1))
        elif part.strip():
            cpus.append(int(part))
    return cpus


def gpu_devfreq_dir(root: Path = Path("/")) -> Path | None:
    """The GPU's devfreq directory (``17000000.gpu`` on JetPack 6, ``17000000.ga10b`` on 5)."""
    base = Path(root) / "sys/class/devfreq"
    for d in sorted(base.glob("*")) if base.is_dir() else []:
        if "gpu" in d.name or "ga10b" in d.name or "gv11b" in d.name:
            return d
    return None


def read_clocks(root: Path = Path("/")) -> dict[str, Any]:
    """Current CPU, GPU and EMC clocks in MHz from sysfs (None where unreadable)."""
    root = Path(root)
    online_text = (
        (root / "sys/devices/system/cpu/online").read_text()
        if (root / "sys/devices/system/cpu/online").is_file()
        else ""
    )
    online = parse_cpu_list(online_text) if online_text else []
    cpu_cur = {}
    cpu_max = {}
    for cpu in online:
        d = root / f"sys/devices/system/cpu/cpu{cpu}/cpufreq"
        cur, mx = _read_int(d / "scaling_cur_freq"), _read_int(d / "scaling_max_freq")
        cpu_cur[cpu] = cur / 1000 if cur else None
        cpu_max[cpu] = mx / 1000 if mx else None
    gpu_dir = gpu_devfreq_dir(root)
    gpu_cur = _read_int(gpu_dir / "cur_freq") if gpu_dir else None
    gpu_max = _read_int(gpu_dir / "max_freq") if gpu_dir else None
    emc = _read_int(root / "sys/kernel/debug/bpmp/debug/clk/emc/rate")
    emc_cap = _read_int(root / "sys/kernel/nvpmodel_emc_cap/emc_iso_cap")
    return {
        "cpu_online": online,
        "cpu_cur_mhz": cpu_cur,
        "cpu_max_mhz": cpu_max,
        "gpu_cur_mhz": gpu_cur / 1e6 if gpu_cur else None,
        "gpu_max_mhz": gpu_max / 1e6 if gpu_max else None,
        "emc_cur_mhz": emc / 1e6 if emc else None,
        "emc_cap_mhz": emc_cap / 1e6 if emc_cap else None,
    }
