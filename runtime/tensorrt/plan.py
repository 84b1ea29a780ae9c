"""``engine.json``: what a TensorRT plan was built for and from, and the checks on load.

An engine is tied to one GPU (compute capability) and one TensorRT version, so next to
the plan we write the TensorRT version, GPU, compute capability, the sha256 of the ONNX
model it came from, the precision setup and the optimization profiles.
``check_engine_matches_device`` refuses an engine built elsewhere,
``check_engine_matches_bundle`` one built from another model.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from moe2edge.fileio import sha256_file
from moe2edge.runtime.errors import BundleError
from moe2edge.runtime.tensorrt.precision import PrecisionPlan
from moe2edge.runtime.tensorrt.profiles import Profile

ENGINE_MANIFEST = "engine.json"
ENGINE_FORMAT = "moe2edge.engine"
PLAN_NAME = "model.plan"


def engine_manifest(
    plan_path: Path,
    device: dict[str, Any],
    precision: PrecisionPlan,
    profiles: list[Profile],
    **build: Any,
) -> dict[str, Any]:
    """engine.json: what the plan was built for and from (``build``: model_file, model_sha256, ...)."""
    return {
        "format": ENGINE_FORMAT,
        "format_version": 1,
        "plan": plan_path.name,
        "plan_sha256": sha256_file(plan_path),
        "tensorrt_version": device["tensorrt_version"],
        "gpu_name": device["gpu_name"],
        "compute_capability": device["compute_capability"],
        "sm_count": device.get("sm_count"),
        **build,
        "precision": asdict(precision),
        "profiles": [
            {
                "name": p.name,
                "ranges": {k: list(v) for k, v in p.ranges.items()},
                "shapes": {k: [list(s) for s in v] for k, v in p.shapes.items()},
            }
            for p in profiles
        ],
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def check_engine_matches_device(
    engine_json: dict[str, Any] | str | Path, device: dict[str, Any]
) -> None:
    """Raise BundleError when the engine was built for another GPU or TensorRT version."""
    if not isinstance(engine_json, dict):
        path = Path(engine_json)
        if path.is_dir():
            path = path / ENGINE_MANIFEST
        if not path.is_file():
            raise BundleError(
                f"{path} does not exist: build the engine on this device with "
                "`moe2edge jetson build-engine BUNDLE`"
            )
        engine_json = json.loads(path.read_text(encoding="utf-8"))
    problems = []
    for key, what in (
        ("compute_capability", "compute capability"),
        ("gpu_name", "GPU"),
        ("tensorrt_version", "TensorRT version"),
    ):
        built, here = engine_json.get(key), device.get(key)
        if built is None or here is None or str(built) != str(here):
            problems.append(f"{what}: engine built for {built!r}, this device has {here!r}")
    if problems:
        raise BundleError(
            "this TensorRT engine was built for another device: "
            + "; ".join(problems)
            + ". Engines are tied to one GPU and TensorRT version: rebuild it here with "
            "`moe2edge jetson build-engine BUNDLE`"
        )


def check_engine_matches_bundle(engine_json: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Raise BundleError when the engine came from another ONNX model than the bundle's."""
    model_file = engine_json.get("model_file", "")
    expected = manifest.get("files", {}).get(model_file, {}).get("sha256")
    if expected != engine_json.get("model_sha256"):
        raise BundleError(
            f"the engine was built from another {model_file or 'model'} than this bundle's; rebuild it"
        )
