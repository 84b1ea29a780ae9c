"""Deployment on the Jetson: the systemd unit, its installation, and engine builds.

``install_service`` renders ``deploy/moe2edge.service`` (the power mode is set by the
unit's ``ExecStartPre``, the service reads its power budget from
``MOE2EDGE_POWER_BUDGET_W``), writes it to ``/etc/systemd/system`` and enables it.
``build_engine_on_device`` checks free memory, then runs the runtime's TensorRT builder
with Orin defaults (no ONNX pre-checks here: the device relies on TensorRT's own parser
errors; ``moe2edge export engine`` and ``export check-trt`` check on the host). ``deploy/Dockerfile.l4t`` is the container recipe for the same service.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from moe2edge.fileio import atomic_write
from moe2edge.jetson.board import read_board, read_meminfo, require_jetson
from moe2edge.jetson.errors import JetsonError
from moe2edge.jetson.power_modes import (
    DEFAULT_CONF,
    DEFAULT_NVPMODEL,
    find_mode,
    load_nvpmodel_conf,
)

log = logging.getLogger(__name__)

DEPLOY_DIR = Path(__file__).parent / "deploy"
UNIT_NAME = "moe2edge.service"
BUILD_MEMORY_FACTOR = 3.0  # engine builds hold several times the weights (field notes)

# Orin defaults per module: the largest batch the service admits (the governor's concurrency
# ceiling) and the builder's workspace.
ORIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "agx-orin-64gb": {"max_batch": 4, "workspace_gb": 4.0},
    "agx-orin-32gb": {"max_batch": 2, "workspace_gb": 2.0},
    "orin-nx-16gb": {"max_batch": 1, "workspace_gb": 1.0},
}
FALLBACK_DEFAULTS = {"max_batch": 1, "workspace_gb": 1.0}


def render_unit(
    bundle: Path,
    mode_id: int,
    mode_name: str,
    budget_w: float = 30.0,
    user: str = "root",
    python: str = sys.executable,
    nvpmodel: str = "/usr/sbin/nvpmodel",
    serve_args: str | None = None,
    template: Path = DEPLOY_DIR / UNIT_NAME,
) -> str:
    if not template.is_file():
        raise JetsonError(f"the unit template {template} is missing from this install")
    bundle = Path(bundle).resolve()
    return template.read_text(encoding="utf-8").format(
        bundle=bundle,
        mode_id=mode_id,
        mode_name=mode_name,
        budget_w=f"{budget_w:g}",
        user=user,
        workdir=bundle.parent,
        python=python,
        nvpmodel=nvpmodel,
        serve_args=serve_args if serve_args is not None else shlex.quote(str(bundle)),
    )


def install_service(
    bundle: str | Path,
    mode: str = "30W",
    budget_w: float = 30.0,
    *,
    root: Path = Path("/"),
    conf_path: Path = DEFAULT_CONF,
    nvpmodel: str = DEFAULT_NVPMODEL,
    unit_dir: Path = Path("/etc/systemd/system"),
    systemctl: str = "systemctl",
    user: str = "root",
    serve_args: str | None = None,
    dry_run: bool = False,
    euid: int | None = None,
) -> tuple[Path, str]:
    """Write the unit and ``systemctl enable --now`` it. Returns (unit path, unit text)."""
    require_jetson(root)
    bundle = Path(bundle)
    if not (bundle / "manifest.json").is_file():
        raise JetsonError(
            f"{bundle} is not a bundle (no manifest.json); copy the exported bundle first"
        )
    power_mode = find_mode(load_nvpmodel_conf(conf_path), mode)
    nvpmodel_path = shutil.which(nvpmodel) or nvpmodel
    text = render_unit(
        bundle,
        power_mode.id,
        power_mode.name,
        budget_w,
        user,
        sys.executable,
        nvpmodel_path,
        serve_args,
    )
    path = Path(unit_dir) / UNIT_NAME
    if dry_run:
        return path, text
    if (os.geteuid() if euid is None else euid) != 0:
        raise JetsonError(
            "installing a systemd service needs root: run it with sudo "
            "(or pass --dry-run to print the unit)"
        )
    atomic_write(path, text)
    path.chmod(0o644)  # systemd's convention for units (the temporary file was 0600)
    for args in (["daemon-reload"], ["enable", "--now", UNIT_NAME]):
        proc = subprocess.run([systemctl, *args], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise JetsonError(
                f"`systemctl {' '.join(args)}` failed: {proc.stderr.strip() or proc.stdout.strip()}"
            )
    log.info("installed and started %s", path)
    return path, text


def check_build_memory(
    bundle_bytes: int, workspace_bytes: int, root: Path = Path("/")
) -> dict[str, float]:
    """Refuse an engine build that would not fit in available RAM + free swap."""
    mem = read_meminfo(root)
    available = mem.get("MemAvailable", 0) + mem.get("SwapFree", 0)
    needed = bundle_bytes * BUILD_MEMORY_FACTOR + workspace_bytes
    info = {"needed_gb": needed / 1e9, "available_gb": available / 1e9}
    if mem and needed > available:
        raise JetsonError(
            f"building this engine needs about {needed / 1e9:.1f} GB (3x the {bundle_bytes / 1e9:.1f} GB "
            f"model + workspace) but only {available / 1e9:.1f} GB of RAM + swap is free. Add swap "
            "(sudo fallocate -l 16G /swapfile && sudo mkswap /swapfile && sudo swapon /swapfile), stop "
            "the desktop (sudo systemctl isolate multi-user.target), or lower --workspace-gb"
        )
    return info


def build_engine_on_device(
    bundle: str | Path,
    out_dir: str | Path | None = None,
    *,
    root: Path = Path("/"),
    max_batch: int | None = None,
    max_seq_len: int | None = None,
    workspace_gb: float | None = None,
    timing_cache: str | Path | None = None,
    require_device: bool = True,
) -> Path:
    """Check the board and memory, then build with the runtime's TensorRT builder."""
    from moe2edge.runtime.manifest import read_manifest  # the device install has runtime
    from moe2edge.runtime.tensorrt.build import build_engine, model_bytes

    module = None
    if require_device:
        module = read_board(root).module
    defaults = ORIN_DEFAULTS.get(module or "", FALLBACK_DEFAULTS)
    batch = max_batch or defaults["max_batch"]
    workspace = int((workspace_gb or defaults["workspace_gb"]) * 2**30)
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    info = check_build_memory(model_bytes(manifest, bundle), workspace, root)
    log.info(
        "engine build: ~%.1f GB needed, %.1f GB free (RAM + swap)",
        info["needed_gb"],
        info["available_gb"],
    )
    cache = (
        timing_cache or Path.home() / ".cache" / "moe2edge" / f"timing-{module or 'device'}.cache"
    )
    return build_engine(
        bundle,
        out_dir,
        max_batch=batch,
        max_seq_len=max_seq_len,
        workspace_bytes=workspace,
        timing_cache=cache,
    )
