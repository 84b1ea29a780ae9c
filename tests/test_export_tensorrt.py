"""The TensorRT flavour: standard ops only, its numerics in ONNX Runtime, check-trt, engine logic."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from moe2edge.export.check_trt import (
    check_bundle,
    check_model,
    check_onnx_for_tensorrt,
    operator_table,
)
from moe2edge.export.rtn import dequantize
from moe2edge.export.tensorrt_flavor import quantize_blockwise, tensorrt_bundle
from moe2edge.runtime.errors import BundleError
from moe2edge.runtime.manifest import read_manifest
from moe2edge.runtime.tensorrt.build import build_engine
from moe2edge.runtime.tensorrt.plan import PLAN_NAME
from moe2edge.runtime.tensorrt.precision import precision_plan
from moe2edge.runtime.tensorrt.profiles import profiles_from_manifest
from tests._export_common import build_tiny_variants, prompt_logits, relative_error
from tests.test_export_quantize import TOLERANCE

TRT = ["trt-fp16", "trt-int8", "trt-int4-16", "trt-int4-32"]


@pytest.fixture(scope="module")
def tiny_variants(tiny_run, tmp_path_factory):
    return build_tiny_variants(tiny_run, tmp_path_factory)


@pytest.mark.parametrize(("bits", "block"), [(4, 16), (4, 32), (8, None)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_blockwise_round_to_nearest(bits, block, symmetric):
    w = np.random.default_rng(0).normal(size=(64, 24)).astype(np.float32)
    w[:16, 0] = 0.0  # an all-zero block must stay exactly zero
    q, scale, zero = quantize_blockwise(w, bits, block, symmetric)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    assert q.min() >= lo and q.max() <= hi and (zero is None) == symmetric
    assert scale.shape == ((64 // block, 24) if block else (24,))
    back = dequantize(q, scale, zero, block)
    step = np.repeat(scale, block, 0) if block else scale[None, :]
    assert np.all(np.abs(back - w) <= step / 2 + 1e-6)
    if block == 16:
        assert np.all(back[:16, 0] == 0.0)


def _dq_matmul_model(q, scale, zero, block):
    """x[1, K] @ DequantizeLinear(W_q, scale[, zp]) as the flavour writes it (opset 21)."""
    from moe2edge.export.tensorrt_flavor import _tensor

    k, n = q.shape
    inits = [_tensor(q, "wq", 4, zero is None), onnx.numpy_helper.from_array(scale, "s")]
    inputs = ["wq", "s"]
    if zero is not None:
        inits.append(_tensor(zero, "zp", 4, signed=False))
        inputs.append("zp")
    nodes = [
        helper.make_node("DequantizeLinear", inputs, ["w"], axis=0, block_size=block),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.mark.parametrize("symmetric", [True, False])
def test_blocked_int4_dequantize_runs_exactly_in_onnxruntime(symmetric):
    """Fusion off: ORT's DequantizeLinear-21 equals our reference; fusion on (its INT4
    MatMul kernel) stays within a small relative error (field notes: ~5e-3)."""
    rng = np.random.default_rng(2)
    w = rng.normal(size=(64, 16)).astype(np.float32)
    x = rng.normal(size=(1, 64)).astype(np.float32)
    q, scale, zero = quantize_blockwise(w, 4, 32, symmetric)
    model = _dq_matmul_model(q, scale, zero, 32).SerializeToString()
    expected = x @ dequantize(q, scale, zero, 32)
    for level, tol in ((ort.GraphOptimizationLevel.ORT_DISABLE_ALL, 1e-5), (None, 2e-2)):
        options = ort.SessionOptions()
        if level is not None:
            options.graph_optimization_level = level
        y = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]).run(
            None, {"x": x}
        )[0]
        assert np.abs(y - expected).max() <= tol * np.abs(expected).max()


@pytest.mark.parametrize("name", TRT)
def test_flavour_is_standard_onnx_and_runs_in_the_runtime(tiny_variants, tiny_run, name):
    bundle = tiny_variants[name]
    manifest = read_manifest(bundle)
    assert manifest["target"] == "tensorrt"
    result = check_bundle(bundle)
    assert result["unsupported"] == [] and result["errors"] == []
    assert result["opset"] == 21
    model = onnx.load(str(bundle / "model.onnx"))
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert manifest["io"]["kv_cache"]["dtype"] == "float16"
    precision = manifest["precision"]
    assert precision["activations"] == "fp16"
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    if precision["weights"] == "fp16":
        assert not dq
    else:
        assert len(dq) == 2 * 7 + 1  # every weight MatMul, the lm_head included
        inits = {i.name: i for i in model.graph.initializer}
        want = TensorProto.INT4 if precision["weights"] == "int4" else TensorProto.INT8
        assert {inits[n.input[0]].data_type for n in dq} == {want}
        assert {inits[n.input[1]].data_type for n in dq} == {TensorProto.FLOAT16}
    prompts = ["turn on the kitchen lights", "what is the temperature in the office"]
    error = relative_error(
        prompt_logits(bundle, prompts), prompt_logits(tiny_variants["fp32"], prompts)
    )
    assert error < TOLERANCE[precision["weights"]], error


def test_check_trt_flags_contrib_ops_zero_points_and_unsigned_weights(tiny_variants, tmp_path):
    ort_int4 = check_bundle(tiny_variants["int4-rtn-16"])
    flagged = {(u["domain"], u["op_type"]) for u in ort_int4["unsupported"]}
    assert ("com.microsoft", "MatMulNBits") in flagged
    assert ("com.microsoft", "GatherBlockQuantized") in flagged
    static = check_bundle(tiny_variants["int8-static"])
    assert any("zero point" in u["reason"] for u in static["unsupported"])
    asym = tensorrt_bundle(tiny_variants["fp32"], tmp_path / "asym", "int4", 16, symmetric=False)
    reasons = {u["reason"] for u in check_bundle(asym)["unsupported"]}
    assert any("UINT4" in r for r in reasons)
    assert check_bundle(tiny_variants["fp32"])["unsupported"] == []  # optimum's graph is standard


def test_operator_list_names_its_source():
    table = operator_table()
    assert table["tensorrt_version"].startswith("10.")
    assert "onnx-tensorrt" in table["source"]["repository"]
    ops = table["operators"]
    assert ops["MatMul"]["supported"] and "INT4" in ops["DequantizeLinear"]["types"]
    assert not ops["MatMulInteger"]["supported"] and len(ops) > 150


def test_opset_outside_the_parser_range_is_an_error(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)]), tmp_path / "m.onnx"
    )
    result = check_model(tmp_path / "m.onnx")
    assert result["unsupported"] == [] and "opset 7" in result["errors"][0]


def test_engine_logic_from_our_manifests(tiny_variants):
    """No GPU needed: profiles from the manifest's io, flags from its precision."""
    for name, strongly_typed, flags in (
        ("trt-fp16", False, ["FP16"]),
        ("trt-int8", True, []),
        ("trt-int4-16", True, []),
    ):
        manifest = read_manifest(tiny_variants[name])
        plan = precision_plan(manifest["precision"])
        assert (plan.strongly_typed, plan.flags) == (strongly_typed, flags)
        prefill, decode = profiles_from_manifest(manifest, max_seq_len=128)
        dynamic = {e["name"] for e in manifest["io"]["inputs"]}
        assert set(prefill.shapes) == set(decode.shapes) == dynamic
        assert decode.shapes["input_ids"] == ((1, 1), (1, 1), (1, 1))
        # the max corner is consistent: past 64 + new 64 == total 128 (default prefill ctx // 2)
        assert prefill.shapes["past_key_values.0.key"][2][2] == 64
        assert prefill.shapes["input_ids"][2][1] == 64
        assert decode.shapes["past_key_values.0.key"][2][2] == 127
        assert check_onnx_for_tensorrt(tiny_variants[name] / "model.onnx") == []
    with pytest.raises(BundleError, match="TensorRT"):
        check_onnx_for_tensorrt(tiny_variants["int4-rtn-16"] / "model.onnx")


HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installed here (no GPU machine)")
def test_engine_builds_where_tensorrt_exists(tiny_variants, tmp_path):
    engine_json = build_engine(tiny_variants["trt-int4-16"], tmp_path / "engine", max_seq_len=128)
    meta = json.loads(engine_json.read_text())
    assert meta["tensorrt_version"] and (tmp_path / "engine" / PLAN_NAME).is_file()
