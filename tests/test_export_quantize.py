"""ONNX Runtime variants of the tiny student: every precision and method, through the runtime."""

from __future__ import annotations

import collections
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from moe2edge.export.calibration import read_rows
from moe2edge.export.errors import ExportError
from moe2edge.export.gptq import gptq_weight, nbits_tensors
from moe2edge.export.quantize import quantize_bundle
from moe2edge.export.verify import verify_io_contract
from moe2edge.fileio import sha256_file
from moe2edge.runtime.generate import Generator
from moe2edge.runtime.manifest import MANIFEST_NAME, read_manifest, verify_bundle
from tests._export_common import TINY_INT4, build_tiny_variants, prompt_logits, relative_error

# Max logit error relative to the FP32 logit spread, per precision (measured on the tiny
# student: fp16 1.5e-4, int8 <= 8e-3, int4 <= 4.4e-2); a broken graph is off by ~1.
TOLERANCE = {"fp16": 2e-3, "int8": 3e-2, "int4": 0.1}


def op_counts(bundle) -> collections.Counter:
    model = onnx.load(str(bundle / "model.onnx"))
    return collections.Counter(n.op_type for n in model.graph.node)


@pytest.fixture(scope="module")
def tiny_variants(tiny_run, tmp_path_factory):
    return build_tiny_variants(tiny_run, tmp_path_factory)


@pytest.fixture(scope="module")
def prompts(tiny_run) -> list[str]:
    return [r["utterance"] for r in read_rows(tiny_run["eval"], 8)]


@pytest.fixture(scope="module")
def fp32_logits(tiny_variants, prompts) -> np.ndarray:
    return prompt_logits(tiny_variants["fp32"], prompts)


VARIANTS = ["fp16", "int8-dynamic", "int8-static"] + [f"int4-{m}-{b}" for m, b in TINY_INT4]


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_is_a_verified_bundle_close_to_fp32(tiny_variants, prompts, fp32_logits, name):
    bundle = tiny_variants[name]
    manifest = verify_bundle(bundle)
    verify_io_contract(bundle, manifest)
    precision = manifest["precision"]
    assert precision["weights"] == name.split("-")[0]
    assert manifest["target"] == "onnxruntime"
    # the parent is named by a relative path and hashes that match the FP32 bundle
    parent = (bundle.parent / precision["parent"]["path"]).resolve()
    assert parent == tiny_variants["fp32"].resolve()
    fp32_manifest = read_manifest(parent)
    assert precision["parent"]["model_sha256"] == fp32_manifest["files"]["model.onnx"]["sha256"]
    assert len(precision["parent"]["manifest_sha256"]) == 64
    error = relative_error(prompt_logits(bundle, prompts), fp32_logits)
    assert error < TOLERANCE[precision["weights"]], error
    assert precision["weight_bytes"] < fp32_manifest["files"]["model.onnx"]["bytes"]


def test_fp16_keeps_fp32_logits_and_halves_the_kv_cache(tiny_variants):
    manifest = read_manifest(tiny_variants["fp16"])
    io = {e["name"]: e["dtype"] for e in manifest["io"]["inputs"] + manifest["io"]["outputs"]}
    assert manifest["io"]["kv_cache"]["dtype"] == "float16"
    assert io["past_key_values.0.key"] == io["present.0.value"] == "float16"
    assert io["logits"] == "float32"
    assert 0.45 < manifest["precision"]["weight_ratio_vs_fp32"] < 0.55
    gen = Generator.from_bundle(tiny_variants["fp16"])
    assert gen.engine.new_cache().keys[0].dtype == np.float16
    assert gen.generate("turn on the kitchen lights").token_ids


def test_int8_graphs(tiny_variants):
    dynamic, static = (
        op_counts(tiny_variants["int8-dynamic"]),
        op_counts(tiny_variants["int8-static"]),
    )
    assert dynamic["MatMulInteger"] + dynamic["DynamicQuantizeMatMul"] > 0
    assert static["QuantizeLinear"] > 0 and static["DequantizeLinear"] > 0
    manifest = read_manifest(tiny_variants["int8-static"])
    assert manifest["calibration"]["samples"] == 8
    assert manifest["precision"]["activations"] == "int8"
    assert read_manifest(tiny_variants["int8-dynamic"])["precision"]["embedding"] == "uint8"


@pytest.mark.parametrize(("method", "block"), TINY_INT4)
def test_int4_quantizes_every_weight_matmul_and_the_embedding(tiny_variants, method, block):
    bundle = tiny_variants[f"int4-{method}-{block}"]
    fp32 = op_counts(tiny_variants["fp32"])
    counts = op_counts(bundle)
    model = onnx.load(str(bundle / "model.onnx"))
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    # every MatMul with a weight (q/k/v/o, gate/up/down per layer, lm_head) became MatMulNBits
    assert len(nbits) == 2 * 7 + 1
    assert counts["MatMul"] == fp32["MatMul"] - len(nbits)
    assert {a.i for n in nbits for a in n.attribute if a.name == "block_size"} == {block}
    assert any("lm_head" in n.name for n in nbits)
    assert counts["GatherBlockQuantized"] == 1
    precision = read_manifest(bundle)["precision"]
    assert precision["method"] == method and precision["block_size"] == block
    assert precision["embedding"] == "int4"
    assert precision["weight_ratio_vs_fp32"] < 0.22


def test_gptq_beats_round_to_nearest_on_the_layer_objective():
    """GPTQ minimises tr(E^T H E) for E = W - Q; with correlated inputs it must beat RTN.
    (onnxruntime 1.32's own GPTQ returns exactly the RTN weights: see export/gptq.py.)"""
    rng = np.random.default_rng(0)
    k, n = 64, 48
    mix = rng.normal(size=(k, k))
    x = rng.normal(size=(2048, k)) @ mix  # strongly correlated features
    h = 2 * x.T @ x / len(x)
    w = rng.normal(size=(k, n)).astype(np.float32)

    def objective(q, scale, zero, block):
        deq = (q - np.repeat(zero, block, 0)[:k]) * np.repeat(scale, block, 0)[:k]
        e = w - deq
        return float(np.trace(e.T @ h @ e))

    for block, symmetric in ((16, False), (32, True)):
        gptq = objective(*gptq_weight(w, h, block, symmetric), block)
        rtn = objective(*gptq_weight(w, np.eye(k), block, symmetric, percdamp=0.0), block)
        assert gptq < 0.8 * rtn, (block, gptq, rtn)


@pytest.mark.parametrize(
    ("k", "n", "block", "symmetric"), [(96, 40, 32, False), (96, 40, 32, True), (64, 8, 16, False)]
)
def test_matmulnbits_packing_matches_onnxruntime(k, n, block, symmetric):
    """Our MatMulNBits tensors for RTN values equal ORT's own quantizer's, byte for byte
    (K=96 at block 32 gives an odd number of blocks: the zero-point padding case)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    w = np.random.default_rng(1).normal(size=(k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(w, "w")],
    )
    quantizer = MatMulNBitsQuantizer(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]),
        algo_config=DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric),
    )
    quantizer.process()
    theirs = {t.name: numpy_helper.to_array(t) for t in quantizer.model.model.graph.initializer}
    q, scale, zero = gptq_weight(w, np.eye(k), block, symmetric, percdamp=0.0)  # = RTN
    ours = {
        t.name: numpy_helper.to_array(t)
        for t in nbits_tensors("w", q, scale, zero, block, symmetric)
    }
    assert set(ours) == set(theirs)
    np.testing.assert_array_equal(ours["w_Q4"], theirs["w_Q4"])
    np.testing.assert_allclose(ours["w_scales"], theirs["w_scales"], rtol=1e-6)
    if not symmetric:
        np.testing.assert_array_equal(ours["w_zero_points"], theirs["w_zero_points"])


def test_bad_requests_fail_clearly_and_leave_nothing(tiny_variants, tiny_run, tmp_path):
    fp32, out = tiny_variants["fp32"], tmp_path / "out"
    with pytest.raises(ExportError, match="needs calibration data"):
        quantize_bundle(fp32, out, "int4", "gptq", 16)
    with pytest.raises(ExportError, match="block size 48"):
        quantize_bundle(fp32, out, "int4", "rtn", 48)
    with pytest.raises(ExportError, match="no method 'hqq'"):
        quantize_bundle(fp32, out, "int8", "hqq")
    with pytest.raises(ExportError, match="quantize from the FP32"):
        quantize_bundle(tiny_variants["int4-rtn-16"], out, "int4", "rtn", 16)
    with pytest.raises(ExportError, match="does not exist"):
        quantize_bundle(fp32, out, "int8", "static", calibration=tmp_path / "nope.jsonl")
    with pytest.raises(ExportError, match="already exists"):
        quantize_bundle(fp32, tiny_variants["fp16"], "fp16")
    tampered = tmp_path / "tampered"
    shutil.copytree(fp32, tampered)
    data = bytearray((tampered / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    (tampered / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ExportError, match="sha256 differs"):
        quantize_bundle(tampered, out, "fp16")
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing half-written


def test_parent_is_pinned_by_manifest_and_model_hashes(tiny_variants, tmp_path):
    parent = tmp_path / "fp32"
    shutil.copytree(tiny_variants["fp32"], parent)
    child = quantize_bundle(parent, tmp_path / "fp16", "fp16")
    record = read_manifest(child)["precision"]["parent"]
    assert record["path"] == "fp32"  # relative: the pair can move together
    assert record["manifest_sha256"] == sha256_file(parent / MANIFEST_NAME)
    assert record["model_sha256"] == sha256_file(parent / "model.onnx")


def test_large_model_path_writes_external_data(tiny_variants, tmp_path, monkeypatch, prompts):
    """Above 1 GiB of weights (protobuf's 2 GB cap) bundles keep them in model.onnx_data;
    the threshold is lowered here so the tiny model takes that path end to end."""
    import moe2edge.export.derived

    monkeypatch.setattr(moe2edge.export.derived, "EXTERNAL_DATA_BYTES", 0)
    out = quantize_bundle(tiny_variants["fp32"], tmp_path / "int8", "int8", "dynamic")
    manifest = verify_bundle(out)
    assert set(manifest["files"]) == {
        "model.onnx",
        "model.onnx_data",
        "tokenizer.json",
        "config.json",
    }
    verify_io_contract(out, manifest)
    assert (
        relative_error(
            prompt_logits(out, prompts), prompt_logits(tiny_variants["int8-dynamic"], prompts)
        )
        < 1e-6
    )


def _activation_hessians(model_path, feeds, activations) -> dict[str, np.ndarray]:
    """H = 2/n sum x x^T of graph activations, from a plain session over the whole model."""
    model = onnx.load(str(model_path))
    model.graph.output.extend(onnx.ValueInfoProto(name=a) for a in activations)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    sums, count = {}, 0
    for feed in feeds:
        outs = session.run(activations, {k: v for k, v in feed.items() if k in names})
        for name, x in zip(activations, outs, strict=True):
            x = x.reshape(-1, x.shape[-1]).astype(np.float64)
            sums[name] = sums.get(name, 0) + x.T @ x
        count += int(np.prod(outs[0].shape[:-1]))
    return {name: 2 * s / count for name, s in sums.items()}


def _matmul_inputs(model) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return sorted(
        {n.input[0] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    )


def test_hessians_from_the_weightless_probe_equal_a_full_session(tiny_variants, tiny_run, tmp_path):
    """The probe (part of the graph, weights fed from memory maps) sees what the model sees."""
    from moe2edge.export.calibration import calibration_feeds
    from moe2edge.export.gptq import collect_hessians
    from moe2edge.export.weights import load_graph, weightless

    fp32 = tiny_variants["fp32"]
    feeds = calibration_feeds(fp32, read_manifest(fp32), tiny_run["train"], 3)
    source = weightless(fp32 / "model.onnx", tmp_path)
    graph = load_graph(source)
    activations = _matmul_inputs(graph)
    assert len(activations) >= 4
    ours = collect_hessians(graph, source.parent, feeds, activations)
    theirs = _activation_hessians(fp32 / "model.onnx", feeds, activations)
    for name in activations:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-7)
        assert np.allclose(ours[name], ours[name].T) and np.all(np.diag(ours[name]) >= 0)


def test_gptq_is_sequential_over_layers(tiny_variants, tiny_run, tmp_path, monkeypatch):
    """The lm_head (the last layer) is quantized with the Hessian of its input as the
    quantized model computes it, not as the FP32 model does."""
    import moe2edge.export.gptq as gptq
    from moe2edge.export.calibration import calibration_feeds

    used = []
    original = gptq.gptq_weight
    monkeypatch.setattr(
        gptq, "gptq_weight", lambda w, h, *a, **k: used.append(h) or original(w, h, *a, **k)
    )
    fp32 = tiny_variants["fp32"]
    calib = dict(calibration=tiny_run["train"], calibration_limit=4)
    out = quantize_bundle(
        fp32, tmp_path / "gptq", "int4", "gptq", 16, quantize_embedding=False, **calib
    )
    lm_head = next(
        n for n in onnx.load(str(fp32 / "model.onnx")).graph.node if n.name == "/lm_head/MatMul"
    )
    feeds = calibration_feeds(fp32, read_manifest(fp32), tiny_run["train"], 4)
    quantized = _activation_hessians(out / "model.onnx", feeds, [lm_head.input[0]])
    full = _activation_hessians(fp32 / "model.onnx", feeds, [lm_head.input[0]])
    h = quantized[lm_head.input[0]]
    scale = np.abs(h).max()
    # measured: 1e-8 from the quantized model's (MatMulNBits vs dequantized MatMul), 1.2e-2
    # from the FP32 model's, which a non-sequential GPTQ would have used
    assert np.abs(used[-1] - h).max() < 1e-4 * scale
    assert np.abs(used[-1] - full[lm_head.input[0]]).max() > 1e-3 * scale
