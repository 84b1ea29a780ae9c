"""Which Jetson is this? Board detection, L4T/JetPack version and memory, from files only.

Every function takes ``root`` (default ``/``) so tests can point it at a fixture tree.
A machine is a Jetson when ``/etc/nv_tegra_release`` exists or
``/proc/device-tree/compatible`` lists ``nvidia,tegra...``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moe2edge.jetson.errors import JetsonError

log = logging.getLogger(__name__)

# L4T release -> JetPack release (NVIDIA's JetPack archive). Unlisted: shown as "unknown".
L4T_TO_JETPACK = {
    "35.1": "5.0.2",
    "35.2": "5.1",
    "35.3": "5.1.1",
    "35.4": "5.1.2",
    "35.5": "5.1.3",
    "35.6": "5.1.4",
    "36.2": "6.0 DP",
    "36.3": "6.0",
    "36.4": "6.1/6.2",
}

# Device-tree module part numbers -> planner module keys (None: supported board, no preset).
MODULE_PARTS = {
    "p3701-0000": "agx-orin-32gb",  # the first AGX Orin dev kits; corrected by RAM below
    "p3701-0004": "agx-orin-32gb",
    "p3701-0005": "agx-orin-64gb",
    "p3767-0000": "orin-nx-16gb",
    "p3767-0001": "orin-nx-8gb",
    "p3767-0003": "orin-nano-8gb",
    "p3767-0004": "orin-nano-4gb",
    "p3767-0005": "orin-nano-8gb",
}

NOT_A_JETSON = (
    "this machine is not a Jetson ({why}). `moe2edge jetson plan` runs anywhere; power modes, "
    "telemetry, doctor, build-engine and install-service run on the Jetson itself"
)


def _read(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return None


def compatible_strings(root: Path = Path("/")) -> list[str]:
    """The device tree's ``compatible`` list (NUL separated in the file)."""
    text = _read(Path(root) / "proc/device-tree/compatible")
    return [s for s in (text or "").split("\x00") if s.strip()]


def is_jetson(root: Path = Path("/")) -> bool:
    root = Path(root)
    if (root / "etc/nv_tegra_release").is_file():
        return True
    return any(s.startswith("nvidia,tegra") for s in compatible_strings(root))


def require_jetson(root: Path = Path("/")) -> None:
    """Raise a clear JetsonError when ``root`` is not a Jetson."""
    if not is_jetson(root):
        root = Path(root)
        why = f"no {root / 'etc/nv_tegra_release'} and {root / 'proc/device-tree/compatible'} lists no nvidia,tegra"
        raise JetsonError(NOT_A_JETSON.format(why=why))


def parse_nv_tegra_release(text: str) -> dict[str, str]:
    """``# R36 (release), REVISION: 3.0, GCID: ..., BOARD: generic, ...`` -> fields."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    if not m:
        return {}
    major, revision = m.group(1), m.group(2)
    parts = revision.split(".")
    minor = parts[0]
    patch = parts[1] if len(parts) > 1 else "0"
    l4t = f"{major}.{minor}.{patch}"
    out = {"l4t": l4t, "jetpack": L4T_TO_JETPACK.get(f"{major}.{minor}", "unknown")}
    for key in ("GCID", "BOARD", "EABI", "DATE"):
        km = re.search(rf"{key}:\s*([^,]+)", text)
        if km:
            out[key.lower()] = km.group(1).strip()
    return out


def read_meminfo(root: Path = Path("/")) -> dict[str, int]:
    """``/proc/meminfo`` in bytes (``MemTotal``, ``MemAvailable``, ``SwapTotal``, ...)."""
    text = _read(Path(root) / "proc/meminfo") or ""
    out = {}
    for line in text.splitlines():
        m = re.match(r"(\w+):\s+(\d+)\s*(kB)?", line)
        if m:
            out[m.group(1)] = int(m.group(2)) * (1024 if m.group(3) else 1)
    return out


@dataclass
class BoardInfo:
    model: str
    compatible: list[str]
    module: str | None  # planner module key, when known
    l4t: str | None
    jetpack: str | None
    mem_total_bytes: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def detect_module(compatible: list[str], mem_total_bytes: int | None) -> str | None:
    module = None
    for s in compatible:
        for part, key in MODULE_PARTS.items():
            if part in s:
                module = key
    if module and module.startswith("agx-orin") and mem_total_bytes:
        # p3701-0000 shipped with 32 and 64 GB: the RAM decides.
        module = "agx-orin-64gb" if mem_total_bytes > 40 * 2**30 else "agx-orin-32gb"
    return module


def read_board(root: Path = Path("/")) -> BoardInfo:
    """Board facts; raises JetsonError when ``root`` is not a Jetson."""
    root = Path(root)
    require_jetson(root)
    compatible = compatible_strings(root)
    model = (_read(root / "proc/device-tree/model") or "unknown Jetson").strip("\x00\n ")
    release = parse_nv_tegra_release(_read(root / "etc/nv_tegra_release") or "")
    mem_total = read_meminfo(root).get("MemTotal")
    return BoardInfo(
        model=model,
        compatible=compatible,
        module=detect_module(compatible, mem_total),
        l4t=release.get("l4t"),
        jetpack=release.get("jetpack"),
        mem_total_bytes=mem_total,
    )
