"""Export above 2 GB with bounded memory.

A synthetic LLM-shaped FP32 bundle (embedding, residual MLP layers, one KV-cache layer,
lm_head; weights in ``model.onnx_data``) goes through the export steps; each step runs in
its own process (``moe2edge.export.peak_rss.measure``) with its peak RSS measured.

``test_above_2gb_*`` builds a 2.3 GB model (more than protobuf's 2 GB) and takes minutes:
it runs with ``pytest -m slow tests/test_export_large.py`` or ``MOE2EDGE_LARGE_TESTS=1``
(bench/scale.py runs it) and is skipped otherwise. The small tests here take the same
code paths (weights in external data) at a few MB, in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.external_data_helper import uses_external_data
from tokenizers import Tokenizer, models, pre_tokenizers

import moe2edge.export.derived
from moe2edge.export.bundle import describe_io, kv_contract, write_bundle
from moe2edge.export.check_trt import check_bundle, check_bundle_for_engine, check_onnx_for_tensorrt
from moe2edge.export.peak_rss import measure, model_bytes
from moe2edge.export.quantize import quantize_bundle
from moe2edge.export.tensorrt_flavor import tensorrt_bundle
from moe2edge.export.verify import verify_io_contract
from moe2edge.export.weights import WeightWriter, to_float16
from moe2edge.runtime.engine import open_engine
from moe2edge.runtime.errors import BundleError
from moe2edge.runtime.manifest import verify_bundle

PEAK_RSS_RATIO = 2.0  # the bound: peak RSS / FP32 model bytes, every step
HEADS, HEAD_DIM = 2, 64


def _weight(rng, shape, writer: WeightWriter, name: str) -> onnx.TensorProto:
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= 1.0 / np.sqrt(shape[0])  # activations keep their scale through each layer
    return writer.add(values, name)


def write_synthetic_bundle(
    out: Path, hidden: int, intermediate: int, layers: int, vocab: int, seed: int = 0
) -> Path:
    """An FP32 bundle of an LLM-shaped graph whose weights are all external data."""
    rng = np.random.default_rng(seed)

    def fill(tmp: Path) -> dict:
        nodes, inits = [], []
        with WeightWriter(tmp, "model.onnx_data") as writer:

            def matmul(x: str, name: str, shape: tuple[int, int]) -> str:
                inits.append(_weight(rng, shape, writer, f"{name}.weight"))
                nodes.append(helper.make_node("MatMul", [x, f"{name}.weight"], [name], name=name))
                return name

            inits.append(_weight(rng, (vocab, hidden), writer, "embed.weight"))
            nodes.append(helper.make_node("Gather", ["embed.weight", "input_ids"], ["h0"]))
            shape = helper.make_tensor("kv_shape", TensorProto.INT64, [4], [0, 0, HEADS, HEAD_DIM])
            inits.append(shape)
            for kind in ("key", "value"):
                new = matmul(
                    "h0",
                    f"/model/layers.0/self_attn/{kind[0]}_proj/MatMul",
                    (hidden, HEADS * HEAD_DIM),
                )
                nodes += [
                    helper.make_node("Reshape", [new, "kv_shape"], [f"{kind}_4d"]),
                    helper.make_node("Transpose", [f"{kind}_4d"], [f"{kind}_t"], perm=[0, 2, 1, 3]),
                    helper.make_node(
                        "Concat",
                        [f"past_key_values.0.{kind}", f"{kind}_t"],
                        [f"present.0.{kind}"],
                        axis=2,
                    ),
                ]
            h = "h0"
            for layer in range(layers):
                up = matmul(h, f"/model/layers.{layer}/mlp/up_proj/MatMul", (hidden, intermediate))
                nodes.append(helper.make_node("Relu", [up], [f"relu{layer}"]))
                down = matmul(
                    f"relu{layer}",
                    f"/model/layers.{layer}/mlp/down_proj/MatMul",
                    (intermediate, hidden),
                )
                nodes.append(helper.make_node("Add", [h, down], [f"h{layer + 1}"]))
                h = f"h{layer + 1}"
            # a Constant whose value is in the data file, as optimum writes big ones
            scale = 1.0 + 0.1 * rng.standard_normal(hidden, dtype=np.float32)
            value = writer.add(scale, "final_scale.value")
            nodes.append(helper.make_node("Constant", [], ["final_scale"], value=value))
            nodes.append(helper.make_node("Mul", [h, "final_scale"], ["h_scaled"]))
            h = "h_scaled"
            nodes.append(
                helper.make_node(
                    "Identity", [matmul(h, "/lm_head/MatMul", (hidden, vocab))], ["logits"]
                )
            )
        past = ["batch_size", HEADS, "past_sequence_length", HEAD_DIM]
        present = ["batch_size", HEADS, "total_sequence_length", HEAD_DIM]
        graph = helper.make_graph(
            nodes,
            "synthetic",
            [
                helper.make_tensor_value_info(
                    "input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]
                )
            ]
            + [
                helper.make_tensor_value_info(f"past_key_values.0.{k}", TensorProto.FLOAT, past)
                for k in ("key", "value")
            ],
            [
                helper.make_tensor_value_info(
                    "logits", TensorProto.FLOAT, ["batch_size", "sequence_length", vocab]
                )
            ]
            + [
                helper.make_tensor_value_info(f"present.0.{k}", TensorProto.FLOAT, present)
                for k in ("key", "value")
            ],
            inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
        onnx.save_model(model, str(tmp / "model.onnx"))
        words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
        words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        words.save(str(tmp / "tokenizer.json"))
        summary = {
            "num_layers": 1,
            "num_kv_heads": HEADS,
            "head_dim": HEAD_DIM,
            "vocab_size": vocab,
        }
        return {
            "model": {**summary, "architecture": "synthetic", "hidden_size": hidden},
            "target": "onnxruntime",
            "precision": {"weights": "fp32", "activations": "fp32", "method": "none", "block_size": None, "parent": None},
            "io": {
                "model_file": "model.onnx",
                "tokenizer_file": "tokenizer.json",
                "max_sequence_length": 64,
                "kv_cache": kv_contract(summary, "float32"),
                **describe_io(tmp / "model.onnx"),
            },
            "generation": {"prompt_template": "{prompt}", "add_bos": False, "eos_token_ids": [], "max_new_tokens": 4},
            "files": ["model.onnx", "model.onnx_data", "tokenizer.json"],
        }  # fmt: skip

    return write_bundle(out, fill)


def next_logits(bundle: Path, ids: list[int]) -> np.ndarray:
    """Logits after ``ids`` with an empty cache, through the runtime."""
    engine = open_engine(bundle, "cpu")
    return engine.forward(ids, engine.new_cache()).astype(np.float64)


def greedy(bundle: Path, ids: list[int], steps: int) -> list[int]:
    """``steps`` greedy tokens after ``ids``, through the runtime."""
    engine = open_engine(bundle, "cpu")
    cache, out = engine.new_cache(), []
    logits = engine.forward(ids, cache)
    for _ in range(steps):
        out.append(int(np.argmax(logits)))
        logits = engine.forward(out[-1:], cache)
    return out


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / (b.max() - b.min()))


def check_variant(bundle: Path, target: str) -> None:
    """Hashes, graph/manifest contract and the ONNX checker by path (external data)."""
    manifest = verify_bundle(bundle)
    verify_io_contract(bundle, manifest)
    assert manifest["target"] == target
    onnx.checker.check_model(str(bundle / "model.onnx"))


# --- small: the same paths in seconds ----------------------------------------------------


def test_to_float16_is_onnxruntimes_conversion():
    from onnxruntime.transformers.float16 import convert_np_to_float16

    rng = np.random.default_rng(0)
    edge = [0.0, -0.0, 1e-9, -1e-9, 5.96e-8, 6e-8, 1e5, -1e5, 65504, 65520, np.inf, -np.inf, np.nan]
    values = np.concatenate(
        [rng.standard_normal(10_000) * 10.0 ** rng.integers(-9, 6, 10_000), edge]
    )
    values = values.astype(np.float32).reshape(-1, 1)
    ours, theirs = to_float16(values, chunk=777), convert_np_to_float16(values)
    assert ours.dtype == np.float16 and ours.shape == values.shape
    np.testing.assert_array_equal(ours.view(np.uint16), theirs.view(np.uint16))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return write_synthetic_bundle(tmp_path_factory.mktemp("small") / "fp32", 64, 128, 3, 96)


# Max logit error over the FP32 logit spread. Random Gaussian weights at a 64-wide hidden
# size are int4's worst case: measured fp16 2e-4, int8 9e-3, int4 0.08 (rtn, gptq) and
# 0.11 (TensorRT's symmetric -7..7 grid); a broken graph is off by ~1.
TOLERANCE = {"fp16": 2e-3, "int8": 3e-2, "int4": 0.2}
IDS = [3, 14, 15, 92]


def close_to_fp32(bundle: Path, parent: Path, precision: str) -> None:
    """Logits within the precision's tolerance; greedy tokens equal where the weights are
    not 4-bit (random weights leave near ties that INT4 may break either way)."""
    error = relative_error(next_logits(bundle, IDS), next_logits(parent, IDS))
    assert error < TOLERANCE[precision], error
    if precision != "int4":
        assert greedy(bundle, IDS, 8) == greedy(parent, IDS, 8)


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("fp16", lambda p, o: quantize_bundle(p, o, "fp16")),
        ("int8", lambda p, o: quantize_bundle(p, o, "int8", "dynamic")),
        ("int4-rtn", lambda p, o: quantize_bundle(p, o, "int4", "rtn", 32)),
        ("trt-fp16", lambda p, o: tensorrt_bundle(p, o, "fp16")),
        ("trt-int4", lambda p, o: tensorrt_bundle(p, o, "int4", 32)),
    ],
)
def test_external_data_in_and_out(small, tmp_path, monkeypatch, name, make):
    """A parent whose weights are external data; the child kept external too (threshold
    0): verified, checked by path, loaded by the runtime and close to FP32."""
    monkeypatch.setattr(moe2edge.export.derived, "EXTERNAL_DATA_BYTES", 0)
    out = make(small, tmp_path / name)
    check_variant(out, "tensorrt" if name.startswith("trt") else "onnxruntime")
    assert (out / "model.onnx_data").is_file()
    close_to_fp32(out, small, name.removeprefix("trt-").split("-")[0])


def test_gptq_with_external_data(small, tmp_path, monkeypatch):
    calibration = tmp_path / "calibration.jsonl"
    calibration.write_text(
        '{"prompt": "w1 w5 w9 w33", "reply": "w2 w7"}\n{"prompt": "w8 w4", "reply": "w40 w41 w42"}\n'
    )
    monkeypatch.setattr(moe2edge.export.derived, "EXTERNAL_DATA_BYTES", 0)
    out = quantize_bundle(small, tmp_path / "gptq", "int4", "gptq", 32, calibration=calibration)
    check_variant(out, "onnxruntime")
    ops = {
        n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
    }
    assert "MatMulNBits" in ops and "MatMul" not in ops
    close_to_fp32(out, small, "int4")


def test_fp16_streamed_equals_onnxruntime_in_memory(small, tmp_path):
    """The streamed conversion writes the same graph and numbers as ORT's converter on the
    whole model in memory (what every export did before)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    ours = onnx.load(str(quantize_bundle(small, tmp_path / "fp16", "fp16") / "model.onnx"))
    theirs = convert_float_to_float16(
        onnx.load(str(small / "model.onnx")), keep_io_types=["logits"]
    )
    assert [n.SerializeToString() for n in ours.graph.node] == [
        n.SerializeToString() for n in theirs.graph.node
    ]
    mine = {t.name: onnx.numpy_helper.to_array(t) for t in ours.graph.initializer}
    for t in theirs.graph.initializer:
        np.testing.assert_array_equal(mine[t.name], onnx.numpy_helper.to_array(t))


def test_check_trt_reads_external_zero_points(small, tmp_path, monkeypatch):
    monkeypatch.setattr(moe2edge.export.derived, "EXTERNAL_DATA_BYTES", 0)
    asym = tensorrt_bundle(small, tmp_path / "asym", "int4", 32, symmetric=False)
    zero_points = [
        t
        for t in onnx.load(str(asym / "model.onnx"), load_external_data=False).graph.initializer
        if t.name.endswith("_zp")
    ]
    assert zero_points and all(uses_external_data(t) for t in zero_points)
    with pytest.raises(BundleError, match="non-zero zero point"):
        check_onnx_for_tensorrt(asym / "model.onnx")
    assert any("UINT4" in u["reason"] for u in check_bundle(asym)["unsupported"])


def test_engine_prechecks_read_external_data_and_need_it(small, tmp_path, monkeypatch):
    monkeypatch.setattr(moe2edge.export.derived, "EXTERNAL_DATA_BYTES", 0)
    trt = tensorrt_bundle(small, tmp_path / "trt", "int4", 32)
    assert check_bundle_for_engine(trt) == []
    (trt / "model.onnx_data").unlink()
    with pytest.raises(BundleError, match="model.onnx_data missing"):
        check_bundle_for_engine(trt)


def _allocate(nbytes: int) -> int:
    block = np.ones(nbytes, dtype=np.uint8)
    return int(block.sum())


def test_measure_reports_the_steps_own_peak():
    held = np.ones(600 << 20, dtype=np.uint8)  # the caller's memory is not the step's
    result = measure("tests.test_export_large:_allocate", 200 << 20)
    assert result.result == 200 << 20 and held[0] == 1
    assert 200 << 20 < result.peak_rss_bytes < 450 << 20, result.peak_rss_bytes


# --- above 2 GB -------------------------------------------------------------------------


def _large_enabled(config) -> bool:
    return os.environ.get("MOE2EDGE_LARGE_TESTS") == "1" or config.option.markexpr == "slow"


@pytest.fixture(scope="module")
def large(request, tmp_path_factory) -> Path:
    if not _large_enabled(request.config):
        pytest.skip("minutes and ~4 GB of disk: pytest -m slow or MOE2EDGE_LARGE_TESTS=1")
    # 2048 hidden, 8192 MLP, 13 layers, 32000 vocabulary: 2.27 GB of fp32 weights
    bundle = write_synthetic_bundle(
        tmp_path_factory.mktemp("large") / "fp32", 2048, 8192, 13, 32000
    )
    assert model_bytes(bundle) > 2**31
    return bundle


LARGE_STEPS = {  # name: (function, its arguments after parent and output, precision)
    "fp16": ("moe2edge.export.quantize:quantize_bundle", ("fp16",), "fp16"),
    "trt-int4": ("moe2edge.export.tensorrt_flavor:tensorrt_bundle", ("int4", 32), "int4"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", LARGE_STEPS)
def test_above_2gb_with_bounded_memory(large, tmp_path, name):
    target, args, precision = LARGE_STEPS[name]
    step = measure(target, large, tmp_path / name, *args)
    ratio = step.ratio(model_bytes(large))
    print(
        f"{name}: peak RSS {step.peak_rss_bytes / 2**30:.2f} GiB = {ratio} x fp32, {step.seconds} s"
    )
    assert ratio <= PEAK_RSS_RATIO
    out = step.result
    check_variant(out, "tensorrt" if name.startswith("trt") else "onnxruntime")
    if name.startswith("trt"):
        result = check_bundle(out)
        assert result["unsupported"] == [] and result["errors"] == []
        assert check_onnx_for_tensorrt(out / "model.onnx") == []
    close_to_fp32(out, large, precision)
