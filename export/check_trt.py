"""A static check of an ONNX graph against TensorRT's ONNX parser, before any build.

The operator list is data (``export/data/tensorrt_onnx_ops.json``: op -> supported, types,
restrictions, for a pinned TensorRT version, with its source named). Every node, in
subgraphs too, is checked for:

- its domain: only the default ONNX domain is parsed (``com.microsoft`` never is);
- its op: in the list and marked supported;
- its data type, where type inference knows it: the first input's type is in the list;
- the restrictions we can decide statically: DequantizeLinear/QuantizeLinear zero points
  must be zero, Reduce* ``axes`` must be an initializer.

The graph's default opset must lie in the parser's range. Models of any size are read
without their external data (only zero points are read, from their files); types come
from ``infer_shapes_path``.

``check_onnx_for_tensorrt`` is the stricter gate ``moe2edge export engine`` runs before a
build: it raises on what TensorRT refuses for certain (ONNX Runtime contrib ops, INT4
below opset 21, UINT4 weights, block scales that are not constants, non-zero zero points).
"""

from __future__ import annotations

import json
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from moe2edge.export.errors import ExportError
from moe2edge.export.weights import read_weight
from moe2edge.runtime.errors import BundleError
from moe2edge.runtime.manifest import read_manifest
from moe2edge.runtime.tensorrt.build import onnx_model_path

OPS_FILE = Path(__file__).with_name("data") / "tensorrt_onnx_ops.json"
DEFAULT_DOMAINS = ("", "ai.onnx")
TYPE_NAMES = {
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.INT4: "INT4",
    onnx.TensorProto.UINT4: "UINT4",
    onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.DOUBLE: "DOUBLE",
    onnx.TensorProto.FLOAT8E4M3FN: "FP8",
}
ZERO_POINT_INPUT = {"DequantizeLinear": 2, "QuantizeLinear": 2}
UNSUPPORTED_DOMAINS = ("com.microsoft",)
NON_CONSTANT_ZERO_POINT = "zero point is not a constant (TensorRT needs it zero)"


@cache
def operator_table() -> dict[str, Any]:
    try:
        return json.loads(OPS_FILE.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read the TensorRT operator list {OPS_FILE}: {exc}") from exc


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _value_types(model: onnx.ModelProto, model_path: Path) -> dict[str, int]:
    """Tensor types, from shape inference by path (in memory it serialises the model, which
    fails above 2 GB and copies the weights below)."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            typed = Path(tmp) / "typed.onnx"
            onnx.shape_inference.infer_shapes_path(str(model_path), str(typed))
            inferred = onnx.load(str(typed), load_external_data=False)
    except Exception:  # inference is a help, not a requirement
        inferred = model
    types = {}
    g = inferred.graph
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    for t in g.initializer:
        types[t.name] = t.data_type
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
    return types


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    found = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    found[node.output[0]] = a.t
    return found


def zero_point_problem(node: onnx.NodeProto, consts: dict, base_dir: Path) -> str | None:
    """TensorRT's quantization is symmetric: a Q/DQ zero point must be a constant of zeros
    (read from the external data in ``base_dir`` where it is stored there)."""
    zp_at = ZERO_POINT_INPUT.get(node.op_type)
    if zp_at is None or len(node.input) <= zp_at or not node.input[zp_at]:
        return None
    zp = consts.get(node.input[zp_at])
    if zp is None:
        return NON_CONSTANT_ZERO_POINT
    if np.asarray(read_weight(zp, base_dir)).astype(np.int64).any():
        return "non-zero zero point: TensorRT quantization is symmetric only"
    return None


def node_problem(
    node: onnx.NodeProto, spec: dict | None, types: dict[str, int], consts: dict, base_dir: Path
) -> str | None:
    """Why TensorRT's parser would refuse this node, or None."""
    if node.domain not in DEFAULT_DOMAINS:
        return f"domain {node.domain!r} is not standard ONNX; TensorRT's parser takes the default domain only"
    if spec is None:
        return "not in TensorRT's ONNX operator list"
    if not spec["supported"]:
        return "listed as not supported by TensorRT's ONNX parser"
    first = node.input[0] if node.input else ""
    if spec.get("types") and first in types:
        name = TYPE_NAMES.get(types[first], str(types[first]))
        if name not in spec["types"] and name != "DOUBLE":  # DOUBLE is cast down by the parser
            return f"input type {name} not among the supported types {spec['types']}"
    zero_point = zero_point_problem(node, consts, base_dir)
    if zero_point:
        return zero_point
    if node.op_type.startswith("Reduce") and len(node.input) > 1 and node.input[1]:
        if node.input[1] not in consts:
            return "axes must be an initializer"
    return None


def check_model(model_path: str | Path) -> dict[str, Any]:
    """``{tensorrt_version, source, opset, nodes, unsupported: [...], errors: [...]}``."""
    table = operator_table()
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:
        raise ExportError(f"cannot read {model_path} ({type(exc).__name__}: {exc})") from exc
    ops, (lo, hi) = table["operators"], table["opset_range"]
    opset = max((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), default=0)
    errors = []
    if not lo <= opset <= hi:
        errors.append(
            f"default opset {opset} is outside TensorRT {table['tensorrt_version']}'s {lo}..{hi}"
        )
    types = _value_types(model, Path(model_path))
    unsupported, count = [], 0
    for graph in _graphs(model.graph):
        consts = _constants(graph)
        for node in graph.node:
            count += 1
            reason = node_problem(
                node, ops.get(node.op_type), types, consts, Path(model_path).parent
            )
            if reason:
                unsupported.append(
                    {
                        "op_type": node.op_type,
                        "domain": node.domain,
                        "name": node.name,
                        "reason": reason,
                    }
                )
    return {
        "tensorrt_version": table["tensorrt_version"],
        "source": f"{table['source']['repository']} {table['source']['file']}",
        "opset": opset,
        "nodes": count,
        "unsupported": unsupported,
        "errors": errors,
    }


def check_onnx_for_tensorrt(model_path: str | Path) -> list[str]:
    """Problems TensorRT's parser would hit, found in seconds instead of after a long parse.

    Raises BundleError for certain failures; returns warnings (a zero point that is not a
    constant). Unlike ``check_model`` it does not judge ops against the pinned operator
    list, which a newer TensorRT on the device may extend.
    """
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:
        raise ExportError(f"cannot read {model_path} ({type(exc).__name__}: {exc})") from exc
    opset = max((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), default=0)
    errors, warnings = [], []
    foreign = sorted(
        {
            f"{node.domain}::{node.op_type}"
            for graph in _graphs(model.graph)
            for node in graph.node
            if node.domain in UNSUPPORTED_DOMAINS
        }
    )
    if foreign:
        errors.append(
            f"ONNX Runtime contrib ops {', '.join(foreign)} are not standard ONNX and TensorRT's parser "
            "rejects them; export the TensorRT bundle with standard ops (DequantizeLinear + MatMul)"
        )
    int4 = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
    for graph in _graphs(model.graph):
        consts = _constants(graph)
        for node in graph.node:
            if node.op_type != "DequantizeLinear" or node.domain not in DEFAULT_DOMAINS:
                continue
            x = consts.get(node.input[0])
            if x is not None and x.data_type in int4:
                if opset < 21:
                    errors.append(
                        f"{node.name}: INT4 DequantizeLinear needs opset >= 21 (model has {opset})"
                    )
                if x.data_type == onnx.TensorProto.UINT4:
                    errors.append(
                        f"{node.name}: UINT4 weights; TensorRT takes signed INT4 (symmetric) only"
                    )
            blocked = any(a.name == "block_size" and a.i > 0 for a in node.attribute)
            if blocked and len(node.input) > 1 and node.input[1] not in consts:
                errors.append(
                    f"{node.name}: block scales must be constant initializers for TensorRT"
                )
            zero_point = zero_point_problem(node, consts, Path(model_path).parent)
            if zero_point == NON_CONSTANT_ZERO_POINT:
                warnings.append(f"{node.name}: {zero_point}")
            elif zero_point:
                errors.append(f"{node.name}: {zero_point}")
    if errors:
        raise BundleError(
            f"{model_path} will not build with TensorRT: "
            + "; ".join(errors[:5])
            + (f" (+{len(errors) - 5} more)" if len(errors) > 5 else "")
        )
    return warnings


def check_bundle_for_engine(bundle_dir: str | Path) -> list[str]:
    """``check_onnx_for_tensorrt`` of a bundle's model (``moe2edge export engine`` runs it)."""
    return check_onnx_for_tensorrt(onnx_model_path(bundle_dir))


def check_bundle(bundle_dir: str | Path) -> dict[str, Any]:
    manifest = read_manifest(bundle_dir)
    result = check_model(Path(bundle_dir) / manifest["io"]["model_file"])
    result["bundle"] = str(bundle_dir)
    result["target"] = manifest.get("target")
    return result


def summary(result: dict[str, Any]) -> str:
    """Human-readable lines: one per distinct problem, with a count."""
    lines = [
        f"{result.get('bundle', '')}: {result['nodes']} nodes checked against TensorRT "
        f"{result['tensorrt_version']}'s ONNX parser (opset {result['opset']})"
    ]
    groups: dict[tuple, list[str]] = {}
    for u in result["unsupported"]:
        groups.setdefault((u["domain"] or "ai.onnx", u["op_type"], u["reason"]), []).append(
            u["name"]
        )
    for (domain, op, reason), names in sorted(groups.items()):
        lines.append(f"  UNSUPPORTED {domain}::{op} x{len(names)} ({reason}), e.g. {names[0]}")
    lines += [f"  ERROR {e}" for e in result["errors"]]
    if not result["unsupported"] and not result["errors"]:
        lines.append("  all nodes supported")
    return "\n".join(lines)
