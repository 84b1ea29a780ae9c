"""Build a TensorRT engine from a bundle's ONNX model, on the device that will run it.

An engine is tied to one GPU and one TensorRT version, so it is built on the target (a
Jetson) from the bundle exported on the host: parse the ONNX, add the prefill and decode
profiles (``profiles``), set the typing and flags of the bundle's precision
(``precision``), build, and write the plan with its ``engine.json`` (``plan``).

The ONNX model is not inspected here (the runtime never imports ``onnx``): the device-side
build relies on TensorRT's own parser errors; ``moe2edge export engine`` runs the ONNX
pre-checks of ``moe2edge.export.check_trt`` first. ``tensorrt`` is imported only when
``build_engine`` runs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from moe2edge.fileio import DiskFullError, atomic_write, atomic_write_json, sha256_file
from moe2edge.runtime.errors import BundleError
from moe2edge.runtime.manifest import read_manifest
from moe2edge.runtime.tensorrt.device import device_info, import_tensorrt
from moe2edge.runtime.tensorrt.plan import ENGINE_MANIFEST, PLAN_NAME, engine_manifest
from moe2edge.runtime.tensorrt.precision import precision_plan
from moe2edge.runtime.tensorrt.profiles import check_profiles_cover_inputs, profiles_from_manifest

log = logging.getLogger(__name__)


def model_file(manifest: dict[str, Any], bundle_dir: Path) -> str:
    """The bundle's ONNX model file name (``io.model_file``, else the one ``.onnx`` file)."""
    for src in (manifest.get("io", {}), manifest.get("model", {}), manifest):
        if isinstance(src, dict) and isinstance(src.get("model_file"), str):
            return src["model_file"]
    onnx_files = sorted(n for n in manifest.get("files", {}) if n.endswith(".onnx"))
    if "model.onnx" in onnx_files:
        return "model.onnx"
    if len(onnx_files) == 1:
        return onnx_files[0]
    raise BundleError(
        f"{bundle_dir}: cannot tell the ONNX model among {onnx_files or 'no .onnx files'}"
    )


def onnx_model_path(bundle_dir: str | Path, manifest: dict[str, Any] | None = None) -> Path:
    """The bundle's ONNX model, which must exist, with its external data files (models
    above 2 GB keep the weights in ``model.onnx_data``, which TensorRT's parser reads from
    the model's folder: a missing one would fail the parse with a less clear message)."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir) if manifest is None else manifest
    name = model_file(manifest, bundle_dir)
    path = bundle_dir / name
    data = [n for n in manifest.get("files", {}) if n != name and n.startswith(name)]
    missing = [str(bundle_dir / n) for n in [name, *data] if not (bundle_dir / n).is_file()]
    if missing:
        raise BundleError(f"{', '.join(missing)} missing; copy the whole bundle directory")
    return path


def model_bytes(manifest: dict[str, Any], bundle_dir: Path) -> int:
    """ONNX model plus its external data: what the build must hold in memory."""
    files = manifest.get("files", {})
    total = sum(
        int(v.get("bytes", 0))
        for k, v in files.items()
        if k.endswith((".onnx", ".data", ".onnx_data", ".bin"))
    )
    return total or sum(p.stat().st_size for p in Path(bundle_dir).glob("*.onnx*"))


def _load_timing_cache(config: Any, path: Path | None) -> Any:
    data = b""
    if path is not None and path.is_file():
        data = path.read_bytes()
        log.info("timing cache: reusing %s (%d bytes)", path, len(data))
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, False)
    return cache


def _save_timing_cache(config: Any, path: Path | None) -> None:
    if path is None:
        return
    cache = config.get_timing_cache()
    if cache is None:
        return
    atomic_write(path, bytes(cache.serialize()))
    log.info("timing cache: saved %s", path)


def build_engine(
    bundle_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    max_batch: int = 1,
    max_seq_len: int | None = None,
    max_prefill: int | None = None,
    workspace_bytes: int = 2 << 30,
    timing_cache: str | Path | None = None,
    optimization_level: int = 3,
    verbose: bool = False,
) -> Path:
    """Parse the bundle's ONNX, build a plan with prefill/decode profiles, write engine.json.

    Returns the path of ``engine.json``. Raises TensorRTUnavailable (a BundleError) without
    TensorRT or a GPU, BundleError for a bundle TensorRT cannot take.
    """
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    out = Path(out_dir) if out_dir is not None else bundle_dir / "engine"
    name = model_file(manifest, bundle_dir)
    onnx_path = onnx_model_path(bundle_dir, manifest)
    profiles = profiles_from_manifest(manifest, max_batch, max_seq_len, max_prefill)

    trt = import_tensorrt()
    device = device_info()
    major = int(str(trt.__version__).split(".")[0])
    prec = precision_plan(manifest.get("precision", "fp32"), major)
    gpu = f"{device['gpu_name']} (sm {device['compute_capability']})"
    log.info("building %s for %s with TensorRT %s: %s", name, gpu, trt.__version__, prec.note)

    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if prec.strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BundleError(f"TensorRT could not parse {onnx_path}: " + "; ".join(errors[:5]))
    inputs = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        inputs[t.name] = tuple(int(d) for d in t.shape)
    check_profiles_cover_inputs(profiles, inputs)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    config.builder_optimization_level = int(optimization_level)
    for flag in prec.flags:
        if not hasattr(trt.BuilderFlag, flag):
            raise BundleError(f"this TensorRT ({trt.__version__}) has no BuilderFlag.{flag}")
        config.set_flag(getattr(trt.BuilderFlag, flag))
    cache_path = Path(timing_cache) if timing_cache else None
    _load_timing_cache(config, cache_path)
    for prof in profiles:
        p = builder.create_optimization_profile()
        for tensor, (mn, opt, mx) in prof.shapes.items():
            if tensor in inputs:
                p.set_shape(tensor, mn, opt, mx)
        if config.add_optimization_profile(p) < 0:  # -1: TensorRT found the profile invalid
            raise BundleError(f"TensorRT rejected the {prof.name} optimization profile")

    start = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BundleError(
            "TensorRT failed to build the engine (see the log above); a build killed "
            "for memory needs swap or a smaller --workspace-gb"
        )
    seconds = time.monotonic() - start
    # The plan, then engine.json with its sha256: a kill between the two leaves a plan that the
    # old engine.json's sha256 refuses, so nothing half-built is ever loaded.
    try:
        plan_path = atomic_write(out / PLAN_NAME, bytes(serialized))
        _save_timing_cache(config, cache_path)
        sha = manifest.get("files", {}).get(name, {}).get("sha256") or sha256_file(onnx_path)
        meta = engine_manifest(
            plan_path,
            device,
            prec,
            profiles,
            bundle=str(bundle_dir),
            model_file=name,
            model_sha256=sha,
            workspace_bytes=int(workspace_bytes),
            builder_optimization_level=optimization_level,
            build_seconds=round(seconds, 1),
        )
        path = atomic_write_json(out / ENGINE_MANIFEST, meta)
    except DiskFullError as exc:
        raise BundleError(f"TensorRT engine {out}: {exc.strerror}") from exc
    log.info("engine written to %s in %.0f s", plan_path, seconds)
    return path
