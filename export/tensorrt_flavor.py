"""The TensorRT flavour of a bundle: standard ONNX ops only, FP16 activations, weight-only INT8/INT4.

TensorRT's ONNX parser takes no ``com.microsoft`` ops (``MatMulNBits``...), so weight-only
quantization is written the standard way (opset 21)::

    W_q (int4, blocks of ``block_size`` along K | int8, per output channel)
      -> DequantizeLinear(W_q, scale_fp16[, zero_point]) -> MatMul(x_fp16, .)

Every MatMul with a constant 2-D weight (the lm_head included) is quantized round-to-nearest
from the FP32 parent's weights; the embedding table stays FP16 (TensorRT keeps a Gather table
dense in the engine; an INT4 table would only shrink the ONNX file). TensorRT takes
symmetric quantization only (zero points must be zero), so ``symmetric=True`` is the default;
the asymmetric form exists for ONNX Runtime experiments and ``check-trt`` flags it.

ONNX Runtime runs the same graph on the CPU (it may fuse DequantizeLinear + MatMul into its
own INT4 kernel, with small numeric differences), so its accuracy is measured here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

from moe2edge.export.derived import (
    check_block_size,
    derived_bundle,
    load_model,
    load_parent,
    model_weight_bytes,
    onnx_runtime_version,
    save_model,
)
from moe2edge.export.errors import ExportError
from moe2edge.export.quantize import to_fp16
from moe2edge.export.rtn import rtn_grid, rtn_levels

log = logging.getLogger(__name__)

TRT_OPSET = 21  # blocked DequantizeLinear (block_size) and INT4 types arrived in opset 21
PRECISIONS = ("fp16", "int8", "int4")


def quantize_blockwise(
    w: np.ndarray, bits: int, block_size: int | None, symmetric: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Round-to-nearest quantization of ``w`` [K, N] along K.

    ``block_size=None`` means one block spanning K (per output channel). Returns
    (q [K, N] int8/uint8 holding the values, scale [K/B, N] or [N], zero point or None).
    """
    k, n = w.shape
    b = block_size or k
    blocks = -(-k // b)
    padded = np.zeros((blocks * b, n), dtype=np.float32)
    padded[:k] = w
    grouped = padded.reshape(blocks, b, n)
    # positive scales (TensorRT's parser refuses others): symmetric is -7..7, see export/rtn.py
    scale, zero = rtn_grid(grouped, bits, symmetric)
    levels = rtn_levels(grouped, scale[:, None, :], zero[:, None, :], bits)
    scale = np.where(scale == 0, 1, scale).astype(np.float32)  # TensorRT refuses zero scales
    if symmetric:  # signed values, zero point 0
        q = (levels - zero[:, None, :]).astype(np.int8)
        zero = None
    else:
        q, zero = levels.astype(np.uint8), zero.astype(np.uint8)
    q = q.reshape(blocks * b, n)[:k]
    if block_size is None:
        scale, zero = scale[0], None if zero is None else zero[0]
    return q, scale, zero


def dequantize(
    q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, block_size: int | None
) -> np.ndarray:
    """The inverse, as DequantizeLinear computes it (for tests and error reports)."""
    k = q.shape[0]
    if block_size is None:
        s, z = scale[None, :], (zero[None, :] if zero is not None else 0)
    else:
        s = np.repeat(scale, block_size, axis=0)[:k]
        z = np.repeat(zero, block_size, axis=0)[:k] if zero is not None else 0
    return (q.astype(np.float32) - np.asarray(z, dtype=np.float32)) * s.astype(np.float32)


def _tensor(values: np.ndarray, name: str, bits: int, signed: bool) -> onnx.TensorProto:
    if bits == 4:
        values = values.astype(ml_dtypes.int4 if signed else ml_dtypes.uint4)
    return numpy_helper.from_array(values, name)


def weight_only_dq(
    model: onnx.ModelProto,
    originals: dict[str, np.ndarray],
    bits: int,
    block_size: int | None,
    symmetric: bool,
) -> int:
    """Replace each MatMul's constant weight by DequantizeLinear(W_q, scale[, zp]); count them."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    new_nodes, replaced, dropped = [], 0, set()
    for node in graph.node:
        name = node.input[1] if node.op_type == "MatMul" and len(node.input) > 1 else None
        if name is None or name not in originals or name not in inits:
            new_nodes.append(node)
            continue
        w = originals[name]
        q, scale, zero = quantize_blockwise(w, bits, block_size, symmetric)
        base = f"{name}_w{bits}"
        q_t = _tensor(q, base + "_q", bits, symmetric)
        scale_t = numpy_helper.from_array(scale.astype(np.float16), base + "_scale")
        new_inits = [q_t, scale_t]
        dq_inputs = [q_t.name, scale_t.name]
        if zero is not None:
            zp_t = _tensor(zero, base + "_zp", bits, signed=False)
            new_inits.append(zp_t)
            dq_inputs.append(zp_t.name)
        attrs = {"axis": 0, "block_size": block_size} if block_size else {"axis": 1}
        dq = helper.make_node(
            "DequantizeLinear", dq_inputs, [base + "_dq"], name=f"{node.name}_DQ_w{bits}", **attrs
        )
        graph.initializer.extend(new_inits)
        new_nodes.append(dq)
        node.input[1] = base + "_dq"
        new_nodes.append(node)
        users[name] -= 1
        if users[name] == 0:
            dropped.add(name)
        replaced += 1
    keep = [i for i in graph.initializer if i.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    del graph.node[:]
    graph.node.extend(new_nodes)
    return replaced


def set_opset(model: onnx.ModelProto, version: int = TRT_OPSET) -> None:
    """Raise the default-domain opset to 21 (and the IR to 10, for INT4 tensors).

    The ops in a decoder graph (Cast, Reshape, Shape, Pad, Squeeze, ...) changed between
    opset 18 and 21 only by new types and attributes whose defaults keep the old meaning,
    so bumping the import is exact; ``onnx.checker`` and ONNX Runtime then validate it.
    """
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and entry.version < version:
            entry.version = version
    model.ir_version = max(model.ir_version, 10)


def matmul_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in inits:
            t = inits[node.input[1]]
            if len(t.dims) == 2:
                out[t.name] = numpy_helper.to_array(t).astype(np.float32)
    return out


def tensorrt_bundle(
    parent_dir: str | Path,
    out_dir: str | Path,
    precision: str = "int4",
    block_size: int | None = 32,
    symmetric: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write the TensorRT-flavoured ``precision`` bundle at ``out_dir`` from the FP32 parent."""
    if precision not in PRECISIONS:
        raise ExportError(
            f"the TensorRT flavour has precisions {list(PRECISIONS)}, not {precision!r}"
        )
    if precision == "int4":
        check_block_size(block_size)
    parent = load_parent(parent_dir)
    model = load_model(parent_dir, parent)
    fp32_bytes = model_weight_bytes(model)
    contrib = sorted({n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if contrib:
        raise ExportError(
            f"{parent_dir} already holds non-standard ops {contrib}; the TensorRT flavour "
            "starts from optimum's standard-op FP32 export (`moe2edge export onnx`)"
        )
    originals = matmul_weights(model)
    bits = {"int8": 8, "int4": 4}.get(precision)
    info: dict[str, Any] = {
        "weights": precision,
        "activations": "fp16",
        "method": "rtn" if bits else "none",
        "block_size": block_size if precision == "int4" else None,
        "embedding": "fp16",
    }
    if bits:
        info.update(
            symmetric=symmetric,
            granularity=f"blocks of {block_size} along K" if bits == 4 else "per output channel",
            format=f"DequantizeLinear(opset {TRT_OPSET}) -> MatMul",
        )

    def build(tmp: Path) -> list[str]:
        nonlocal model
        log.info("TensorRT flavour of %s: %s", parent_dir, precision)
        model = to_fp16(model)
        if bits:
            count = weight_only_dq(
                model, originals, bits, block_size if bits == 4 else None, symmetric
            )
            info["quantized_matmuls"] = count
        set_opset(model)
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"the TensorRT-flavoured graph is not valid ONNX: {exc}") from exc
        info["weight_bytes"] = model_weight_bytes(model)
        info["weight_ratio_vs_fp32"] = round(info["weight_bytes"] / fp32_bytes, 4)
        return save_model(model, tmp)

    extra = {
        "quantization": {
            "tool": "moe2edge.export.tensorrt_flavor (numpy RTN) + onnxruntime "
            f"{onnx_runtime_version()} float16 conversion",
            "onnx": onnx.__version__,
            "opset": TRT_OPSET,
        }
    }
    return derived_bundle(
        parent_dir,
        parent,
        out_dir,
        build,
        info,
        target="tensorrt",
        overwrite=overwrite,
        extra=extra,
    )
