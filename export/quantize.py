"""Quantized ONNX Runtime bundles from an FP32 bundle, with onnxruntime's own tools.

Every result is a NEW bundle (written atomically by ``moe2edge.export.bundle.write_bundle``) whose
manifest names its parent: ``precision.parent = {path, manifest_sha256, model_sha256}``.

| precision | method  | tool (onnxruntime 1.32)                                             |
|-----------|---------|---------------------------------------------------------------------|
| fp16      | -       | ``transformers.float16.convert_float_to_float16`` (logits stay fp32) |
| int8      | dynamic | ``quantize_dynamic`` on weight MatMuls + the embedding Gather       |
| int8      | static  | ``quantize_static`` QDQ on weight MatMuls, MinMax calibration       |
| int4      | rtn     | ``MatMulNBitsQuantizer`` + ``DefaultWeightOnlyQuantConfig``          |
| int4      | hqq     | ``MatMulNBitsQuantizer`` + ``HQQWeightOnlyQuantConfig``              |
| int4      | gptq    | ``moe2edge.export.gptq`` (ORT's GPTQ is RTN in 1.32), calibrated through ORT |

INT4 quantizes every MatMul with a constant weight, the lm_head included, and (by default)
the embedding table through ``GatherBlockQuantized`` with round-to-nearest: HQQ refuses
Gather and GPTQ needs activations, which a table lookup has none of.

Weights pass one at a time (FP16: ``weights``) or a layer at a time (ORT's INT8 dynamic and
INT4 quantizers: ``layerwise``; GPTQ), so models above 2 GB export in bounded memory
(docs/export.md, "Models above 2 GB"); INT8 static is ORT's whole-model path.

INT8 uses per-channel weights with ``reduce_range`` (7-bit weights) by default: on x86
CPUs without VNNI (these build machines) the u8 x s8 kernels saturate their 16-bit
intermediate sums, which cost the demo student 1-2 points of top-1 agreement in
measurement; pass ``reduce_range=False`` for ARM (Jetson) or VNNI CPUs.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

from moe2edge.export.calibration import calibration_feeds, calibration_reader, calibration_record
from moe2edge.export.derived import (
    DATA_FILE,
    check_block_size,
    derived_bundle,
    load_parent,
    model_path,
    model_weight_bytes,
    onnx_runtime_version,
    save_model,
    weight_nodes,
)
from moe2edge.export.errors import ExportError
from moe2edge.export.gptq import gptq_model
from moe2edge.export.layerwise import quantize_by_layer
from moe2edge.export.weights import WeightWriter, load_graph, read_weight, tool_input, weightless

log = logging.getLogger(__name__)

METHODS = {"fp16": ("none",), "int8": ("dynamic", "static"), "int4": ("rtn", "hqq", "gptq")}


# --- the quantizers -------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_ort_quantization() -> Iterator[None]:
    """ORT's quantizers log every node at INFO and divide by zero-range blocks; keep quiet."""
    names = [
        "onnxruntime.quantization.matmul_nbits_quantizer",
        "onnxruntime.quantization.neural_compressor.weight_only",
        "onnxruntime.quantization",
        "root",
    ]
    loggers = [logging.getLogger(n) if n != "root" else logging.getLogger() for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.WARNING))
    try:  # GPTQ prints a progress bar on stdout, which `--json` output must not carry
        with contextlib.redirect_stdout(sys.stderr), np.errstate(divide="ignore", invalid="ignore"):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """FP16 weights and activations; KV cache in/out fp16, logits kept fp32 for sampling.

    ``model`` comes typed (``fp16_graph``); weights kept as external data are only retyped
    here and converted when ``save_model`` writes them (``weights.to_float16``, the same
    numbers).
    """
    from onnxruntime.transformers import float16

    def value_info(tensor: onnx.TensorProto) -> onnx.ValueInfoProto:
        return onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)

    logits = [o.name for o in model.graph.output if o.name == "logits"]
    # ORT reads a whole initializer (from the working directory, for external data) only
    # to learn its shape; the dims say the same without reading anything.
    original = float16.make_value_info_from_tensor
    float16.make_value_info_from_tensor = value_info
    try:
        return float16.convert_float_to_float16(
            model, keep_io_types=logits, disable_shape_infer=True
        )
    finally:
        float16.make_value_info_from_tensor = original


def fp16_graph(path: Path, work: Path) -> tuple[onnx.ModelProto, Path, dict[str, int]]:
    """The float16 graph of the weightless model at ``path`` (``weights.weightless``), the
    folder of its weights and their stored types.

    Types come from shape inference by path (``infer_shapes_path``: the in-memory form
    serialises the model, which fails above 2 GB and copies it below).
    """
    typed = work / "typed.onnx"
    onnx.shape_inference.infer_shapes_path(str(path), str(typed))
    model = load_graph(typed, path.parent)  # its external data stays beside ``path``
    stored = {t.name: t.data_type for t in model.graph.initializer if uses_external_data(t)}
    return to_fp16(model), path.parent, stored


def _tool_input(path: Path, work: Path) -> tuple[Path, list[str], list[str]]:
    """The weightless model at ``path`` as ORT's int8 quantizers read it (a path in ``work``,
    nodes named) and its weight nodes."""
    model = load_graph(path)
    matmuls, gathers = weight_nodes(model)
    return tool_input(model, path.parent, work), matmuls, gathers


def int8_dynamic(
    model: onnx.ModelProto, work: Path, nodes: list[str], reduce_range: bool
) -> onnx.ModelProto:
    """Per-channel int8 weights; activations quantized per tensor at run time.

    One pass of ORT's ``quantize_dynamic`` over ``nodes`` of ``model`` (in memory; run per
    layer by ``layerwise.quantize_by_layer``).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = work / "layer.onnx"
    quantize_dynamic(
        model,
        out,
        op_types_to_quantize=["MatMul", "Gather"],
        nodes_to_quantize=nodes,
        per_channel=True,
        reduce_range=reduce_range,
        weight_type=QuantType.QInt8,
        use_external_data_format=True,
        extra_options={"MatMulConstBOnly": True},
    )
    quantized = onnx.load(str(out))  # one layer's weights
    for path in (out, out.with_name(out.name + ".data")):
        path.unlink(missing_ok=True)
    return quantized


def int8_static(
    path: Path, work: Path, feeds: list[dict[str, np.ndarray]], reduce_range: bool
) -> Path:
    """QDQ int8: per-channel symmetric weights, asymmetric activations from MinMax ranges.

    ORT's ``quantize_static`` on the whole model (calibration runs all of it): it holds
    the model and its calibration session at once, ~3x the fp32 weights (docs/export.md).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    src, matmuls, _ = _tool_input(path, work)
    dst = work / "out.onnx"
    quantize_static(
        src,
        dst,
        calibration_reader(feeds),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul"],
        nodes_to_quantize=matmuls,
        per_channel=True,
        reduce_range=reduce_range,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=True,
        extra_options={"MatMulConstBOnly": True},
    )
    return dst


def int4_embedding(
    model: onnx.ModelProto, block_size: int, symmetric: bool, base_dir: Path | None = None
) -> onnx.ModelProto:
    """The embedding table as ``GatherBlockQuantized`` (RTN, blocks along the hidden axis).

    ORT's quantizer reads the table from the proto: an external one (in ``base_dir``) is
    loaded into it first; the other weights stay where they are.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        if table is not None and uses_external_data(table):
            values = np.asarray(read_weight(table, base_dir))
            table.CopyFrom(numpy_helper.from_array(values, table.name))

    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size,
        is_symmetric=symmetric,
        op_types_to_quantize=("Gather",),
        quant_axes=(("Gather", 1),),
    )
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    return quantizer.model.model


def int4_weights(
    model: onnx.ModelProto,
    method: str,
    block_size: int,
    symmetric: bool,
    accuracy_level: int | None,
) -> onnx.ModelProto:
    """RTN or HQQ through ORT's ``MatMulNBitsQuantizer`` (run per layer by
    ``layerwise.quantize_by_layer``: it quantizes the MatMuls whose weight is in ``model``).
    GPTQ is ``gptq.gptq_model``."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if method == "rtn":
        config = DefaultWeightOnlyQuantConfig(
            block_size=block_size,
            is_symmetric=symmetric,
            accuracy_level=accuracy_level,
            op_types_to_quantize=("MatMul",),
        )
    else:
        config = HQQWeightOnlyQuantConfig(block_size=block_size, bits=4)
    quantizer = MatMulNBitsQuantizer(
        model,
        block_size=block_size,
        is_symmetric=symmetric,
        accuracy_level=accuracy_level,
        algo_config=config,
    )
    quantizer.process()
    return quantizer.model.model


def quantize_bundle(
    parent_dir: str | Path,
    out_dir: str | Path,
    precision: str,
    method: str | None = None,
    block_size: int | None = 32,
    calibration: str | Path | None = None,
    calibration_limit: int = 64,
    symmetric: bool = False,
    quantize_embedding: bool = True,
    accuracy_level: int | None = None,
    reduce_range: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a new ``precision``/``method`` bundle at ``out_dir`` from the FP32 ``parent_dir``."""
    if precision not in METHODS:
        raise ExportError(f"unknown precision {precision!r}; choose one of {sorted(METHODS)}")
    method = method or METHODS[precision][0]
    if method not in METHODS[precision]:
        raise ExportError(
            f"{precision} has no method {method!r}; choose one of {list(METHODS[precision])}"
        )
    needs_calibration = method in ("static", "gptq")
    if needs_calibration and calibration is None:
        raise ExportError(
            f"{precision} {method} needs calibration data: pass --calibration JSONL "
            "(rows with 'utterance' or 'prompt', and 'reply')"
        )
    if precision == "int4":
        check_block_size(block_size)
    parent = load_parent(parent_dir)
    model_file = model_path(parent_dir, parent)
    feeds = (
        calibration_feeds(parent_dir, parent, calibration, calibration_limit)
        if needs_calibration
        else None
    )
    info: dict[str, Any] = {
        "weights": precision,
        "activations": {"fp16": "fp16", "int8": "int8" if method == "static" else "fp32"}.get(
            precision, "fp32"
        ),
        "method": method,
        "block_size": block_size if precision == "int4" else None,
    }
    if precision == "int8":
        info.update(per_channel=True, reduce_range=reduce_range)
        if method == "dynamic":
            info["activations"] = "int8-dynamic"
    if precision == "int4":
        info.update(symmetric=symmetric, accuracy_level=accuracy_level)

    def quantize(tmp: Path, work: Path) -> list[str]:
        """The new model's files in ``tmp``; the weights pass a layer at a time at most."""
        source = weightless(model_file, work)  # the graph; weights in files beside it
        model, base, stored = load_graph(source), source.parent, None
        fp32_bytes = model_weight_bytes(model)
        writer = WeightWriter(tmp, DATA_FILE)
        if precision == "fp16":
            model, base, stored = fp16_graph(source, work)
        elif method == "static":
            quantized = int8_static(source, work, feeds, reduce_range)
            model, base = load_graph(quantized), quantized.parent
        elif method == "gptq":  # onnxruntime's GPTQ equals RTN in 1.32: see export/gptq.py
            model = gptq_model(
                model, base, feeds, block_size, symmetric, accuracy_level, writer.add
            )
        else:
            matmuls, gathers = weight_nodes(model)  # names unnamed nodes: ORT selects by name
            chosen = set(matmuls + gathers) if precision == "int8" else set(matmuls)
            nodes = [n for n in model.graph.node if n.name in chosen]

            def one_layer(layer: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
                if precision == "int8":
                    return int8_dynamic(layer, work, names, reduce_range)
                return int4_weights(layer, method, block_size, symmetric, accuracy_level)

            model = quantize_by_layer(model, base, nodes, one_layer, writer)
        if precision == "int4" and quantize_embedding and weight_nodes(model)[1]:
            model = int4_embedding(model, block_size, symmetric, base)
        info["embedding"] = embedding_precision(model)
        files = save_model(model, tmp, base, stored, writer)
        info["weight_bytes"] = model_weight_bytes(model)
        info["weight_ratio_vs_fp32"] = round(info["weight_bytes"] / fp32_bytes, 4)
        return files

    def build(tmp: Path) -> list[str]:
        log.info("quantizing %s: %s %s", parent_dir, precision, method)
        with tempfile.TemporaryDirectory(dir=tmp) as work, quiet_ort_quantization():
            try:
                return quantize(tmp, Path(work))
            except ExportError:
                raise
            except Exception as exc:  # the quantizers raise assertion/value errors
                raise ExportError(
                    f"onnxruntime could not quantize {parent_dir} to {precision} {method} "
                    f"({type(exc).__name__}: {exc})"
                ) from exc

    extra = {}
    if needs_calibration:
        extra["calibration"] = calibration_record(calibration, len(feeds))
    extra["quantization"] = {
        "tool": f"onnxruntime {onnx_runtime_version()}",
        "onnx": onnx.__version__,
    }
    return derived_bundle(
        parent_dir, parent, out_dir, build, info, overwrite=overwrite, extra=extra
    )


def embedding_precision(model: onnx.ModelProto) -> str:
    """What the token embedding ended up as (for the manifest and the docs' honesty)."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "GatherBlockQuantized":
            return "int4"
        if node.op_type == "Gather" and node.input[0] in inits:
            return {1: "fp32", 10: "fp16", 3: "int8", 2: "uint8"}.get(
                inits[node.input[0]].data_type, str(inits[node.input[0]].data_type)
            )
    return "unknown"
