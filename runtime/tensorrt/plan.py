"""``engine.json``: what a TensorRT plan was built for and from, and the checks on load.

An engine is tied to one GPU (compute capability) and one TensorRT version, so next to
the plan we write the TensorRT version, GPU, compute capability, the sha256 of the ONNX
model it came from, the precision setup and the optimization profiles.
``check_engine_matches_device`` refuses an engine built elsewhere,
``check_engine_matches_bundle`` one built from another model. ``engine.json`` carries a
``checksum`` of its own keys and the plan's size and sha256: ``read_engine_manifest`` and
``read_plan`` refuse an edited engine.json or a plan that is not the one built.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from moe2edge.fileio import member_problem, seal, seal_problem, sha256_file
from moe2edge.runtime.errors import BundleError
from moe2edge.runtime.tensorrt.precision import PrecisionPlan
from moe2edge.runtime.tensorrt.profiles import Profile

ENGINE_MANIFEST = "engine.json"
ENGINE_FORMAT = "moe2edge.engine"
ENGINE_FORMAT_VERSION = 2  # 2: ``checksum`` and ``plan_bytes``, both checked on load
PLAN_NAME = "model.plan"


def engine_manifest(
    plan_path: Path,
    device: dict[str, Any],
    precision: PrecisionPlan,
    profiles: list[Profile],
    **build: Any,
) -> dict[str, Any]:
    """engine.json: what the plan was built for and from (``build``: model_file, model_sha256, ...),
    sealed with its ``checksum``."""
    meta = {
        "format": ENGINE_FORMAT,
        "format_version": ENGINE_FORMAT_VERSION,
        "plan": plan_path.name,
        "plan_sha256": sha256_file(plan_path),
        "plan_bytes": plan_path.stat().st_size,
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
    return seal(meta)


def _rebuild(engine_dir: Path) -> str:
    return f"rebuild it on this device with `moe2edge jetson build-engine` (into {engine_dir})"


def read_engine_manifest(engine_dir: str | Path) -> dict[str, Any]:
    """The parsed, intact ``engine.json`` of ``engine_dir`` (a directory or the file itself)."""
    path = Path(engine_dir)
    if path.is_dir():
        path = path / ENGINE_MANIFEST
    if not path.is_file():
        raise BundleError(
            f"{path} does not exist: build the engine on this device with "
            "`moe2edge jetson build-engine BUNDLE`"
        )
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BundleError(f"{path} is unreadable ({exc}); {_rebuild(path.parent)}") from exc
    if not isinstance(meta, dict) or meta.get("format") != ENGINE_FORMAT:
        raise BundleError(f"{path} is not a {ENGINE_FORMAT} manifest; {_rebuild(path.parent)}")
    version = meta.get("format_version")
    if version not in (1, ENGINE_FORMAT_VERSION):
        raise BundleError(
            f"{path} has engine format version {version!r}, this runtime reads 1 and "
            f"{ENGINE_FORMAT_VERSION}; {_rebuild(path.parent)}"
        )
    if version >= 2 and (why := seal_problem(meta)) is not None:
        raise BundleError(f"{path} is damaged: {why}; {_rebuild(path.parent)}")
    problems = []
    if (why := member_problem(path.parent, meta.get("plan"))) is not None:
        problems.append(f"plan {why}")
    sha = meta.get("plan_sha256")
    if not (isinstance(sha, str) and len(sha) == 64):
        problems.append("plan_sha256 is missing (the plan could not be verified)")
    if version >= 2 and not isinstance(meta.get("plan_bytes"), int):
        problems.append("plan_bytes is missing")
    profiles = meta.get("profiles", [])
    if not isinstance(profiles, list) or not all(
        isinstance(p, dict) and isinstance(p.get("name"), str) for p in profiles
    ):
        problems.append("profiles must be a list of named profiles")
    if problems:
        raise BundleError(f"{path} is malformed: {'; '.join(problems)}; {_rebuild(path.parent)}")
    return meta


def read_plan(engine_dir: str | Path, meta: dict[str, Any]) -> bytes:
    """The plan's bytes, after checking its size and sha256 against ``engine.json``."""
    path = Path(engine_dir) / meta["plan"]
    if not path.is_file():
        raise BundleError(f"the TensorRT plan {path} is missing; {_rebuild(path.parent)}")
    data = path.read_bytes()
    want = meta.get("plan_bytes")
    if want is not None and len(data) != want:
        raise BundleError(
            f"the TensorRT plan {path} has {len(data)} bytes, engine.json says {want} "
            f"(truncated or half-written?); {_rebuild(path.parent)}"
        )
    if hashlib.sha256(data).hexdigest() != meta["plan_sha256"]:
        raise BundleError(
            f"the TensorRT plan {path} does not match the sha256 in engine.json (altered, or "
            f"a build was interrupted); {_rebuild(path.parent)}"
        )
    return data


def check_engine_matches_device(
    engine_json: dict[str, Any] | str | Path, device: dict[str, Any]
) -> None:
    """Raise BundleError when the engine was built for another GPU or TensorRT version."""
    if not isinstance(engine_json, dict):
        engine_json = read_engine_manifest(engine_json)
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
