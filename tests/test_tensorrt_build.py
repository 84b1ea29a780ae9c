"""The TensorRT engine builder: the GPU-free logic everywhere, the build flow against a fake
``tensorrt`` module, and a real build where TensorRT and a GPU exist. The ONNX pre-checks
live in export (``moe2edge.export.check_trt``): the runtime never imports ``onnx``."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from moe2edge.runtime.errors import BundleError, RuntimeUserError
from moe2edge.runtime.manifest import write_manifest
from moe2edge.runtime.tensorrt import binding as trt_binding
from moe2edge.runtime.tensorrt import build as trt_build
from moe2edge.runtime.tensorrt import device as trt_device
from moe2edge.runtime.tensorrt import plan as trt_plan
from moe2edge.runtime.tensorrt import precision as trt_precision
from moe2edge.runtime.tensorrt import profiles as trt_profiles
from tests.conftest import require_module

try:  # the ONNX pieces need the `onnx` package (the export extra); the rest runs without it
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError:
    onnx = None
needs_onnx = require_module("onnx", install="pip install -e '.[export]' (make install)")

REPO = Path(__file__).resolve().parents[1]
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 4


def io_inputs() -> list[dict]:
    inputs = [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch_size", "sequence_length"]},
        {
            "name": "attention_mask",
            "dtype": "int64",
            "shape": ["batch_size", "past_sequence_length + sequence_length"],
        },
        {"name": "position_ids", "dtype": "int64", "shape": ["batch_size", "sequence_length"]},
    ]
    for i in range(LAYERS):
        for kind in ("key", "value"):
            inputs.append(
                {
                    "name": f"past_key_values.{i}.{kind}",
                    "dtype": "float16",
                    "shape": ["batch_size", KV_HEADS, "past_sequence_length", HEAD_DIM],
                }
            )
    return inputs


def manifest(precision=None, **extra) -> dict:
    """Shaped like export's manifest (export/onnx_export.py) for an optimum Llama export."""
    return {
        "model": {
            "architecture": "LlamaForCausalLM",
            "num_layers": LAYERS,
            "num_kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "max_position_embeddings": 2048,
        },
        "target": "tensorrt",
        "precision": precision
        or {"weights": "int4", "activations": "fp16", "method": "rtn", "block_size": 16},
        "io": {
            "model_file": "model.onnx",
            "tokenizer_file": "tokenizer.json",
            "max_sequence_length": 1024,
            "inputs": io_inputs(),
        },
        "files": {},
        "generation": {"max_new_tokens": 64},
        **extra,
    }


def tiny_model(int4: bool = True, zero_point: bool = False, contrib: bool = False):
    """input_ids -> Cast -> MatMul with a blocked INT4 DequantizeLinear weight (opset 21)."""
    nodes, inits = [], []
    x = helper.make_tensor_value_info(
        "input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]
    )
    y = helper.make_tensor_value_info(
        "logits", TensorProto.FLOAT16, ["batch_size", "sequence_length", 8]
    )
    nodes.append(helper.make_node("Cast", ["input_ids"], ["xf"], to=TensorProto.FLOAT16))
    nodes.append(helper.make_node("Unsqueeze", ["xf", "axes"], ["x3"]))
    inits.append(numpy_helper.from_array(np.array([2], dtype=np.int64), "axes"))
    nodes.append(helper.make_node("Expand", ["x3", "shape"], ["xe"]))
    inits.append(numpy_helper.from_array(np.array([1, 1, 32], dtype=np.int64), "shape"))
    w = np.random.default_rng(0).integers(-8, 8, size=(32, 8))
    if int4:
        inits.append(helper.make_tensor("w_q", TensorProto.INT4, [32, 8], w.flatten().tolist()))
        inits.append(numpy_helper.from_array(np.full((2, 8), 0.01, dtype=np.float16), "w_scale"))
        dq_inputs = ["w_q", "w_scale"]
        if zero_point:
            inits.append(helper.make_tensor("w_zp", TensorProto.INT4, [2, 8], [1] * 16))
            dq_inputs.append("w_zp")
        nodes.append(helper.make_node("DequantizeLinear", dq_inputs, ["w"], axis=0, block_size=16))
    else:
        inits.append(numpy_helper.from_array(w.astype(np.float16), "w"))
    nodes.append(helper.make_node("MatMul", ["xe", "w"], ["logits"]))
    opsets = [helper.make_opsetid("", 21)]
    if contrib:
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                ["xe", "w"],
                ["unused"],
                domain="com.microsoft",
                K=32,
                N=8,
                bits=4,
                block_size=16,
            )
        )
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    graph = helper.make_graph(nodes, "tiny", [x], [y], inits)
    return helper.make_model(graph, opset_imports=opsets)


@pytest.fixture
def bundle(tmp_path) -> Path:
    d = tmp_path / "bundle"
    d.mkdir()
    if onnx is not None:
        onnx.save(tiny_model(), str(d / "model.onnx"))
    else:
        (d / "model.onnx").write_bytes(b"placeholder: the ONNX pre-checks are skipped without onnx")
    m = manifest()
    m["files"] = ["model.onnx"]
    write_manifest(d, m)
    return d


# --- plain functions ------------------------------------------------------------------------


def test_profiles_cover_prefill_and_decode():
    prefill, decode = trt_profiles.profiles_from_manifest(
        manifest(), max_batch=4, max_seq_len=1024, max_prefill=512
    )
    assert prefill.name == "prefill" and decode.name == "decode"
    assert prefill.shapes["input_ids"] == ((1, 1), (1, 128), (4, 512))
    assert decode.shapes["input_ids"] == ((1, 1), (4, 1), (4, 1))
    # past + new == total at the max corner: 512 + 512 == 1024
    assert prefill.shapes["past_key_values.0.key"] == ((1, 2, 0, 4), (1, 2, 0, 4), (4, 2, 512, 4))
    assert prefill.shapes["attention_mask"] == ((1, 1), (1, 128), (4, 1024))
    assert decode.shapes["past_key_values.1.value"] == (
        (1, 2, 1, 4),
        (4, 2, 512, 4),
        (4, 2, 1023, 4),
    )
    assert decode.shapes["attention_mask"] == ((1, 2), (4, 513), (4, 1024))
    assert len(prefill.shapes) == 3 + 2 * LAYERS


def test_profiles_default_to_manifest_length_and_accept_mapping_io():
    m = manifest()
    m["io"]["inputs"] = {i["name"]: {"shape": i["shape"]} for i in io_inputs()}
    prefill, _ = trt_profiles.profiles_from_manifest(m)
    assert prefill.shapes["attention_mask"][2] == (1, 1024)  # io.max_sequence_length
    assert prefill.shapes["input_ids"][2] == (1, 512)  # default prefill: min(512, ctx // 2)
    del m["io"]["max_sequence_length"]
    assert trt_profiles.max_context(m) == 2048  # model.max_position_embeddings


def test_profiles_reject_unknown_dims_and_missing_io():
    m = manifest()
    m["io"]["inputs"][0]["shape"] = ["batch_size", "frames"]
    with pytest.raises(BundleError, match="frames"):
        trt_profiles.profiles_from_manifest(m)
    with pytest.raises(BundleError, match="no 'inputs'"):
        trt_profiles.profiles_from_manifest({"io": {}})
    m["io"]["inputs"][0]["shape"] = ["batch_size", 0]  # export writes 0 for an unnamed dim
    with pytest.raises(BundleError, match="unnamed dynamic dimension"):
        trt_profiles.profiles_from_manifest(m)


def test_profiles_checked_against_network_inputs():
    profiles = trt_profiles.profiles_from_manifest(manifest())
    net = {"input_ids": (-1, -1), "attention_mask": (-1, -1), "position_ids": (-1, -1)}
    net.update(
        {
            f"past_key_values.{i}.{k}": (-1, 2, -1, 4)
            for i in range(LAYERS)
            for k in ("key", "value")
        }
    )
    trt_profiles.check_profiles_cover_inputs(profiles, net)
    with pytest.raises(BundleError, match="no shape for dynamic input cache_position"):
        trt_profiles.check_profiles_cover_inputs(profiles, {**net, "cache_position": (-1,)})
    with pytest.raises(BundleError, match="rank"):
        trt_profiles.check_profiles_cover_inputs(profiles, {**net, "input_ids": (-1, -1, -1)})


@pytest.mark.parametrize(
    "precision,strong,flags",
    [
        ("fp32", False, []),
        ("fp16", False, ["FP16"]),
        ("bf16", False, ["BF16"]),
        ("int8", True, []),
        ("int4", True, []),
        ("int4-awq", True, []),
        ({"weights": "int4", "activations": "fp16"}, True, []),
    ],
)
def test_precision_plans_tensorrt10(precision, strong, flags):
    plan = trt_precision.precision_plan(precision, trt_major=10)
    assert (plan.strongly_typed, plan.flags) == (strong, flags)


def test_precision_plans_tensorrt11_and_errors():
    assert trt_precision.precision_plan("fp16", trt_major=11).flags == []
    assert trt_precision.precision_plan("fp16", trt_major=11).strongly_typed
    with pytest.raises(BundleError, match="unknown precision"):
        trt_precision.precision_plan("int3")


@needs_onnx
def test_onnx_checks(tmp_path):
    from moe2edge.export.check_trt import check_onnx_for_tensorrt

    good = tmp_path / "good.onnx"
    onnx.save(tiny_model(), str(good))
    assert check_onnx_for_tensorrt(good) == []
    zp = tmp_path / "zp.onnx"
    onnx.save(tiny_model(zero_point=True), str(zp))
    with pytest.raises(BundleError, match="non-zero zero point"):
        check_onnx_for_tensorrt(zp)
    contrib = tmp_path / "contrib.onnx"
    onnx.save(tiny_model(contrib=True), str(contrib))
    with pytest.raises(BundleError, match="com.microsoft::MatMulNBits"):
        check_onnx_for_tensorrt(contrib)


DEVICE = {
    "tensorrt_version": "10.3.0",
    "gpu_name": "Orin",
    "compute_capability": "8.7",
    "sm_count": 16,
}


def test_engine_matches_device(tmp_path):
    eng = {"tensorrt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7"}
    trt_plan.check_engine_matches_device(eng, DEVICE)
    for key, other in (
        ("compute_capability", "9.0"),
        ("gpu_name", "NVIDIA H100"),
        ("tensorrt_version", "10.7.0"),
    ):
        with pytest.raises(BundleError, match="built for another device") as err:
            trt_plan.check_engine_matches_device({**eng, key: other}, DEVICE)
        assert isinstance(err.value, RuntimeUserError) and "build-engine" in str(err.value)
    (tmp_path / "model.plan").write_bytes(b"PLAN")
    meta = trt_plan.engine_manifest(
        tmp_path / "model.plan", eng, trt_precision.precision_plan("fp32"), [], model_file="m"
    )
    (tmp_path / "engine.json").write_text(json.dumps(meta))
    trt_plan.check_engine_matches_device(tmp_path, DEVICE)  # directory or file path
    with pytest.raises(BundleError, match="does not exist"):
        trt_plan.check_engine_matches_device(tmp_path / "nope" / "engine.json", DEVICE)


def test_build_without_tensorrt_is_a_clear_error(bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(
        trt_device.TensorRTUnavailable,
        match="TensorRT is not installed; engines are built on the target device",
    ):
        trt_build.build_engine(bundle)


def test_model_file_and_bytes(bundle):
    from moe2edge.runtime.manifest import read_manifest

    m = read_manifest(bundle)
    assert trt_build.model_file(m, bundle) == "model.onnx"
    assert trt_build.model_bytes(m, bundle) == (bundle / "model.onnx").stat().st_size
    with pytest.raises(BundleError, match="cannot tell"):
        trt_build.model_file({"files": {"a.onnx": {}, "b.onnx": {}}}, bundle)


def test_runtime_tensorrt_modules_import_nothing_heavy():
    """The builder's modules and the runner import no onnx, tensorrt, torch or other stage."""
    code = (
        "import importlib, pkgutil, sys, moe2edge.runtime.tensorrt as pkg\n"
        "for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + '.'):\n"
        "    importlib.import_module(m.name)\n"
        "import moe2edge.runtime.tensorrt_engine\n"
        "heavy = {'torch', 'transformers', 'tensorrt', 'onnx'}\n"
        "stages = ('moe2edge.distill', 'moe2edge.export', 'moe2edge.jetson')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith(stages)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


# --- the build flow against a fake tensorrt ---------------------------------------------------


def fake_tensorrt(calls: dict, net_inputs: dict[str, tuple[int, ...]], version: str = "10.3.0"):
    class Obj:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, mn, opt, mx):
            self.shapes[name] = (tuple(mn), tuple(opt), tuple(mx))

    class Config:
        builder_optimization_level = 3

        def __init__(self):
            self.flags, self.profiles, self.cache = [], [], None

        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = (pool, size)

        def set_flag(self, flag):
            self.flags.append(flag)

        def create_timing_cache(self, data):
            calls["cache_in"] = bytes(data)
            return Obj(serialize=lambda: b"TIMING" + bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, p):
            self.profiles.append(p)
            return len(self.profiles) - 1

    class Network:
        num_inputs = len(net_inputs)

        def get_input(self, i):
            name = list(net_inputs)[i]
            return Obj(name=name, shape=net_inputs[name])

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls["network_flags"] = flags
            return Network()

        def create_builder_config(self):
            calls["config"] = Config()
            return calls["config"]

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"PLAN"

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls["parsed"] = path
            return True

    class Logger:
        WARNING, VERBOSE = 2, 4

        def __init__(self, level):
            pass

    return types.SimpleNamespace(
        __version__=version,
        Logger=Logger,
        Builder=Builder,
        OnnxParser=Parser,
        NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=0),
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="workspace"),
        BuilderFlag=types.SimpleNamespace(FP16="fp16", BF16="bf16"),
    )


def test_build_flow_with_fake_tensorrt(bundle, tmp_path, monkeypatch):
    calls: dict = {}
    net = {"input_ids": (-1, -1), "attention_mask": (-1, -1), "position_ids": (-1, -1)}
    net.update(
        {
            f"past_key_values.{i}.{k}": (-1, 2, -1, 4)
            for i in range(LAYERS)
            for k in ("key", "value")
        }
    )
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls, net))
    monkeypatch.setattr(
        trt_device,
        "cuda_device_info",
        lambda index=0: {k: v for k, v in DEVICE.items() if k != "tensorrt_version"},
    )
    cache = tmp_path / "cache" / "timing.cache"
    path = trt_build.build_engine(bundle, max_batch=2, workspace_bytes=1 << 30, timing_cache=cache)

    assert calls["network_flags"] == 1  # strongly typed for INT4 weight-only
    assert calls["config"].flags == []  # and no precision flags
    assert calls["workspace"] == ("workspace", 1 << 30)
    assert [len(p.shapes) for p in calls["config"].profiles] == [7, 7]
    assert (bundle / "engine" / "model.plan").read_bytes() == b"PLAN"
    assert cache.read_bytes() == b"TIMING" and calls["cache_in"] == b""
    meta = json.loads(path.read_text())
    assert meta["compute_capability"] == "8.7" and meta["tensorrt_version"] == "10.3.0"
    assert (
        meta["model_sha256"]
        == json.loads((bundle / "manifest.json").read_text())["files"]["model.onnx"]["sha256"]
    )
    assert [p["name"] for p in meta["profiles"]] == ["prefill", "decode"]
    trt_plan.check_engine_matches_device(path, DEVICE)
    trt_plan.check_engine_matches_bundle(meta, json.loads((bundle / "manifest.json").read_text()))

    trt_build.build_engine(bundle, timing_cache=cache)  # the second build reuses the cache
    assert calls["cache_in"] == b"TIMING"


def test_fp16_bundle_sets_fp16_flag(bundle, monkeypatch):
    m = json.loads((bundle / "manifest.json").read_text())
    m["precision"] = {
        "weights": "fp16",
        "activations": "fp16",
        "method": "none",
        "block_size": None,
    }
    m["files"] = list(m["files"])
    write_manifest(bundle, m)
    calls: dict = {}
    net = {"input_ids": (-1, -1), "attention_mask": (-1, -1), "position_ids": (-1, -1)}
    net.update(
        {
            f"past_key_values.{i}.{k}": (-1, 2, -1, 4)
            for i in range(LAYERS)
            for k in ("key", "value")
        }
    )
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls, net))
    monkeypatch.setattr(trt_device, "cuda_device_info", lambda index=0: dict(DEVICE))
    trt_build.build_engine(bundle)
    assert calls["network_flags"] == 0 and calls["config"].flags == ["fp16"]


# --- a real build where TensorRT and a GPU exist -----------------------------------------------


@needs_onnx
def test_real_build_on_gpu(tmp_path):
    pytest.importorskip(
        "tensorrt", reason="TensorRT not installed (engines are built on the device)"
    )
    try:
        device = trt_device.device_info()
    except trt_device.TensorRTUnavailable as exc:
        pytest.skip(f"no GPU: {exc}")
    d = tmp_path / "bundle"
    d.mkdir()
    onnx.save(tiny_model(), str(d / "model.onnx"))
    m = manifest()
    m["io"]["inputs"] = [{"name": "input_ids", "shape": ["batch_size", "sequence_length"]}]
    m["files"] = ["model.onnx"]
    write_manifest(d, m)
    path = trt_build.build_engine(d, max_seq_len=64, workspace_bytes=256 << 20)
    trt_plan.check_engine_matches_device(path, device)
    assert (d / "engine" / "model.plan").stat().st_size > 0


# --- profile corners and the runner's binding logic (no GPU) ------------------------------


@pytest.mark.parametrize("ctx", [2, 3, 64, 128, 1024, 4096])
@pytest.mark.parametrize("max_prefill", [None, 1, 16, 64, 4096])
@pytest.mark.parametrize("max_batch", [1, 4])
def test_every_profile_corner_is_consistent(ctx, max_prefill, max_batch):
    ranges = trt_profiles.profile_ranges(ctx, max_batch, max_prefill)
    for name, r in ranges.items():
        for i in range(3):  # min, opt, max corners
            assert r["past"][i] + r["new"][i] == r["total"][i], (name, i)
            assert r["total"][i] <= ctx
        for kind in r:
            assert r[kind][0] <= r[kind][1] <= r[kind][2]
        assert r["batch"][0] == 1 and r["batch"][2] == max_batch
    prefill, decode = ranges["prefill"], ranges["decode"]
    assert decode["new"] == (1, 1, 1) and decode["past"][2] == ctx - 1  # decode to the end
    assert prefill["past"][0] == 0 and prefill["past"][2] == ctx - prefill["new"][2]
    # every consistent (past, new) with past + new <= ctx is covered by one profile, in chunks
    for past in {0, 1, ctx // 2, ctx - 2, ctx - 1} - {-1}:
        if 0 <= past < ctx:
            profile, size = trt_binding.next_chunk(ranges, max_batch, past, ctx - past, ctx)
            assert size >= 1 and past + size <= ctx
            r = ranges[profile]
            assert r["past"][0] <= past <= r["past"][2] and size <= r["new"][2]


def test_inconsistent_corner_is_refused():
    bad = {"batch": (1, 1, 1), "new": (1, 8, 64), "past": (0, 0, 1023), "total": (1, 8, 1024)}
    with pytest.raises(BundleError, match=r"max corner: past 1023 \+ new 64 != total 1024"):
        trt_profiles.check_corners("prefill", bad)
    with pytest.raises(BundleError, match="not ordered"):
        trt_profiles.check_corners("x", {**bad, "new": (2, 1, 1), "past": (0, 0, 1023)})


def test_next_chunk_prefers_big_chunks_then_decode_near_the_end():
    ranges = trt_profiles.profile_ranges(128, 4, 32)
    assert trt_binding.next_chunk(ranges, 1, 0, 100, 128) == ("prefill", 32)
    assert trt_binding.next_chunk(ranges, 1, 96, 20, 128) == ("prefill", 20)
    assert trt_binding.next_chunk(ranges, 1, 97, 20, 128) == ("decode", 1)  # tail: one at a time
    assert trt_binding.next_chunk(ranges, 3, 50, 1, 128) == ("decode", 1)
    with pytest.raises(BundleError, match="batch of 5"):
        trt_binding.next_chunk(ranges, 5, 10, 1, 128)


KV = {
    "past_key": "past_key_values.{layer}.key",
    "past_value": "past_key_values.{layer}.value",
    "present_key": "present.{layer}.key",
    "present_value": "present.{layer}.value",
}
NET_IN = ["input_ids", "attention_mask", "position_ids"] + [
    f"past_key_values.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")
]
NET_OUT = ["logits"] + [f"present.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]


def test_binding_plan_binds_everything_or_names_what_it_cannot():
    plan = trt_binding.binding_plan(NET_IN, NET_OUT, KV, LAYERS)
    assert plan.attention_mask == "attention_mask" and plan.position_ids == "position_ids"
    assert plan.past[1] == ("past_key_values.1.key", "past_key_values.1.value")
    with pytest.raises(BundleError, match=r"cannot feed: \['cache_position'\]"):
        trt_binding.binding_plan([*NET_IN, "cache_position"], NET_OUT, KV, LAYERS)
    with pytest.raises(BundleError, match=r"does not read: \['hidden_states'\]"):
        trt_binding.binding_plan(NET_IN, [*NET_OUT, "hidden_states"], KV, LAYERS)
    with pytest.raises(BundleError, match="engine lacks"):
        trt_binding.binding_plan(NET_IN, NET_OUT, KV, LAYERS + 1)
    no_mask = trt_binding.binding_plan(
        [n for n in NET_IN if n != "attention_mask"], NET_OUT, KV, LAYERS
    )
    assert no_mask.attention_mask is None


def test_plan_step_pads_rows_and_keeps_their_positions():
    plan = trt_binding.binding_plan(NET_IN, NET_OUT, KV, LAYERS)
    rows = [np.array([1, 1, 1, 0, 1], bool), np.array([1, 1], bool), np.zeros(0, bool)]
    step = trt_binding.plan_step(rows, 2, plan, KV_HEADS, HEAD_DIM)
    assert (step.batch, step.new, step.past, step.pads) == (3, 2, 5, [0, 3, 5])
    assert step.mask.tolist() == [
        [1, 1, 1, 0, 1, 1, 1],
        [0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 1, 1],
    ]
    assert step.positions.tolist() == [[4, 5], [2, 3], [0, 1]]  # real lengths onwards
    assert step.shapes["attention_mask"] == (3, 7)
    assert step.shapes["past_key_values.0.value"] == (3, KV_HEADS, 5, HEAD_DIM)
    assert trt_binding.valid_runs(rows[0]) == [(0, 3), (4, 5)]
    without_positions = trt_binding.binding_plan(
        [n for n in NET_IN if n != "position_ids"], NET_OUT, KV, LAYERS
    )
    with pytest.raises(BundleError, match="no position_ids"):
        trt_binding.plan_step(rows, 1, without_positions, KV_HEADS, HEAD_DIM)


def test_check_call_turns_false_into_an_error():
    trt_binding.check_call(True, "set_input_shape(x)")
    with pytest.raises(BundleError, match=r"TensorRT refused set_tensor_address\(logits\)"):
        trt_binding.check_call(False, "set_tensor_address(logits)")
