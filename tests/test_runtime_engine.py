"""The engine on both graph flavours: optimum's (concat KV) and the model builder's fast graph
(GroupQueryAttention, KV updated in place in one buffer), against PyTorch."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from moe2edge.export.errors import ExportError
from moe2edge.runtime import ContextOverflowError, Generator, OnnxEngine, SamplingParams
from moe2edge.runtime.engine import open_engine
from moe2edge.runtime.errors import BundleError
from tests._runtime_common import PROMPTS, fast_bundles, torch_greedy, torch_logits
from tests.conftest import PYTHON, ROOT, subprocess_env


@pytest.fixture(scope="module")
def fast(tiny_run):
    return fast_bundles(tiny_run["root"], tiny_run["tokenizer"])


@pytest.fixture(scope="module", params=["optimum", "fast"])
def flavour(request, tiny_run, fast):
    """(bundle, student) for each graph flavour at fp32."""
    if request.param == "optimum":
        return tiny_run["bundle"], tiny_run["student"]
    return fast["fp32"], fast["student"]


def test_fast_bundle_manifest_describes_the_shared_buffer(fast):
    manifest = json.loads((fast["fp32"] / "manifest.json").read_text())
    kv, io = manifest["io"]["kv_cache"], manifest["io"]
    assert kv["shared_buffer"] is True
    assert kv["max_length"] == io["max_sequence_length"] == 128
    assert kv["past_key"] == "past_key_values.{layer}.key"
    inputs = {e["name"] for e in io["inputs"]}
    # the attention's lengths are inputs: no mask, and none of the six ops that derived them
    assert inputs >= {"input_ids", "seqlens_k", "total_sequence_length"}
    assert not inputs & {"attention_mask", "position_ids"}
    ops = manifest["source"]["graph_ops"]
    assert ops["com.microsoft::GroupQueryAttention"] == 2
    assert not {"ai.onnx::ReduceSum", "ai.onnx::Shape"} & set(ops)
    assert "com.microsoft::MatMulNBits" not in ops
    int4 = json.loads((fast["int4"] / "manifest.json").read_text())
    assert int4["precision"]["weights"] == "int4" and int4["precision"]["block_size"] == 32
    assert int4["source"]["graph_ops"]["com.microsoft::MatMulNBits"] >= 8
    assert "num_logits_to_keep" in {e["name"] for e in int4["io"]["inputs"]}


def test_logits_and_greedy_match_pytorch_at_fp32(flavour):
    bundle, student = flavour
    gen = Generator.from_bundle(bundle, threads=1)
    ids = gen.encode_prompt(PROMPTS[0])
    logits = gen.engine.forward(ids, gen.engine.new_cache(), all_logits=True)
    assert np.abs(logits - torch_logits(student, ids)).max() <= 1e-4
    for prompt in PROMPTS:
        ids = gen.encode_prompt(prompt)
        steps = 10
        reply = gen.generate(prompt, SamplingParams(max_new_tokens=steps, ignore_eos=True))
        assert reply.token_ids == torch_greedy(student, ids, steps)


def test_incremental_prefill_equals_one_shot(flavour):
    bundle, _ = flavour
    engine = OnnxEngine(bundle, threads=1)
    rng = np.random.default_rng(0)
    ids = [int(t) for t in rng.integers(3, 300, 40)]
    one = engine.forward(ids, engine.new_cache(), all_logits=True)
    cache, parts, at = engine.new_cache(), [], 0
    for size in (7, 1, 1, 13, 1, 17):
        parts.append(engine.forward(ids[at : at + size], cache, all_logits=True))
        at += size
    assert at == len(ids) and cache.length == len(ids) and cache.tokens == ids
    assert np.abs(np.concatenate(parts) - one).max() <= 1e-4
    # and greedy decoding continues identically from both caches
    a, b = engine.new_cache(), cache
    la, lb = engine.forward(ids, a), parts[-1][-1]
    for _ in range(8):
        ta, tb = int(la.argmax()), int(lb.argmax())
        assert ta == tb
        la, lb = engine.forward([ta], a), engine.forward([tb], b)


def test_copies_share_storage_until_they_diverge(flavour):
    bundle, _ = flavour
    engine = OnnxEngine(bundle, threads=1)
    ids = list(range(5, 35))
    ref = engine.forward(ids, engine.new_cache(), all_logits=True)
    base = engine.new_cache()
    engine.forward(ids[:10], base)
    a, b = base.copy(), base.copy()
    la = engine.forward(ids[10:20], a, all_logits=True)
    lb = engine.forward(ids[10:15], b, all_logits=True)  # must not clobber a's positions
    la2 = engine.forward(ids[20:], a, all_logits=True)
    assert np.abs(la - ref[10:20]).max() <= 1e-4
    assert np.abs(lb - ref[10:15]).max() <= 1e-4
    assert np.abs(la2 - ref[20:]).max() <= 1e-4
    assert base.length == 10 and a.length == 30 and b.length == 15
    if engine.shared_buffer:
        assert a.storage is not b.storage  # the second writer copied on write
    # truncate: forget positions and run others there
    a.truncate(12)
    other = engine.forward([7, 8, 9], a, all_logits=True)
    assert (
        np.abs(other - engine.forward(ids[:12] + [7, 8, 9], engine.new_cache(), True)[12:]).max()
        <= 1e-4
    )


def test_context_overflow_is_a_clear_error(flavour):
    bundle, _ = flavour
    engine = OnnxEngine(bundle, threads=1, max_length=16)
    cache = engine.new_cache()
    engine.forward(list(range(3, 15)), cache)
    with pytest.raises(ContextOverflowError, match="exceed the model's context of 16"):
        engine.forward(list(range(3, 8)), cache)
    assert cache.length == 12  # nothing lost: the cache is still usable
    engine.forward([3, 4, 5, 6], cache)
    with pytest.raises(ContextOverflowError):
        engine.forward([3], cache)


def test_int4_fast_bundle_decodes_like_its_fp32_parent(fast):
    fp32, int4 = OnnxEngine(fast["fp32"], threads=1), OnnxEngine(fast["int4"], threads=1)
    ids = list(range(5, 45))
    a = fp32.forward(ids, fp32.new_cache(), all_logits=True)
    b = int4.forward(ids, int4.new_cache(), all_logits=True)
    assert np.isfinite(b).all()
    # random weights quantized to 4 bits: close in direction, not equal
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() > 0.9
    assert 0 < np.abs(a - b).max()


def test_a_fast_bundle_with_the_builders_mask_input_gives_the_same_logits(
    fast, tmp_path, monkeypatch
):
    """Bundles exported before the lengths edit feed a mask; the engine runs both forms."""
    from moe2edge.export import genai_graph

    monkeypatch.setattr(genai_graph, "feed_attention_lengths", lambda path: False)
    old = genai_graph.export_fast(
        fast["student"], tmp_path / "mask", "fp32", builder_dir=fast["genai_fp32"]
    )
    manifest = json.loads((old / "manifest.json").read_text())
    assert "attention_mask" in {e["name"] for e in manifest["io"]["inputs"]}
    a, b = OnnxEngine(fast["fp32"], threads=1), OnnxEngine(old, threads=1)
    ca, cb = a.new_cache(), b.new_cache()
    for chunk in ([5, 6, 7, 8], [9], [10, 11], [12]):  # prefill, decode, incremental prefill
        assert np.abs(a.forward(chunk, ca) - b.forward(chunk, cb)).max() <= 1e-5
    cb.truncate(2)  # a rewind: the old graph's mask shortens with it
    ca.truncate(2)
    assert np.abs(a.forward([40], ca) - b.forward([40], cb)).max() <= 1e-5


def test_spinning_modes_set_ort_thread_options(tiny_run):
    from moe2edge.runtime.engine import session_options

    run = session_options(1, "run")
    assert run.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert run.get_session_config_entry("session.force_spinning_stop") == "1"
    off = session_options(1, False)
    assert off.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    on = session_options(1, "on")
    assert on.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    with pytest.raises(BundleError, match="spinning must be one of"):
        OnnxEngine(tiny_run["bundle"], spinning="fast")


def test_engine_rejects_bad_backends(tiny_run):
    with pytest.raises(BundleError, match="unknown device"):
        OnnxEngine(tiny_run["bundle"], device="gpu")
    with pytest.raises(BundleError, match="unknown backend"):
        open_engine(tiny_run["bundle"], backend="metal")
    with pytest.raises(BundleError, match="max_length must be in"):
        OnnxEngine(tiny_run["bundle"], max_length=10**6)


def test_fast_export_refuses_head_dim_not_multiple_of_16(tiny_run, tmp_path):
    from moe2edge.export.genai_graph import export_fast

    with pytest.raises(ExportError, match="head_dim 8.*multiple of 16"):
        export_fast(tiny_run["student"], tmp_path / "b")
    assert not (tmp_path / "b").exists()


PROBE = """
import sys, threading
from moe2edge.runtime import Generator, SamplingParams
from moe2edge.runtime.session import Conversation
gen = Generator.from_bundle(sys.argv[1], threads=1)
conv = Conversation(gen, system="you are a home assistant")
conv.user_turn("turn on the", final=False)
reply = conv.say("turn on the lights", SamplingParams(max_new_tokens=4, ignore_eos=True))
heavy = sorted(n for n in ("torch", "transformers", "optimum", "onnx") if n in sys.modules)
print(repr((heavy, len(reply.token_ids))))
"""


def test_fast_bundle_and_session_run_without_torch(fast):
    proc = subprocess.run(
        [PYTHON, "-c", PROBE, str(fast["int4"])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=subprocess_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    heavy, generated = eval(proc.stdout.strip().splitlines()[-1])
    assert heavy == [] and generated == 4


def test_fast_export_for_cuda_records_fp16_and_runs_on_cpu_too(fast, tmp_path):
    """The builder's CUDA graph (fp16 activations and KV) through export_fast's own builder
    run; ONNX Runtime's CPU kernels take it as well, so its numerics are checked here."""
    from moe2edge.export.genai_graph import export_fast

    bundle = export_fast(fast["student"], tmp_path / "cuda", "fp16", ep="cuda")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["runtime"] == {"backend": "cuda"}
    assert manifest["io"]["kv_cache"]["dtype"] == "float16"
    assert manifest["precision"]["activations"] == "fp16"
    engine = OnnxEngine(bundle, device="cpu", threads=1)
    ref = OnnxEngine(fast["fp32"], threads=1)
    ids = list(range(5, 30))
    a = engine.forward(ids, engine.new_cache(), all_logits=True)
    assert a.dtype == np.float32
    assert np.abs(a - ref.forward(ids, ref.new_cache(), all_logits=True)).max() < 1e-2
    with pytest.raises(ExportError, match="fp16 graphs are for the GPU"):
        export_fast(fast["student"], tmp_path / "x", "fp16")


def test_calibration_feed_of_a_fast_bundle_runs_its_graph(fast):
    """moe2edge.export.calibration builds prefill feeds from the manifest's inputs (the lengths too)."""
    import onnxruntime as ort

    from moe2edge.export.calibration import prefill_feed

    manifest = json.loads((fast["fp32"] / "manifest.json").read_text())
    ids = list(range(5, 25))
    feed = prefill_feed(manifest, ids)
    session = ort.InferenceSession(str(fast["fp32"] / "model.onnx"))
    logits = session.run(["logits"], feed)[0][0]
    engine = OnnxEngine(fast["fp32"], threads=1)
    expected = engine.forward(ids, engine.new_cache(), all_logits=True)
    assert logits.shape == expected.shape
    assert np.abs(logits - expected).max() <= 1e-4
