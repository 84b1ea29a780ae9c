"""Build a TensorRT engine from a bundle's ONNX model, on the device that will run it.

An engine is tied to one GPU (compute capability) and one TensorRT version, so it is built
on the target (a Jetson) from the bundle exported on the host. Next to the plan we write
``engine.json``: TensorRT version, GPU, compute capability, the sha256 of the ONNX model it
came from, the precision setup and the optimization profiles. ``check_engine_matches_device``
refuses an engine built elsewhere.

Precision (TensorRT 10):

* ``fp32``: a weakly typed network, no precision flags (TF32 stays on by default).
* ``fp16``: weakly typed with ``BuilderFlag.FP16`` (TensorRT 11 removed the precision flags
  and types every network strongly: the ONNX must then carry FP16 itself).
* ``int8`` / ``int4`` weight-only: the graph carries the quantization as
  ``DequantizeLinear`` (opset 21; INT4 with ``block_size``) feeding ``MatMul``. That is
  explicit quantization, which TensorRT wants in a *strongly typed* network with no
  precision flags: types come from the graph, the dequantized weights take the scale's
  type (FP16 scales -> FP16 GEMMs). TensorRT requires the scales to be build-time
  constants and the zero points to be zero (symmetric), and its ONNX parser does not
  take ONNX Runtime's ``com.microsoft`` ops (``MatMulNBits``, ``GroupQueryAttention``):
  ``check_onnx_for_tensorrt`` reports both before a long build.

Optimization profiles come from the manifest's ``io`` inputs (symbolic dims such as
``batch_size``, ``sequence_length``, ``past_sequence_length``): one profile for prefill
(many new tokens) and one for decode (one new token, long past).

The manifest fields read here (export owns the format; others are ignored)::

    "io": {"model_file": "model.onnx", "max_sequence_length": 4096,
           "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch_size", "sequence_length"]},
                      {"name": "past_key_values.0.key", "shape": ["batch_size", 8, "past_sequence_length", 128]}, ...]}
    "precision": {"weights": "int4", "activations": "fp16", "block_size": 32} (or "int4")

Nothing here imports torch, transformers, distill, export or jetson; ``tensorrt`` is
imported only inside the functions that build or inspect engines.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moe2edge.runtime.errors import BundleError
from moe2edge.runtime.manifest import atomic_write_text, read_manifest, sha256_file

log = logging.getLogger(__name__)

ENGINE_MANIFEST = "engine.json"
ENGINE_FORMAT = "moe2edge.engine"
PLAN_NAME = "model.plan"
NOT_INSTALLED = (
    "TensorRT is not installed; engines are built on the target device: copy the bundle to the "
    "Jetson and run `moe2edge jetson build-engine BUNDLE` there (JetPack ships TensorRT and its "
    "Python bindings: `sudo apt install python3-libnvinfer`)"
)


class TensorRTUnavailable(BundleError):
    """No TensorRT, CUDA driver or GPU here."""


# --- profiles -------------------------------------------------------------------------


@dataclass
class Profile:
    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(
        default_factory=dict
    )


def _dim_kind(dim: str) -> str:
    d = dim.lower().replace(" ", "")
    if "batch" in d:
        return "batch"
    if (
        "total" in d
        or ("past" in d and "+" in d)
        or d in ("attention_mask_length", "all_sequence_length")
    ):
        return "total"
    if "past" in d or "cache" in d:
        return "past"
    if "seq" in d or "token" in d or d in ("length", "len"):
        return "new"
    raise BundleError(
        f"input dimension {dim!r} is neither batch, sequence, past nor total length: cannot derive "
        "TensorRT profiles; name it batch_size / sequence_length / past_sequence_length / "
        "total_sequence_length in the manifest's io.inputs"
    )


def manifest_inputs(manifest: dict[str, Any]) -> dict[str, list[Any]]:
    """name -> shape (ints and symbolic names) from ``io.inputs`` (a list or a mapping)."""
    io = manifest.get("io", {})
    raw = io.get("inputs")
    if raw is None:
        raise BundleError("the manifest's io has no 'inputs': cannot derive TensorRT profiles")
    out: dict[str, list[Any]] = {}
    items = raw.items() if isinstance(raw, dict) else ((r.get("name"), r) for r in raw)
    for name, spec in items:
        shape = spec.get("shape") if isinstance(spec, dict) else spec
        if name is None or shape is None:
            raise BundleError(f"io.inputs entry {spec!r} needs a name and a shape")
        out[str(name)] = list(shape)
    return out


def max_context(manifest: dict[str, Any]) -> int:
    """The bundle's context length (``io.max_sequence_length``, else model/generation fields)."""
    io, gen, model = (
        manifest.get("io", {}),
        manifest.get("generation", {}),
        manifest.get("model", {}),
    )
    for src, key in (
        (io, "max_sequence_length"),
        (gen, "max_length"),
        (model, "max_position_embeddings"),
        (model, "context_length"),
    ):
        if isinstance(src, dict) and src.get(key):
            return int(src[key])
    return 4096


def profiles_from_manifest(
    manifest: dict[str, Any],
    max_batch: int = 1,
    max_seq_len: int | None = None,
    max_prefill: int | None = None,
    opt_prefill: int | None = None,
) -> list[Profile]:
    """A prefill and a decode optimization profile covering every dynamic input.

    prefill: 1..max_prefill new tokens over a past of 0..max_seq_len-1 (a cached system
    prompt); decode: exactly one new token over a past of 1..max_seq_len-1.
    """
    ctx = max_seq_len or max_context(manifest)
    prefill = min(max_prefill or ctx, ctx)
    opt_p = min(opt_prefill or min(128, prefill), prefill)
    if ctx < 2 or max_batch < 1:
        raise BundleError(f"need max_seq_len >= 2 and max_batch >= 1 (got {ctx}, {max_batch})")
    ranges = {
        "prefill": {
            "batch": (1, 1, max_batch),
            "new": (1, opt_p, prefill),
            "past": (0, 0, ctx - 1),
            "total": (1, opt_p, ctx),
        },
        "decode": {
            "batch": (1, max_batch, max_batch),
            "new": (1, 1, 1),
            "past": (1, ctx // 2, ctx - 1),
            "total": (2, ctx // 2 + 1, ctx),
        },
    }
    profiles = []
    for pname, kinds in ranges.items():
        prof = Profile(pname)
        for name, shape in manifest_inputs(manifest).items():
            if any(isinstance(d, int) and d <= 0 for d in shape) or any(d is None for d in shape):
                raise BundleError(
                    f"input {name} has an unnamed dynamic dimension {shape}: name it in the ONNX "
                    "export (batch_size, sequence_length, past_sequence_length, ...)"
                )
            if all(isinstance(d, int) for d in shape):
                continue  # static input: no profile entry needed
            dims = [
                [d, d, d] if isinstance(d, int) else list(kinds[_dim_kind(str(d))]) for d in shape
            ]
            prof.shapes[name] = tuple(tuple(int(dim[i]) for dim in dims) for i in range(3))  # type: ignore[assignment]
        profiles.append(prof)
    return profiles


def check_profiles_cover_inputs(
    profiles: list[Profile], network_inputs: dict[str, tuple[int, ...]]
) -> None:
    """Every dynamic network input (a -1 dim) needs a shape in every profile, of its rank."""
    problems = []
    for prof in profiles:
        for name, shape in network_inputs.items():
            if any(d < 0 for d in shape) and name not in prof.shapes:
                problems.append(f"{prof.name}: no shape for dynamic input {name}{list(shape)}")
            elif name in prof.shapes and len(prof.shapes[name][0]) != len(shape):
                problems.append(
                    f"{prof.name}: {name} has rank {len(shape)}, profile gives {len(prof.shapes[name][0])}"
                )
        for name in prof.shapes:
            if name not in network_inputs:
                log.warning(
                    "profile %s names %s, which the ONNX model does not have", prof.name, name
                )
    if problems:
        raise BundleError(
            "the manifest's io.inputs do not match the ONNX model: " + "; ".join(problems)
        )


# --- precision --------------------------------------------------------------------------


@dataclass
class PrecisionPlan:
    weights: str
    strongly_typed: bool
    flags: list[str]
    note: str


def normalize_precision(precision: Any) -> tuple[str, str]:
    """(weights, activations) from ``"int4"``, ``"int4-awq"``, ``{"weights": ...}``."""
    if isinstance(precision, dict):
        weights = str(
            precision.get("weights") or precision.get("dtype") or precision.get("name") or "fp32"
        )
        acts = str(precision.get("activations") or precision.get("compute") or "")
    else:
        weights, acts = str(precision), ""
    weights = weights.lower()
    m = re.match(r"(fp32|float32|fp16|float16|bf16|bfloat16|int8|int4|q4|w4a16|w8a16)", weights)
    if not m:
        raise BundleError(
            f"unknown precision {precision!r}; expected fp32, fp16, bf16, int8 or int4"
        )
    w = {
        "float32": "fp32",
        "float16": "fp16",
        "bfloat16": "bf16",
        "q4": "int4",
        "w4a16": "int4",
        "w8a16": "int8",
    }.get(m.group(1), m.group(1))
    a = acts.lower() or ("fp32" if w == "fp32" else "fp16" if w != "bf16" else "bf16")
    return w, a


def precision_plan(precision: Any, trt_major: int = 10) -> PrecisionPlan:
    """Network typing and builder flags for a bundle precision (names of ``trt.BuilderFlag``)."""
    weights, acts = normalize_precision(precision)
    if trt_major >= 11:
        return PrecisionPlan(
            weights,
            True,
            [],
            "TensorRT 11 types every network strongly: the ONNX graph's types decide",
        )
    if weights in ("int8", "int4"):
        return PrecisionPlan(
            weights,
            True,
            [],
            f"{weights} weight-only via DequantizeLinear: strongly typed, no precision flags; "
            f"GEMMs run in the scales' type ({acts})",
        )
    if weights == "fp16":
        return PrecisionPlan(weights, False, ["FP16"], "weakly typed, FP16 kernels allowed")
    if weights == "bf16":
        return PrecisionPlan(weights, False, ["BF16"], "weakly typed, BF16 kernels allowed")
    return PrecisionPlan(weights, False, [], "FP32 (TF32 allowed)")


# --- ONNX pre-checks (needs the `onnx` package; skipped without it) ----------------------

UNSUPPORTED_DOMAINS = ("com.microsoft",)


def check_onnx_for_tensorrt(model_path: str | Path) -> list[str]:
    """Problems TensorRT's parser would hit, found in seconds instead of after a long parse.

    Returns warnings; raises BundleError for certain failures. Without ``onnx`` installed,
    returns a warning and checks nothing.
    """
    try:
        onnx = importlib.import_module("onnx")
    except ImportError:
        return ["the onnx package is not installed: skipped the ONNX pre-checks"]
    model = onnx.load(str(model_path), load_external_data=False)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    inits = {i.name: i for i in model.graph.initializer}
    errors, warnings = [], []
    foreign = sorted(
        {f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain in UNSUPPORTED_DOMAINS}
    )
    if foreign:
        errors.append(
            f"ONNX Runtime contrib ops {', '.join(foreign)} are not standard ONNX and TensorRT's parser "
            "rejects them; export the TensorRT bundle with standard ops (DequantizeLinear + MatMul)"
        )
    int4 = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        x = inits.get(node.input[0])
        blocked = any(a.name == "block_size" and a.i > 0 for a in node.attribute)
        if x is not None and x.data_type in int4:
            if opset < 21:
                errors.append(
                    f"{node.name}: INT4 DequantizeLinear needs opset >= 21 (model has {opset})"
                )
            if x.data_type == onnx.TensorProto.UINT4:
                errors.append(
                    f"{node.name}: UINT4 weights; TensorRT takes signed INT4 (symmetric) only"
                )
        if blocked and len(node.input) > 1 and node.input[1] not in inits:
            errors.append(f"{node.name}: block scales must be constant initializers for TensorRT")
        if len(node.input) > 2 and node.input[2]:
            zp = inits.get(node.input[2])
            if zp is None:
                warnings.append(
                    f"{node.name}: zero point is not a constant; TensorRT needs it all zeros"
                )
            else:
                values = onnx.numpy_helper.to_array(zp)
                if values.any():
                    errors.append(
                        f"{node.name}: non-zero zero point; TensorRT quantization is symmetric only"
                    )
    if errors:
        raise BundleError(
            f"{model_path} will not build with TensorRT: "
            + "; ".join(errors[:5])
            + (f" (+{len(errors) - 5} more)" if len(errors) > 5 else "")
        )
    return warnings


# --- device and engine manifest ---------------------------------------------------------


def _import_tensorrt() -> Any:
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        raise TensorRTUnavailable(NOT_INSTALLED) from exc


def cuda_device_info(index: int = 0) -> dict[str, Any]:
    """GPU name, compute capability, SM count and memory via the CUDA driver (libcuda)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise TensorRTUnavailable(
            "no CUDA driver (libcuda.so.1) on this machine; engines are built on the target device"
        ) from exc

    def check(rc: int, what: str) -> None:
        if rc != 0:
            raise TensorRTUnavailable(
                f"CUDA driver call {what} failed with error {rc}: no usable GPU here"
            )

    check(lib.cuInit(0), "cuInit")
    dev = ctypes.c_int()
    check(lib.cuDeviceGet(ctypes.byref(dev), index), "cuDeviceGet")
    name = ctypes.create_string_buffer(256)
    check(lib.cuDeviceGetName(name, 256, dev), "cuDeviceGetName")
    attrs = {}
    for key, attr in (("major", 75), ("minor", 76), ("sm_count", 16)):
        v = ctypes.c_int()
        check(lib.cuDeviceGetAttribute(ctypes.byref(v), attr, dev), "cuDeviceGetAttribute")
        attrs[key] = v.value
    mem = ctypes.c_size_t()
    check(lib.cuDeviceTotalMem_v2(ctypes.byref(mem), dev), "cuDeviceTotalMem")
    return {
        "gpu_name": name.value.decode(),
        "compute_capability": f"{attrs['major']}.{attrs['minor']}",
        "sm_count": attrs["sm_count"],
        "total_memory_bytes": mem.value,
    }


def device_info() -> dict[str, Any]:
    """What an engine must match here: TensorRT version plus the GPU."""
    trt = _import_tensorrt()
    return {"tensorrt_version": trt.__version__, **cuda_device_info()}


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
            {"name": p.name, "shapes": {k: [list(s) for s in v] for k, v in p.shapes.items()}}
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


# --- build ----------------------------------------------------------------------------------


def model_file(manifest: dict[str, Any], bundle_dir: Path) -> str:
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(bytes(cache.serialize()))
    tmp.replace(path)
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
    onnx_path = bundle_dir / name
    if not onnx_path.is_file():
        raise BundleError(f"{onnx_path} is missing; copy the whole bundle directory")
    profiles = profiles_from_manifest(manifest, max_batch, max_seq_len, max_prefill)
    for w in check_onnx_for_tensorrt(onnx_path):
        log.warning("%s", w)

    trt = _import_tensorrt()
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
        config.add_optimization_profile(p)

    start = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BundleError(
            "TensorRT failed to build the engine (see the log above); a build killed "
            "for memory needs swap or a smaller --workspace-gb"
        )
    seconds = time.monotonic() - start
    out.mkdir(parents=True, exist_ok=True)
    plan_path = out / PLAN_NAME
    tmp = plan_path.with_suffix(".tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(plan_path)
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
    path = out / ENGINE_MANIFEST
    atomic_write_text(path, json.dumps(meta, indent=2) + "\n")
    log.info("engine written to %s in %.0f s", plan_path, seconds)
    return path
