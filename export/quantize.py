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

from moe2edge.export.calibration import calibration_feeds, calibration_reader, calibration_record
from moe2edge.export.derived import (
    check_block_size,
    derived_bundle,
    load_model,
    load_parent,
    model_weight_bytes,
    onnx_runtime_version,
    save_for_tool,
    save_model,
    weight_nodes,
)
from moe2edge.export.errors import ExportError
from moe2edge.export.gptq import gptq_model

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
    """FP16 weights and activations; KV cache in/out fp16, logits kept fp32 for sampling."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    logits = [o.name for o in model.graph.output if o.name == "logits"]
    return convert_float_to_float16(model, keep_io_types=logits, disable_shape_infer=False)


def int8_dynamic(model: onnx.ModelProto, work: Path, reduce_range: bool) -> onnx.ModelProto:
    """Per-channel int8 weights; activations quantized per tensor at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    matmuls, gathers = weight_nodes(model)
    src, dst = work / "in.onnx", work / "out.onnx"
    large = save_for_tool(model, src)
    quantize_dynamic(
        src,
        dst,
        op_types_to_quantize=["MatMul", "Gather"],
        nodes_to_quantize=matmuls + gathers,
        per_channel=True,
        reduce_range=reduce_range,
        weight_type=QuantType.QInt8,
        use_external_data_format=large,
        extra_options={"MatMulConstBOnly": True},
    )
    return onnx.load(str(dst))


def int8_static(
    model: onnx.ModelProto, work: Path, feeds: list[dict[str, np.ndarray]], reduce_range: bool
) -> onnx.ModelProto:
    """QDQ int8: per-channel symmetric weights, asymmetric activations from MinMax ranges."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    matmuls, _ = weight_nodes(model)
    src, dst = work / "in.onnx", work / "out.onnx"
    large = save_for_tool(model, src)
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
        use_external_data_format=large,
        extra_options={"MatMulConstBOnly": True},
    )
    return onnx.load(str(dst))


def int4_embedding(model: onnx.ModelProto, block_size: int, symmetric: bool) -> onnx.ModelProto:
    """The embedding table as ``GatherBlockQuantized`` (RTN, blocks along the hidden axis)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

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
    feeds: list[dict[str, np.ndarray]] | None,
    accuracy_level: int | None,
) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if method == "gptq":  # onnxruntime's GPTQ equals RTN in 1.32: see export/gptq.py
        return gptq_model(model, feeds, block_size, symmetric, accuracy_level)
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
    model = load_model(parent_dir, parent)
    feeds = (
        calibration_feeds(parent_dir, parent, calibration, calibration_limit)
        if needs_calibration
        else None
    )
    fp32_bytes = model_weight_bytes(model)
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

    def build(tmp: Path) -> list[str]:
        nonlocal model
        log.info("quantizing %s: %s %s", parent_dir, precision, method)
        with tempfile.TemporaryDirectory(dir=tmp) as work, quiet_ort_quantization():
            try:
                if precision == "fp16":
                    model = to_fp16(model)
                elif method == "dynamic":
                    model = int8_dynamic(model, Path(work), reduce_range)
                elif method == "static":
                    model = int8_static(model, Path(work), feeds, reduce_range)
                else:
                    model = int4_weights(
                        model, method, block_size, symmetric, feeds, accuracy_level
                    )
                    if quantize_embedding and weight_nodes(model)[1]:
                        model = int4_embedding(model, block_size, symmetric)
            except ExportError:
                raise
            except Exception as exc:  # the quantizers raise assertion/value errors
                raise ExportError(
                    f"onnxruntime could not quantize {parent_dir} to {precision} {method} "
                    f"({type(exc).__name__}: {exc})"
                ) from exc
        info["embedding"] = embedding_precision(model)
        info["weight_bytes"] = model_weight_bytes(model)
        info["weight_ratio_vs_fp32"] = round(info["weight_bytes"] / fp32_bytes, 4)
        return save_model(model, tmp)

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
