"""The accuracy report: metrics through the runtime, manifests annotated, a broken variant caught."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from moe2edge.export.calibration import PromptEncoder, read_rows
from moe2edge.export.derived import derived_bundle, load_model, load_parent, save_model
from moe2edge.export.errors import ExportError
from moe2edge.export.parity import runtime_greedy_with_logits
from moe2edge.export.report import (
    JSON_KEYS,
    extract_action,
    greedy_path,
    greedy_reply,
    json_rows,
    markdown_table,
    report,
    scored_logits,
)
from moe2edge.export.variants import build_all_variants
from moe2edge.runtime.errors import ContextOverflowError
from moe2edge.runtime.generate import Generator
from moe2edge.runtime.manifest import read_manifest, verify_bundle
from tests._export_common import build_tiny_variants

LIMIT = 6  # evaluation rows: the metrics' plumbing, not the tiny model's quality


@pytest.fixture(scope="module")
def tiny_variants(tiny_run, tmp_path_factory):
    return build_tiny_variants(tiny_run, tmp_path_factory)


@pytest.fixture(scope="module")
def broken(tiny_variants, tmp_path_factory):
    """A 'variant' whose lm_head is scrambled: the report must see it."""
    parent = tiny_variants["fp32"]
    manifest = load_parent(parent)

    def build(tmp):
        model = load_model(parent, manifest)
        lm_head = next(n for n in model.graph.node if "lm_head" in n.name and n.op_type == "MatMul")
        init = next(i for i in model.graph.initializer if i.name == lm_head.input[1])
        w = numpy_helper.to_array(init)
        init.CopyFrom(
            numpy_helper.from_array(np.random.default_rng(0).permutation(w, axis=1), init.name)
        )
        return save_model(model, tmp)

    out = tmp_path_factory.mktemp("broken") / "scrambled"
    info = {"weights": "fp32", "activations": "fp32", "method": "scrambled", "block_size": None}
    return derived_bundle(parent, manifest, out, build, info)


def test_extract_action():
    assert extract_action("[lights.on room=kitchen] done, lights on.") == "[lights.on room=kitchen]"
    assert extract_action("ok] then [a b] and [c]") == "[a b]"
    assert extract_action("no action here") is None


def test_report_rows_manifests_and_table(tiny_variants, tiny_run, broken):
    bundles = [tiny_variants[k] for k in ("int8-dynamic", "int4-rtn-16", "trt-int4-16")] + [broken]
    rows = report(bundles, tiny_run["eval"], limit=LIMIT)
    assert [r["bundle"] for r in rows] == [str(tiny_variants["fp32"])] + [str(b) for b in bundles]
    ref, *variants = rows
    assert ref["precision"] == "fp32" and ref["kl"] < 1e-6 and ref["top1_agreement"] == 1.0
    assert ref["weight_ratio"] == 1.0 and ref["task_acc_delta"] == 0.0
    for row in rows:
        assert set(JSON_KEYS) <= set(row) and row["prompts"] == LIMIT
        assert row["perplexity"] > 1.0 and 0.0 <= row["task_acc"] <= 1.0 and row["load_s"] > 0
    good, scrambled = variants[:-1], variants[-1]
    assert all(r["weight_ratio"] < 0.4 for r in good)
    assert all(r["kl"] < 0.01 for r in good)
    assert scrambled["kl"] > 100 * max(r["kl"] for r in good)
    assert scrambled["top1_agreement"] < min(r["top1_agreement"] for r in good)
    # written into every manifest, the FP32 one included; hashes still verify
    for bundle in [tiny_variants["fp32"], *bundles]:
        acc = verify_bundle(bundle)["accuracy"]
        assert acc["eval"]["prompts"] == LIMIT and acc["reference"]["model_sha256"]
    table = markdown_table(rows)
    assert (
        table.count("\n") == len(rows) + 2
        and "| int4-rtn-16 | onnxruntime | int4 | rtn | 16 |" in table
    )
    assert [list(r)[: len(JSON_KEYS)] for r in json_rows(rows)] == [list(JSON_KEYS)] * len(rows)


@pytest.mark.parametrize("name", ["int4-rtn-16", "trt-int4-16", "int8-dynamic"])
def test_teacher_forced_argmax_is_the_greedy_choice_up_to_near_ties(tiny_variants, tiny_run, name):
    """What the fast task accuracy (``exact_greedy=False``) relies on: along the FP32 path,
    up to the first disagreement, the variant's prefill argmax is what its own step-by-step
    greedy decoding picks. Prefill and decode may differ only at near-ties (int8 dynamic
    quantizes activations per tensor, so a prefill's scales span the whole sequence): on
    this near-uniform tiny model such flips happen, always with margins under 1%."""
    ref = Generator.from_bundle(tiny_variants["fp32"])
    gen = Generator.from_bundle(tiny_variants[name])
    enc = PromptEncoder(tiny_variants["fp32"], ref.engine.manifest)
    for row in read_rows(tiny_run["eval"], 8):
        prompt = enc.prompt(row)
        chosen, _ = greedy_path(ref, prompt, 12)
        forced = scored_logits(gen, prompt, chosen)
        argmax = forced.argmax(-1)
        differ = np.nonzero(argmax != np.asarray(chosen))[0]
        upto = int(differ[0]) + 1 if len(differ) else len(chosen)
        own, own_logits = greedy_path(gen, prompt, upto)
        for i, (a, b) in enumerate(zip(own, argmax, strict=False)):
            if a != b:
                spread = own_logits[i].max() - own_logits[i].min()
                assert own_logits[i][a] - own_logits[i][b] < 0.01 * spread
                assert forced[i][b] - forced[i][a] < 0.01 * spread
                break


def test_greedy_decoding_stops_at_the_end_of_the_context(tiny_variants):
    """A prompt that leaves a few positions (a long chat) decodes up to the context's end:
    it neither raises (the engine refuses a token past it) nor returns more."""
    gen = Generator.from_bundle(tiny_variants["fp32"])
    room = 3
    prompt = gen.encode("turn on the kitchen lights")[:1] * (gen.engine.max_length - room)
    eos, gen.eos_token_ids = gen.eos_token_ids, []  # decode until a limit, whatever the model says
    try:
        tokens, steps, hit_eos = runtime_greedy_with_logits(gen, prompt, 64)
        assert len(tokens) == len(steps) == room + 1 and not hit_eos
        reply = greedy_reply(gen, prompt, 64, start=tokens[:2])
    finally:
        gen.eos_token_ids = eos
    assert reply == gen.tokenizer.decode(tokens)
    with pytest.raises(ContextOverflowError):  # one position more than it has
        gen.engine.forward(prompt + tokens, gen.engine.new_cache())


def test_a_long_chat_is_scored_on_what_the_context_holds(tiny_variants, tmp_path):
    """A row whose prompt and reference reply together pass the context (a long chat) is
    scored, not refused: the reply's perplexity over the tokens that fit after the prompt,
    the greedy reply up to the context's end."""
    fp32 = tiny_variants["fp32"]
    gen = Generator.from_bundle(fp32)
    words = ["kitchen"]
    while len(gen.encode_prompt(" ".join(words + ["kitchen"]))) <= gen.engine.max_length - 4:
        words.append("kitchen")
    action = "[lights.on room=kitchen]"
    utterance = " ".join(words)
    row = {"prompt": utterance, "utterance": utterance, "action": action}
    row["reply"] = f"{action} " + "ok, lights on. " * 8
    enc = PromptEncoder(fp32, gen.engine.manifest)
    assert len(enc.prompt(row)) + len(enc.reply(row)) > gen.engine.max_length
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (result,) = report([fp32], path, write=False)
    assert np.isfinite(result["perplexity"]) and result["task_acc"] in (0.0, 1.0)


def test_report_refuses_a_variant_of_another_model(tiny_variants, tiny_run, tmp_path):
    other = tmp_path / "other_fp32"
    shutil.copytree(tiny_variants["fp32"], other)
    model = onnx.load(str(other / "model.onnx"))
    model.producer_name = "another export"  # another model file: other sha256
    onnx.save(model, str(other / "model.onnx"))
    manifest = read_manifest(other)
    from moe2edge.runtime.manifest import write_manifest

    write_manifest(other, {**manifest, "files": list(manifest["files"])})
    with pytest.raises(ExportError, match="another FP32 model"):
        report(
            [tiny_variants["int4-rtn-16"]], tiny_run["eval"], reference=other, limit=2, write=False
        )


def test_build_all_variants_on_the_tiny_student(tiny_variants, tiny_run, tmp_path):
    fp32 = tmp_path / "fp32"
    shutil.copytree(tiny_variants["fp32"], fp32)
    rows = build_all_variants(
        fp32,
        tiny_run["eval"],
        tmp_path / "variants",
        calibration_jsonl=tiny_run["train"],
        block_size=16,
        eval_limit=3,
    )
    got = {(r["target"], r["precision"], r["method"]) for r in rows}
    assert got == {
        ("onnxruntime", "fp32", "none"),
        ("onnxruntime", "fp16", "none"),
        ("onnxruntime", "int8", "dynamic"),
        ("onnxruntime", "int8", "static"),
        ("onnxruntime", "int4", "rtn"),
        ("onnxruntime", "int4", "hqq"),
        ("onnxruntime", "int4", "gptq"),
        ("tensorrt", "fp16", "none"),
        ("tensorrt", "int8", "rtn"),
        ("tensorrt", "int4", "rtn"),
    }
    assert all(list(r)[: len(JSON_KEYS)] == list(JSON_KEYS) for r in rows)
    json.dumps(rows)  # the demo writes them as JSON
    assert (tmp_path / "variants" / "report.md").read_text().count("| tensorrt |") == 3
