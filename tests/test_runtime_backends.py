"""GPU backends: ONNX Runtime's CUDA and TensorRT execution providers and the native TensorRT
runner. Each runs where its hardware is (compared with the CPU engine), and is skipped with
the reason elsewhere; the errors a user gets without the hardware are tested everywhere."""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from moe2edge.runtime import Generator, SamplingParams
from moe2edge.runtime.engine import OnnxEngine, open_engine
from moe2edge.runtime.errors import BundleError
from moe2edge.runtime.session import Conversation, PrefixStore
from tests._runtime_common import fast_bundles

PROVIDERS = ort.get_available_providers()


def has_gpu() -> bool:
    try:
        from moe2edge.runtime.tensorrt.device import cuda_device_info

        cuda_device_info()
        return True
    except Exception:  # no driver / no device: the reason is in the skip message
        return False


needs_cuda_ep = pytest.mark.skipif(
    "CUDAExecutionProvider" not in PROVIDERS,
    reason=f"onnxruntime has no CUDAExecutionProvider here (providers: {PROVIDERS})",
)
needs_trt_ep = pytest.mark.skipif(
    "TensorrtExecutionProvider" not in PROVIDERS,
    reason=f"onnxruntime has no TensorrtExecutionProvider here (providers: {PROVIDERS})",
)
needs_tensorrt = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None or not has_gpu(),
    reason="TensorRT (python bindings) and a CUDA GPU are needed for the native runner",
)


def compare_with_cpu(bundle, device: str, atol: float) -> None:
    cpu, gpu = OnnxEngine(bundle, threads=1), OnnxEngine(bundle, device=device)
    ids = list(range(5, 40))
    a = cpu.forward(ids, cpu.new_cache(), all_logits=True)
    cache = gpu.new_cache()
    b = np.concatenate([gpu.forward(ids[:20], cache, True), gpu.forward(ids[20:], cache, True)])
    assert np.abs(a - b).max() <= atol
    ca, cb = cpu.new_cache(), gpu.new_cache()
    la, lb = cpu.forward(ids, ca), gpu.forward(ids, cb)
    for _ in range(6):
        assert int(la.argmax()) == int(lb.argmax())
        la, lb = cpu.forward([int(la.argmax())], ca), gpu.forward([int(lb.argmax())], cb)


@needs_cuda_ep
@pytest.mark.parametrize("which", ["optimum", "fast"])
def test_cuda_execution_provider_matches_cpu(tiny_run, which):
    bundle = (
        tiny_run["bundle"]
        if which == "optimum"
        else fast_bundles(tiny_run["root"], tiny_run["tokenizer"])["fp32"]
    )
    compare_with_cpu(bundle, "cuda", atol=2e-3)
    gen = Generator.from_bundle(bundle, device="cuda")
    conv = Conversation(gen, system="hello", prefixes=PrefixStore())
    assert (
        len(
            conv.say(
                "turn on the lights", SamplingParams(max_new_tokens=4, ignore_eos=True)
            ).token_ids
        )
        == 4
    )


@needs_trt_ep
def test_tensorrt_execution_provider_matches_cpu(tiny_run):
    compare_with_cpu(tiny_run["bundle"], "tensorrt", atol=2e-2)


@needs_tensorrt
def test_native_tensorrt_runner_matches_cpu(tiny_run, tmp_path):
    from moe2edge.runtime.tensorrt.build import build_engine

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_run["bundle"], bundle)
    build_engine(bundle, max_seq_len=128, max_prefill=64)
    trt_engine = open_engine(bundle, "tensorrt-native")
    cpu = OnnxEngine(bundle, threads=1)
    ids = list(range(5, 40))
    a = cpu.forward(ids, cpu.new_cache(), all_logits=True)
    cache = trt_engine.new_cache()
    b = np.concatenate(
        [trt_engine.forward(ids[:30], cache, True), trt_engine.forward(ids[30:], cache, True)]
    )
    assert np.abs(a - b).max() <= 2e-2
    copy = cache.copy()
    copy.truncate(20)
    c = trt_engine.forward(ids[20:], copy, all_logits=True)
    assert np.abs(a[20:] - c).max() <= 2e-2
    gen = Generator(trt_engine, Generator.from_bundle(bundle, threads=1).tokenizer)
    conv = Conversation(gen, system="hello", prefixes=PrefixStore())
    reply = conv.say("turn on the lights", SamplingParams(max_new_tokens=6, ignore_eos=True))
    ref = Conversation(
        Generator.from_bundle(bundle, threads=1), system="hello", prefixes=PrefixStore()
    )
    assert (
        reply.token_ids
        == ref.say(
            "turn on the lights", SamplingParams(max_new_tokens=6, ignore_eos=True)
        ).token_ids
    )


def test_native_runner_without_an_engine_says_how_to_build_one(tiny_run):
    with pytest.raises(BundleError, match="no TensorRT engine at .*build-engine"):
        open_engine(tiny_run["bundle"], "tensorrt-native")


def test_gpu_devices_without_the_provider_are_a_clear_error(tiny_run):
    for device in ("cuda", "tensorrt"):
        if "CUDAExecutionProvider" in PROVIDERS and device == "cuda":
            continue
        if "TensorrtExecutionProvider" in PROVIDERS and device == "tensorrt":
            continue
        with pytest.raises(BundleError, match="onnxruntime-gpu"):
            OnnxEngine(tiny_run["bundle"], device=device)
