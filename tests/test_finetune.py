"""Domain fine-tuning with peft (``moe2edge distill finetune``): every method lowers the loss on
rooms the student never saw, merged weights compute what base + adapters compute, the staged
schedule trains attention adapters first, bad keys are named."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from moe2edge.cli import main
from moe2edge.distill.adapters import ADAPTER_DIR, PEFT_METHODS
from moe2edge.distill.config import load_config
from moe2edge.distill.data import IGNORE_INDEX, collate, encode_rows
from moe2edge.distill.demo_data import room_rows, split_by_room, write_jsonl
from moe2edge.distill.errors import DistillError
from moe2edge.distill.finetune import (
    FinetuneConfig,
    finetune_student,
    load_with_adapters,
    merge_adapter_dir,
)
from moe2edge.distill.pipeline import distill_student
from moe2edge.distill.tokenizer import load_tokenizer
from moe2edge.rows import read_rows
from tests._train_common import train_config, train_records, weights

NEW_ROOMS = ["garage", "basement"]


@pytest.fixture(scope="module")
def domain(tiny_run, tmp_path_factory):
    """A student distilled on the rooms other than NEW_ROOMS; train/eval rows of NEW_ROOMS."""
    root = tmp_path_factory.mktemp("domain")
    old, _ = split_by_room(read_rows(tiny_run["train"]), NEW_ROOMS)
    write_jsonl(old, root / "old.jsonl")
    write_jsonl(room_rows(2, NEW_ROOMS, 160), root / "new_train.jsonl")
    write_jsonl(room_rows(3, NEW_ROOMS, 24), root / "new_eval.jsonl")
    cfg = train_config(tiny_run, root / "base_run", train_data=root / "old.jsonl", max_steps=40)
    return {
        "student": distill_student(cfg),
        "train": root / "new_train.jsonl",
        "eval": root / "new_eval.jsonl",
        "tokenizer": load_tokenizer(tiny_run["tokenizer"]),
    }


def heldout_loss(model, domain) -> float:
    examples = encode_rows(domain["tokenizer"], read_rows(domain["eval"]), 64)
    batch = collate(examples, domain["tokenizer"].pad_token_id)
    with torch.no_grad():
        logits = model.eval()(input_ids=batch["input_ids"], use_cache=False).logits
    return float(
        F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
    )


def finetune_overrides(domain, run_dir, **extra) -> list[str]:
    values = dict(
        run_dir=run_dir,
        student_init=domain["student"],
        train_data=domain["train"],
        batch_size=8,
        max_steps=40,
        warmup_steps=2,
        lr=0.01,
        lora_r=4,
        log_every=4,
        threads=1,
        tensorboard=False,
        plot=False,
    )
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_each_method_learns_the_new_rooms_and_merges_exactly(domain, tmp_path, method):
    # vectors only: a larger step; LoRA+: B learns lora_plus_lr_ratio (16) times faster
    extra = {"ia3": {"lr": 0.3}, "vera": {"lr": 0.1}, "lora_plus": {"lr": 0.002}}.get(method, {})
    cfg = load_config(
        FinetuneConfig,
        None,
        finetune_overrides(domain, tmp_path, peft_method=method, merge_adapters=False, **extra),
    )
    out = finetune_student(cfg)
    assert (out / ADAPTER_DIR / "adapter_config.json").is_file()
    # the base next to the adapters is the starting student, unchanged
    for name, tensor in weights(domain["student"]).items():
        assert torch.equal(weights(out)[name], tensor), name
    start = AutoModelForCausalLM.from_pretrained(domain["student"])
    adapted = load_with_adapters(out)
    before, after = heldout_loss(start, domain), heldout_loss(adapted, domain)
    assert after < before - 0.04, (method, before, after)

    merged_dir = merge_adapter_dir(out, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert isinstance(merged, LlamaForCausalLM)
    assert not [k for k in weights(merged_dir) if "lora" in k or "ia3" in k or "hada" in k]
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 22]])
    with torch.no_grad():
        torch.testing.assert_close(
            merged.eval()(ids).logits, adapted.eval()(ids).logits, atol=1e-4, rtol=1e-4
        )


def test_cli_merges_and_stage_one_trains_attention_adapters_only(tiny_run, domain, tmp_path):
    # stage_steps [6, 0]: the MLP adapters never leave their (zero) initialisation
    args = finetune_overrides(
        domain, tmp_path, max_steps=6, stage_steps="[6, 0]", teacher=tiny_run["teacher"]
    )
    assert main(["distill", "finetune", *args]) == 0
    out = tmp_path / "finetuned"
    assert not (out / ADAPTER_DIR).exists()
    saved, start = weights(out), weights(domain["student"])
    assert saved.keys() == start.keys()
    assert not torch.equal(
        saved["model.layers.0.self_attn.q_proj.weight"],
        start["model.layers.0.self_attn.q_proj.weight"],
    )
    for name in start:
        if ".mlp." in name:
            assert torch.equal(saved[name], start[name]), name
    assert all(r["kd"] > 0 for r in train_records(tmp_path))  # the teacher adds KD to CE
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["stage_steps"] == [6, 0] and config["peft_method"] == "lora"

    from moe2edge.export.errors import ExportError
    from moe2edge.export.onnx_export import export_fp32

    keep = load_config(
        FinetuneConfig,
        None,
        finetune_overrides(domain, tmp_path / "k", max_steps=1, merge_adapters=False),
    )
    with pytest.raises(ExportError, match="unmerged peft adapters"):
        export_fp32(finetune_student(keep), tmp_path / "bundle")


@pytest.mark.parametrize(
    "override, match",
    [
        ("peft_method=adalora", "peft_method='adalora'"),
        ("stage_steps=[4, 4]", "stage_steps=\\[4, 4\\] sums to 8 but max_steps=40"),
        ("lora_r=0", "peft_method=lora needs lora_r >= 1"),
        ("lora_plus_lr_ratio=0.5", "lora_plus_lr_ratio=0.5 must be >= 1"),
        ("lora_target_modules=[lm_head]", "lora_target_modules"),
        ("student_init=none", "set student_init"),
    ],
)
def test_bad_finetune_keys_are_named(domain, tmp_path, override, match):
    cfg = load_config(FinetuneConfig, None, finetune_overrides(domain, tmp_path) + [override])
    with pytest.raises(DistillError, match=match):
        from moe2edge.distill.train import check_config

        check_config(cfg, has_teacher=False)
        finetune_student(cfg)
