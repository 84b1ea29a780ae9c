"""``moe2edge jetson doctor``: is this Jetson ready to build and serve a bundle?

Checks L4T/JetPack, CUDA, TensorRT and onnxruntime (versions, execution providers), the
power mode, memory and swap, clocks and which power telemetry source works. Each check is
a row with a status (ok / warn / fail / info) and, where something is wrong, what to do.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moe2edge.jetson import power_modes, telemetry
from moe2edge.jetson.board import read_board, read_meminfo
from moe2edge.jetson.errors import JetsonError

log = logging.getLogger(__name__)


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail | info
    value: str
    hint: str = ""


def _module_version(name: str) -> tuple[Any, str | None]:
    try:
        module = importlib.import_module(name)
    except ImportError:
        return None, None
    return module, str(getattr(module, "__version__", "unknown"))


def _libnvinfer_version(root: Path) -> str | None:
    for d in ("usr/lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu/nvidia", "usr/local/lib"):
        for lib in sorted((root / d).glob("libnvinfer.so.*")) if (root / d).is_dir() else []:
            m = re.match(r"libnvinfer\.so\.(\d+(?:\.\d+)*)$", lib.name)
            if m and m.group(1).count(".") >= 1:
                return m.group(1)
    return None


def check_board(root: Path) -> list[Check]:
    board = read_board(root)  # raises JetsonError off a Jetson
    rows = [Check("board", "ok", f"{board.model} ({board.module or 'module not in the planner'})")]
    if board.l4t:
        major = int(board.l4t.split(".")[0])
        hint = (
            ""
            if major >= 36
            else (
                "JetPack 5 ships TensorRT 8.5, which lacks INT4 weight-only (DequantizeLinear with "
                "block_size); INT4 bundles need JetPack 6 (TensorRT 10)"
            )
        )
        rows.append(
            Check(
                "L4T / JetPack",
                "ok" if major >= 36 else "warn",
                f"L4T {board.l4t} / JetPack {board.jetpack}",
                hint,
            )
        )
    else:
        rows.append(
            Check(
                "L4T / JetPack", "warn", "unknown", "/etc/nv_tegra_release is missing or unreadable"
            )
        )
    return rows


def check_cuda(root: Path) -> Check:
    path = root / "usr/local/cuda/version.json"
    try:
        version = json.loads(path.read_text())["cuda"]["version"]
        return Check("CUDA", "ok", version)
    except (OSError, KeyError, ValueError):
        return Check(
            "CUDA",
            "warn",
            "not found",
            f"no {path}; install JetPack's CUDA (sudo apt install nvidia-jetpack)",
        )


def check_tensorrt(root: Path) -> Check:
    _, version = _module_version("tensorrt")
    lib = _libnvinfer_version(root)
    if version:
        major = int(version.split(".")[0])
        if major < 10:
            return Check(
                "TensorRT", "warn", version, "TensorRT < 10 cannot take INT4 weight-only bundles"
            )
        return Check("TensorRT", "ok", version)
    if lib:
        return Check(
            "TensorRT",
            "warn",
            f"libnvinfer {lib}, no Python bindings",
            "sudo apt install python3-libnvinfer (inside a venv: --system-site-packages)",
        )
    return Check(
        "TensorRT", "fail", "not installed", "sudo apt install nvidia-tensorrt python3-libnvinfer"
    )


def check_onnxruntime() -> Check:
    ort, version = _module_version("onnxruntime")
    if ort is None:
        return Check("onnxruntime", "fail", "not installed", "pip install 'moe2edge[runtime]'")
    providers = list(ort.get_available_providers())
    gpu = [p for p in providers if p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")]
    value = f"{version}, providers: {', '.join(providers)}"
    if not gpu:
        return Check(
            "onnxruntime",
            "warn",
            value,
            "CPU only: PyPI's aarch64 wheel has no CUDA; install the JetPack 6 onnxruntime-gpu wheel "
            "(NVIDIA's Jetson wheels) to run bundles on the GPU without a TensorRT engine",
        )
    return Check("onnxruntime", "ok", value)


def check_power_mode(root: Path, conf_path: Path, nvpmodel: str) -> Check:
    try:
        mode_id, name = power_modes.query_mode(nvpmodel, root)
    except (JetsonError, OSError) as exc:
        return Check("power mode", "warn", "unknown", str(exc))
    try:
        conf = power_modes.load_nvpmodel_conf(conf_path)
        mode = conf.by_id(mode_id) if mode_id is not None else None
    except JetsonError as exc:
        return Check("power mode", "warn", f"{mode_id} ({name})", str(exc))
    if mode is None:
        return Check(
            "power mode", "warn", f"{mode_id} ({name})", f"mode {mode_id} is not in {conf_path}"
        )
    s = mode.summary()
    value = (
        f"{mode.id} ({mode.name}): {s['cpu_online']} CPU cores, GPU max "
        f"{s['gpu_max_mhz'] or 'hw max'} MHz, EMC cap {s['emc_max_mhz'] or 'none'}"
    )
    if mode.watts is None or mode.watts > 30:
        return Check(
            "power mode",
            "info",
            value,
            "above the 30 W budget: `sudo moe2edge jetson mode --set 30W` (or let the governor cap it)",
        )
    return Check("power mode", "ok", value)


def check_memory(root: Path) -> list[Check]:
    mem = read_meminfo(root)
    if not mem:
        return [Check("memory", "warn", "unknown", "/proc/meminfo unreadable")]
    gib = 2**30
    total, avail = mem.get("MemTotal", 0), mem.get("MemAvailable", 0)
    swap = mem.get("SwapTotal", 0)
    rows = [Check("memory", "ok", f"{avail / gib:.1f} GiB available of {total / gib:.1f} GiB")]
    if swap == 0:
        rows.append(
            Check(
                "swap",
                "warn",
                "none",
                "engine builds need several times the weights in RAM; add swap: sudo fallocate -l 16G "
                "/swapfile && sudo chmod 600 /swapfile && sudo mkswap /swapfile && sudo swapon /swapfile",
            )
        )
    else:
        rows.append(
            Check(
                "swap", "ok", f"{mem.get('SwapFree', 0) / gib:.1f} GiB free of {swap / gib:.1f} GiB"
            )
        )
    return rows


def check_clocks(root: Path) -> Check:
    c = power_modes.read_clocks(root)
    cur = [v for v in c["cpu_cur_mhz"].values() if v]
    value = (
        f"{len(c['cpu_online'])} CPUs online (up to {max(cur):.0f} MHz now)"
        if cur
        else f"{len(c['cpu_online'])} CPUs online"
    )
    value += f", GPU {c['gpu_cur_mhz'] or '?'} / {c['gpu_max_mhz'] or '?'} MHz"
    if c["emc_cur_mhz"]:
        value += f", EMC {c['emc_cur_mhz']:.0f} MHz"
    return Check("clocks", "info", value)


def check_telemetry(root: Path, tegrastats: str) -> Check:
    try:
        src = telemetry.open_source("auto", root, tegrastats)
    except JetsonError as exc:
        return Check("power telemetry", "warn", "none", str(exc))
    try:
        rails = src.read_rails()
    finally:
        src.close()
    total = telemetry.module_total_mw(rails) / 1000
    return Check(
        "power telemetry", "ok", f"{src.name}: {total:.1f} W now ({', '.join(sorted(rails))})"
    )


def run_doctor(
    root: Path = Path("/"),
    conf_path: Path = power_modes.DEFAULT_CONF,
    nvpmodel: str = power_modes.DEFAULT_NVPMODEL,
    tegrastats: str = "tegrastats",
) -> list[Check]:
    root = Path(root)
    rows = check_board(root)
    rows += [
        check_cuda(root),
        check_tensorrt(root),
        check_onnxruntime(),
        check_power_mode(root, Path(conf_path), nvpmodel),
    ]
    rows += check_memory(root)
    rows += [check_clocks(root), check_telemetry(root, tegrastats)]
    return rows


def format_checks(rows: list[Check]) -> str:
    width = max(len(r.name) for r in rows)
    lines = []
    for r in rows:
        lines.append(f"[{r.status:^4}] {r.name:<{width}}  {r.value}")
        if r.hint:
            lines.append(f"       {'':<{width}}  -> {r.hint}")
    return "\n".join(lines)


def to_json(rows: list[Check]) -> list[dict[str, str]]:
    return [asdict(r) for r in rows]
