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
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import uses_external_data

from moe2edge.export.derived import (
    DATA_FILE,
    MODEL_FILE,
    check_block_size,
    derived_bundle,
    load_parent,
    model_path,
    model_weight_bytes,
    onnx_runtime_version,
    save_model,
)
from moe2edge.export.errors import ExportError
from moe2edge.export.quantize import fp16_graph
from moe2edge.export.rtn import rtn_grid, rtn_levels
from moe2edge.export.weights import WeightWriter, load_graph, read_weight, weightless

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


def _tensor(values: np.ndarray, name: str, bits: int, signed: bool) -> onnx.TensorProto:
    return numpy_helper.from_array(_typed(values, bits, signed), name)


def _typed(values: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    if bits == 4:
        return values.astype(ml_dtypes.int4 if signed else ml_dtypes.uint4)
    return values


def weight_only_dq(
    model: onnx.ModelProto,
    weights: Callable[[str], np.ndarray],
    targets: set[str],
    bits: int,
    block_size: int | None,
    symmetric: bool,
    store: Callable[[np.ndarray, str], onnx.TensorProto] = numpy_helper.from_array,
) -> int:
    """Replace each MatMul's constant weight in ``targets`` by DequantizeLinear(W_q, scale[,
    zp]); count them. ``weights(name)`` gives the fp32 values, one at a time; each new
    tensor goes through ``store`` (``WeightWriter.add`` writes it to the output's data file)."""
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    new_nodes, replaced, dropped = [], 0, set()
    for node in graph.node:
        name = node.input[1] if node.op_type == "MatMul" and len(node.input) > 1 else None
        if name is None or name not in targets or name not in inits:
            new_nodes.append(node)
            continue
        q, scale, zero = quantize_blockwise(weights(name), bits, block_size, symmetric)
        base = f"{name}_w{bits}"
        new_inits = [
            store(_typed(q, bits, symmetric), base + "_q"),
            store(scale.astype(np.float16), base + "_scale"),
        ]
        if zero is not None:
            new_inits.append(store(_typed(zero, bits, signed=False), base + "_zp"))
        del q, scale, zero
        attrs = {"axis": 0, "block_size": block_size} if block_size else {"axis": 1}
        dq = helper.make_node(
            "DequantizeLinear",
            [t.name for t in new_inits],
            [base + "_dq"],
            name=f"{node.name}_DQ_w{bits}",
            **attrs,
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


def matmul_weights(model: onnx.ModelProto) -> set[str]:
    """Names of the constant 2-D weights of MatMuls (what the flavour quantizes)."""
    inits = {i.name: i for i in model.graph.initializer}
    return {
        node.input[1]
        for node in model.graph.node
        if node.op_type == "MatMul"
        and len(node.input) > 1
        and node.input[1] in inits
        and len(inits[node.input[1]].dims) == 2
    }


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
    model_file = model_path(parent_dir, parent)
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

    def flavour(tmp: Path, work: Path) -> list[str]:
        source = weightless(model_file, work)  # the graph; weights in files beside it
        fp32 = load_graph(source)
        contrib = sorted({n.op_type for n in fp32.graph.node if n.domain not in ("", "ai.onnx")})
        if contrib:
            raise ExportError(
                f"{parent_dir} already holds non-standard ops {contrib}; the TensorRT flavour "
                "starts from optimum's standard-op FP32 export (`moe2edge export onnx`)"
            )
        fp32_bytes = model_weight_bytes(fp32)
        targets = matmul_weights(fp32)
        small = {  # the few weights kept inside the graph: fp16 conversion rewrites them
            t.name: numpy_helper.to_array(t).astype(np.float32)
            for t in fp32.graph.initializer
            if t.name in targets and not uses_external_data(t)
        }
        del fp32
        model, base, stored = fp16_graph(source, work)
        inits = {t.name: t for t in model.graph.initializer}
        writer = WeightWriter(tmp, DATA_FILE)

        def fp32_weight(name: str) -> np.ndarray:
            if name in small:
                return small[name]
            return read_weight(inits[name], base, onnx.TensorProto.FLOAT)

        if bits:
            info["quantized_matmuls"] = weight_only_dq(
                model,
                fp32_weight,
                targets,
                bits,
                block_size if bits == 4 else None,
                symmetric,
                writer.add,
            )
        set_opset(model)
        files = save_model(model, tmp, base, stored, writer)
        try:  # by path: the in-memory checker serialises the model (2 GB cap)
            onnx.checker.check_model(str(tmp / MODEL_FILE))
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"the TensorRT-flavoured graph is not valid ONNX: {exc}") from exc
        info["weight_bytes"] = model_weight_bytes(model)
        info["weight_ratio_vs_fp32"] = round(info["weight_bytes"] / fp32_bytes, 4)
        return files

    def build(tmp: Path) -> list[str]:
        log.info("TensorRT flavour of %s: %s", parent_dir, precision)
        with tempfile.TemporaryDirectory(dir=tmp) as work:
            return flavour(tmp, Path(work))

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
