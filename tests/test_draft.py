"""Draft models for speculative decoding (``moe2edge distill draft``): distilled from the tiny
teacher, its checkpoint names the student it drafts for, the export records the target bundle,
and ``acceptance_rate`` is the greedy speculative-decoding acceptance."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe2edge.cli import main
from moe2edge.distill.data import encode_prompt
from moe2edge.distill.draft import DRAFT_META, acceptance_rate, weights_sha256
from moe2edge.distill.errors import DistillError
from moe2edge.distill.student import build_student
from moe2edge.distill.tokenizer import load_tokenizer
from moe2edge.fileio import sha256_file
from moe2edge.rows import read_rows
from moe2edge.runtime.manifest import read_manifest, verify_bundle
from tests._train_common import train_overrides, train_records


@pytest.fixture(scope="module")
def draft_dir(tiny_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("draft_run")
    args = train_overrides(
        tiny_run, run, student_preset="draft", draft_for=tiny_run["student"], max_steps=12
    )
    assert main(["distill", "draft", *args]) == 0
    assert train_records(run)[-1]["kd"] > 0  # distilled from the teacher
    return run / "draft"


def test_draft_checkpoint_names_its_student(tiny_run, draft_dir):
    meta = json.loads((draft_dir / DRAFT_META).read_text())
    target = meta["draft_for"]
    assert target["student_dir"] == str(tiny_run["student"].resolve())
    assert target["weights_sha256"] == sha256_file(tiny_run["student"] / "model.safetensors")
    assert target["weights_sha256"] == weights_sha256(tiny_run["student"])
    draft = AutoModelForCausalLM.from_pretrained(draft_dir)
    assert draft.config.num_hidden_layers == 1
    assert draft.config.vocab_size == target["vocab_size"] == len(load_tokenizer(draft_dir))


def test_export_records_the_target_bundle(tiny_run, draft_dir, tmp_path):
    out = tmp_path / "draft-bundle"
    args = ["export", "onnx", draft_dir, out, "--draft-for", tiny_run["bundle"]]
    assert main([str(a) for a in args + ["--max-new-tokens", "8"]]) == 0
    verify_bundle(out)
    draft = read_manifest(out)["draft"]["target"]
    target = read_manifest(tiny_run["bundle"])
    assert draft["model_sha256"] == target["files"]["model.onnx"]["sha256"]
    assert draft["name"] == tiny_run["bundle"].name and draft["model_file"] == "model.onnx"
    assert (out.parent / draft["path"]).resolve() == tiny_run["bundle"].resolve()
    assert draft["student_dir"] == target["source"]["student_dir"]
    assert draft["student_weights_sha256"] == weights_sha256(tiny_run["student"])
    assert "draft" not in target  # a student bundle is no draft


def test_acceptance_rate_is_the_greedy_speculative_acceptance(tiny_run, draft_dir):
    tokenizer = load_tokenizer(tiny_run["tokenizer"])
    rows = read_rows(tiny_run["eval"])[:4]
    prompts = [encode_prompt(tokenizer, r["utterance"]) for r in rows]
    target = AutoModelForCausalLM.from_pretrained(tiny_run["student"])
    draft = AutoModelForCausalLM.from_pretrained(draft_dir)
    torch.manual_seed(0)
    rate = acceptance_rate(target, draft, prompts, draft_tokens=4, max_new_tokens=12)
    assert 0.0 <= rate <= 1.0
    assert acceptance_rate(target, target, prompts, draft_tokens=4, max_new_tokens=12) == 1.0
    # a draft whose greedy token is never the target's: nothing accepted
    stubborn = build_student("draft", vocab_size=target.config.vocab_size, seed=0)
    with torch.no_grad():
        stubborn.model.norm.weight.zero_()  # all logits 0: always proposes token 0 (padding)
    assert acceptance_rate(target, stubborn, prompts, max_new_tokens=12) == 0.0
    with pytest.raises(DistillError, match="draft_tokens=0"):
        acceptance_rate(target, draft, prompts, draft_tokens=0)


def test_draft_needs_its_target(tiny_run, tmp_path):
    args = train_overrides(tiny_run, tmp_path, student_preset="draft")
    assert main(["distill", "draft", *args]) == 2  # draft_for missing: a user error
    assert not (tmp_path / "draft").exists()
