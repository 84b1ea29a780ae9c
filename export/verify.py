"""Checking that a bundle's ONNX graph still has the io contract its manifest promises.

``moe2edge.runtime.manifest.verify_bundle`` already recomputes every file's size and sha256 (a
tampered or truncated file fails there). Here the manifest is checked against the graph:
inputs and outputs (names, dtypes), the KV cache contract (names, dtype, heads, head dim)
and the precision it claims (an "int4" manifest over an FP32 graph is a mismatch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from moe2edge.export.bundle import describe_io
from moe2edge.runtime.errors import BundleError
from moe2edge.runtime.manifest import MANIFEST_NAME, read_manifest

DEFAULT_DOMAINS = ("", "ai.onnx")
WEIGHT_TYPES = {
    "int4": {onnx.TensorProto.INT4, onnx.TensorProto.UINT4},
    "int8": {onnx.TensorProto.INT8, onnx.TensorProto.UINT8},
    "fp16": {onnx.TensorProto.FLOAT16},
}


def load_graph(bundle_dir: str | Path, model_file: str) -> onnx.ModelProto:
    path = Path(bundle_dir) / model_file
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # a truncated protobuf raises DecodeError, others OSError
        raise BundleError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc}); "
            "it is truncated or not the exported file: re-export or copy the bundle again"
        ) from exc


def _check_io(bundle_dir, io: dict[str, Any], actual: dict[str, Any]) -> None:
    for side in ("inputs", "outputs"):
        want = {e["name"]: e for e in io[side]}
        have = {e["name"]: e for e in actual[side]}
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        changed = sorted(n for n in set(want) & set(have) if want[n]["dtype"] != have[n]["dtype"])
        if missing or extra or changed:
            raise BundleError(
                f"{bundle_dir}: the graph's {side} differ from the manifest "
                f"(missing {missing}, unexpected {extra}, dtype changed {changed}); re-export"
            )


def _check_kv(bundle_dir, io: dict[str, Any], actual: dict[str, Any]) -> None:
    kv = io["kv_cache"]
    inputs = {e["name"]: e for e in actual["inputs"]}
    outputs = {e["name"]: e for e in actual["outputs"]}
    problems = []
    for layer in range(int(kv["num_layers"])):
        for kind, side in (("past_key", inputs), ("past_value", inputs)):
            name = kv[kind].format(layer=layer)
            entry = side.get(name)
            if entry is None:
                problems.append(f"no input {name}")
                continue
            if entry["dtype"] != kv["dtype"]:
                problems.append(f"{name} is {entry['dtype']}, kv_cache.dtype says {kv['dtype']}")
            shape = entry["shape"]
            for axis, key in ((1, "num_kv_heads"), (3, "head_dim")):
                dim = shape[axis] if len(shape) > axis else None
                if isinstance(dim, int) and dim and dim != int(kv[key]):
                    problems.append(
                        f"{name} has {dim} on axis {axis}, kv_cache.{key} says {kv[key]}"
                    )
        for kind in ("present_key", "present_value"):
            if kv[kind].format(layer=layer) not in outputs:
                problems.append(f"no output {kv[kind].format(layer=layer)}")
    if problems:
        raise BundleError(
            f"{bundle_dir}: the KV cache contract does not match the graph: "
            + "; ".join(problems[:6])
            + ("; ..." if len(problems) > 6 else "")
            + ". Re-export the bundle"
        )


def _check_precision(bundle_dir, manifest: dict[str, Any], model: onnx.ModelProto) -> None:
    weights = (manifest.get("precision") or {}).get("weights")
    types = {t.data_type for t in model.graph.initializer}
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    if weights == "int4" and not (
        types & WEIGHT_TYPES["int4"] or ("com.microsoft", "MatMulNBits") in ops
    ):
        raise BundleError(
            f"{bundle_dir}: the manifest says int4 but the graph has no 4-bit weights"
        )
    if weights in ("int8", "fp16") and not types & WEIGHT_TYPES[weights]:
        raise BundleError(
            f"{bundle_dir}: the manifest says {weights} but the graph has no {weights} weights"
        )
    if weights == "fp32" and types & (WEIGHT_TYPES["int4"] | WEIGHT_TYPES["int8"]):
        raise BundleError(f"{bundle_dir}: the manifest says fp32 but the graph has integer weights")
    foreign = sorted({f"{d}::{op}" for d, op in ops if d not in DEFAULT_DOMAINS})
    if manifest.get("target") == "tensorrt" and foreign:
        raise BundleError(
            f"{bundle_dir}: a TensorRT bundle must hold standard ONNX ops only, found {foreign}"
        )


def verify_io_contract(bundle_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Raise BundleError naming the first way the graph and the manifest disagree."""
    io = manifest["io"]
    model = load_graph(bundle_dir, io["model_file"])
    actual = describe_io(Path(bundle_dir) / io["model_file"])
    _check_io(bundle_dir, io, actual)
    if "kv_cache" in io:
        _check_kv(bundle_dir, io, actual)
    _check_precision(bundle_dir, manifest, model)


def lineage_warning(bundle_dir: str | Path, manifest: dict[str, Any]) -> str | None:
    """A derived bundle whose named parent is present but holds another model, or is gone."""
    parent = (manifest.get("precision") or {}).get("parent")
    if not parent:
        return None
    path = (Path(bundle_dir).resolve().parent / parent["path"]).resolve()
    if not (path / MANIFEST_NAME).is_file():
        return f"parent bundle {path} is not there (the accuracy report needs it)"
    pm = read_manifest(path)
    model = pm["files"].get(pm["io"]["model_file"], {}).get("sha256")
    if model != parent.get("model_sha256"):
        return f"parent bundle {path} now holds another model than the one this was made from"
    return None  # its manifest may have been annotated since (parity, accuracy): same model
