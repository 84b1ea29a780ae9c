"""Network typing and builder flags for a bundle's precision (TensorRT 10 and 11).

* ``fp32``: a weakly typed network, no precision flags (TF32 stays on by default).
* ``fp16``: weakly typed with ``BuilderFlag.FP16`` (TensorRT 11 removed the precision flags
  and types every network strongly: the ONNX must then carry FP16 itself).
* ``int8`` / ``int4`` weight-only: the graph carries the quantization as
  ``DequantizeLinear`` (opset 21; INT4 with ``block_size``) feeding ``MatMul``. That is
  explicit quantization, which TensorRT wants in a *strongly typed* network with no
  precision flags: types come from the graph, the dequantized weights take the scale's
  type (FP16 scales -> FP16 GEMMs). TensorRT requires the scales to be positive build-time
  constants and the zero points to be zero (symmetric), and its ONNX parser does not take
  ONNX Runtime's ``com.microsoft`` ops (``MatMulNBits``, ``GroupQueryAttention``):
  ``moe2edge export check-trt`` and the pre-checks of ``moe2edge export engine``
  (``moe2edge.export.check_trt``) report both before a long build.

The manifest's ``precision`` is read: ``{"weights": "int4", "activations": "fp16",
"block_size": 32}`` or a plain string such as ``"int4"``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from moe2edge.runtime.errors import BundleError


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
