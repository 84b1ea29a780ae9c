"""The native TensorRT runner's logic on host memory (``tests/_trt_emulation.py``): chunked
prefill across both profiles, free copies, truncation by mask, batches of rows of
different lengths joining and leaving, every binding checked. Its logits are compared
with the CPU OnnxEngine on the same bundle. The real runner on a GPU is
``tests/test_runtime_backends.py::test_native_tensorrt_runner_matches_cpu`` and
``bench/gpu_check.py``."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from moe2edge.runtime import tensorrt_engine
from moe2edge.runtime.engine import OnnxEngine
from moe2edge.runtime.errors import BundleError, ContextOverflowError
from moe2edge.runtime.manifest import read_manifest
from moe2edge.runtime.tensorrt.plan import ENGINE_MANIFEST, PLAN_NAME, engine_manifest
from moe2edge.runtime.tensorrt.precision import precision_plan
from moe2edge.runtime.tensorrt.profiles import profiles_from_manifest
from tests._trt_emulation import HostCuda, emulated_tensorrt

DEVICE = {"tensorrt_version": "10.3.0", "gpu_name": "Emulated", "compute_capability": "8.7"}
CONTEXT, PREFILL, BATCH = 64, 16, 3
ATOL = 2e-4


@pytest.fixture(scope="module")
def bundle(tiny_run, tmp_path_factory):
    """The tiny FP32 bundle with an engine.json as ``build_engine`` writes it."""
    import shutil

    d = tmp_path_factory.mktemp("trt") / "bundle"
    shutil.copytree(tiny_run["bundle"], d)
    manifest = read_manifest(d)
    profiles = profiles_from_manifest(manifest, BATCH, CONTEXT, PREFILL)
    (d / "engine").mkdir()
    plan = d / "engine" / PLAN_NAME
    plan.write_bytes(b"emulated plan")
    meta = engine_manifest(
        plan, DEVICE, precision_plan("fp32"), profiles, model_file="model.onnx",
        model_sha256=manifest["files"]["model.onnx"]["sha256"],
    )  # fmt: skip
    import json

    (d / "engine" / ENGINE_MANIFEST).write_text(json.dumps(meta))
    return d


def open_runner(bundle, monkeypatch, **kwargs):
    meta = __import__("json").loads((bundle / "engine" / ENGINE_MANIFEST).read_text())
    trt = emulated_tensorrt(bundle / "model.onnx", meta["profiles"], **kwargs)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(tensorrt_engine, "device_info", lambda: dict(DEVICE))
    cuda = HostCuda()
    return tensorrt_engine.TensorRTEngine(bundle, cuda=cuda), trt, cuda


@pytest.fixture(scope="module")
def cpu(bundle):
    return OnnxEngine(bundle, threads=1)


def reference(cpu, ids):
    return cpu.forward(ids, cpu.new_cache(), all_logits=True)


def test_opens_with_the_engines_profiles_and_keeps_the_runtime(bundle, monkeypatch):
    runner, trt, _ = open_runner(bundle, monkeypatch)
    assert runner.max_length == CONTEXT and runner.max_prefill == PREFILL
    assert runner.max_batch == BATCH
    assert runner.ranges["prefill"]["past"] == (0, 0, CONTEXT - PREFILL)
    assert runner.runtime is not None and trt.state["runtimes"] == 1
    engine = trt.state["engine"]
    assert [c.profile for c in engine.contexts] == [0, 1]  # one context per profile


def test_chunked_prefill_over_both_profiles_matches_cpu(bundle, cpu, monkeypatch):
    runner, trt, _ = open_runner(bundle, monkeypatch)
    ids = [int(t) for t in np.random.default_rng(0).integers(5, 400, size=CONTEXT - 4)]
    cache = runner.new_cache()
    got = np.concatenate(
        [runner.forward(ids[:50], cache, all_logits=True), runner.forward(ids[50:], cache, True)]
    )
    np.testing.assert_allclose(got, reference(cpu, ids), atol=ATOL)
    runs = trt.state["engine"].runs
    # chunks of 16 in the prefill profile while the past is <= 64 - 16, then 2 more;
    # past 50 is beyond the prefill profile: the last 10 go one by one through decode
    assert [(r["profile"], r["input_ids"][1]) for r in runs] == [(0, 16)] * 3 + [(0, 2)] + [
        (1, 1)
    ] * 10
    assert cache.length == len(ids)
    runner.forward(ids[:4], cache)  # fills the context exactly
    with pytest.raises(ContextOverflowError, match="exceed the engine's context"):
        runner.forward([7], cache)


def test_copy_is_free_and_truncate_masks(bundle, cpu, monkeypatch):
    runner, _, cuda = open_runner(bundle, monkeypatch)
    ids = list(range(5, 35))
    full = reference(cpu, ids)
    cache = runner.new_cache()
    runner.forward(ids[:25], cache, all_logits=True)
    d2d = cuda.bytes[3]
    branch = cache.copy()
    assert cuda.bytes[3] == d2d  # no device copy for a copy()
    branch.truncate(20)
    np.testing.assert_allclose(runner.forward(ids[20:], branch, True), full[20:], atol=ATOL)
    # the original is untouched by its branch
    np.testing.assert_allclose(runner.forward(ids[25:], cache, True), full[25:], atol=ATOL)
    branch.truncate(10)  # a second hole, then decode token by token over the holes
    for t in range(10, 14):
        np.testing.assert_allclose(runner.forward([ids[t]], branch), full[t], atol=ATOL)


def test_batch_of_different_lengths_matches_sequential(bundle, cpu, monkeypatch):
    runner, trt, cuda = open_runner(bundle, monkeypatch)
    rng = np.random.default_rng(1)
    prompts = [[int(t) for t in rng.integers(5, 400, size=n)] for n in (7, 19, 3)]
    caches = [runner.new_cache() for _ in prompts]
    last = [runner.forward(p, c) for p, c in zip(prompts, caches, strict=True)]
    seqs = [list(p) for p in prompts]
    for step in range(4):
        nxt = [int(np.argmax(logit)) for logit in last]
        before = cuda.bytes[3]
        out = runner.forward_batch([[t] for t in nxt], caches)
        if step > 0:
            assert cuda.bytes[3] == before  # the batch's layout is kept: nothing copied
        for i, t in enumerate(nxt):
            seqs[i].append(t)
            np.testing.assert_allclose(out[i], reference(cpu, seqs[i])[-1], atol=ATOL)
        last = list(out)
    assert trt.state["engine"].runs[-1]["input_ids"] == (3, 1)
    # a row leaves: the other two are gathered once, then run in place again
    two = [caches[0], caches[2]]
    out = runner.forward_batch([[9], [11]], two)
    for row, (i, t) in enumerate(((0, 9), (2, 11))):
        seqs[i].append(t)
        np.testing.assert_allclose(out[row], reference(cpu, seqs[i])[-1], atol=ATOL)
    # the one that left continues alone, and a new cache joins the batch
    fresh = runner.new_cache()
    runner.forward([5, 6, 7], fresh)
    out = runner.forward_batch([[13], [14]], [caches[1], fresh])
    seqs[1].append(13)
    np.testing.assert_allclose(out[0], reference(cpu, seqs[1])[-1], atol=ATOL)
    np.testing.assert_allclose(out[1], reference(cpu, [5, 6, 7, 14])[-1], atol=ATOL)


def test_batched_prefill_of_equal_chunks(bundle, cpu, monkeypatch):
    runner, _, _ = open_runner(bundle, monkeypatch)
    a, b = list(range(10, 30)), list(range(40, 55))
    ca, cb = runner.new_cache(), runner.new_cache()
    runner.forward(a[:5], ca)  # different pasts, then the same number of new tokens
    out = runner.forward_batch([a[5:], b], [ca, cb], all_logits=True)
    np.testing.assert_allclose(out[0], reference(cpu, a)[5:], atol=ATOL)
    np.testing.assert_allclose(out[1], reference(cpu, b), atol=ATOL)


def test_bad_batches_are_clear_errors(bundle, monkeypatch):
    runner, _, _ = open_runner(bundle, monkeypatch)
    caches = [runner.new_cache() for _ in range(BATCH + 1)]
    with pytest.raises(BundleError, match="exceed the engine's batch of 3"):
        runner.forward_batch([[1]] * (BATCH + 1), caches)
    with pytest.raises(ValueError, match="same number"):
        runner.forward_batch([[1], [1, 2]], caches[:2])
    with pytest.raises(ValueError, match="twice"):
        runner.forward_batch([[1], [2]], [caches[0], caches[0]])


def test_refused_binding_is_an_error_not_garbage(bundle, monkeypatch):
    runner, _, _ = open_runner(bundle, monkeypatch, refuse={"position_ids"})
    with pytest.raises(BundleError, match=r"refused set_input_shape\(position_ids"):
        runner.forward([1, 2, 3], runner.new_cache())


def test_an_input_the_runner_cannot_feed_is_refused_on_open(bundle, monkeypatch):
    with pytest.raises(BundleError, match=r"cannot feed: \['cache_position'\]"):
        open_runner(bundle, monkeypatch, extra_inputs=("cache_position",))
