"""Training modes (on-policy GKD, sequence-level KD, cached teacher) and training options
(LoRA merged on save, activation checkpointing, gradient accumulation)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from moe2edge.distill.data import IGNORE_INDEX, encode_prompt, encode_rows
from moe2edge.distill.errors import DistillError
from moe2edge.distill.evaluate import greedy_replies
from moe2edge.distill.modes import (
    generate_teacher_dataset,
    on_policy_examples,
    sample_replies,
    use_on_policy,
)
from moe2edge.distill.pipeline import distill_student
from moe2edge.distill.student import build_student
from moe2edge.distill.teacher import load_teacher
from moe2edge.distill.tokenizer import load_tokenizer
from moe2edge.distill.train import check_config, train_model
from moe2edge.rows import read_rows
from tests._train_common import train_config, train_records, weights


@pytest.fixture(scope="module")
def models(tiny_run):
    tokenizer = load_tokenizer(tiny_run["tokenizer"])
    teacher = load_teacher(tiny_run["teacher"])
    student = AutoModelForCausalLM.from_pretrained(tiny_run["student"]).eval()
    return tokenizer, teacher, student


def test_batched_greedy_decoding_matches_one_prompt_at_a_time(tiny_run, models):
    tokenizer, teacher, _ = models
    rows = read_rows(tiny_run["eval"])[:6]
    prompts = [encode_prompt(tokenizer, r["prompt"]) for r in rows]
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    batched = sample_replies(
        teacher, prompts, eos_id=tokenizer.eos_token_id, pad_id=0, max_new_tokens=10
    )
    one_by_one = greedy_replies(teacher, tokenizer, [r["prompt"] for r in rows], 10)
    eos = tokenizer.eos_token_id
    assert [[t for t in r if t != eos] for r in batched] == one_by_one


def test_on_policy_mixing_fraction_and_sampling_are_deterministic(tiny_run, models):
    assert not any(use_on_policy(s, 0, 0.0) for s in range(200))
    assert all(use_on_policy(s, 0, 1.0) for s in range(200))
    share = sum(use_on_policy(s, 0, 0.3) for s in range(4000)) / 4000
    assert 0.27 < share < 0.33

    tokenizer, _, student = models
    examples = encode_rows(tokenizer, read_rows(tiny_run["train"])[:4], 64)
    kw = dict(step=7, seed=0, tokenizer=tokenizer, max_seq_len=64, max_new_tokens=12)
    first = on_policy_examples(student, examples, [0, 1, 2, 3], temperature=1.0, **kw)
    again = on_policy_examples(student, examples, [0, 1, 2, 3], temperature=1.0, **kw)
    other_step = on_policy_examples(
        student, examples, [0, 1, 2, 3], temperature=1.0, **kw | {"step": 8}
    )
    assert first == again and first != other_step
    for (ids, labels), (data_ids, data_labels) in zip(first, examples, strict=True):
        n_prompt = data_labels.count(IGNORE_INDEX)
        assert ids[:n_prompt] == data_ids[:n_prompt]  # the data set's prompt ...
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:]  # ... and the student's reply, learnt
        assert 0 < len(ids) - n_prompt <= 12


def test_on_policy_training_trains_on_student_samples(tiny_run, tmp_path):
    off = tmp_path / "off"
    on = tmp_path / "on"
    distill_student(train_config(tiny_run, off, max_steps=3))
    distill_student(train_config(tiny_run, on, max_steps=3, mode="on_policy", lambda_on_policy=1.0))
    rec_off, rec_on = train_records(off), train_records(on)
    assert all(r["on_policy"] for r in rec_on) and not any(r["on_policy"] for r in rec_off)
    assert [r["reply_tokens"] for r in rec_on] != [r["reply_tokens"] for r in rec_off]
    assert all(r["kd"] > 0 for r in rec_on)
    # No CE on the student's own samples (TRL's GKD): the loss is the divergence alone ...
    assert all(r["ce"] > 0 and r["loss"] == pytest.approx(r["kd"], rel=1e-9) for r in rec_on)
    # ... while data-set steps keep the ce_ratio mix.
    assert all(r["loss"] == pytest.approx(0.5 * r["ce"] + 0.5 * r["kd"]) for r in rec_off)


def test_mixed_on_policy_drops_ce_only_on_sampled_steps(tiny_run, tmp_path):
    cfg = train_config(tiny_run, tmp_path, max_steps=6, mode="on_policy", lambda_on_policy=0.5)
    distill_student(cfg)
    records = train_records(tmp_path)
    assert {r["on_policy"] for r in records} == {True, False}
    for r in records:
        ce_ratio = 0.0 if r["on_policy"] else cfg.ce_ratio
        assert r["loss"] == pytest.approx(ce_ratio * r["ce"] + (1 - ce_ratio) * r["kd"])


def test_ce_warmup_trains_ce_only_then_the_mix_and_samples_after_it(tiny_run, tmp_path):
    cfg = train_config(
        tiny_run, tmp_path, max_steps=6, mode="on_policy", lambda_on_policy=1.0, ce_warmup_steps=3
    )
    distill_student(cfg)
    records = train_records(tmp_path)
    warm, after = records[:3], records[3:]
    assert [r["step"] for r in warm] == [0, 1, 2]
    assert all(not r["on_policy"] and r["loss"] == pytest.approx(r["ce"]) for r in warm)
    assert all(r["on_policy"] and r["loss"] == pytest.approx(r["kd"]) for r in after)


def test_teacher_dtype_and_device_map_options(tiny_run, tmp_path):
    """teacher_dtype / teacher_device_map reach load_teacher; a placed teacher trains alike."""
    plain = distill_student(train_config(tiny_run, tmp_path / "plain", max_steps=2))
    placed = distill_student(
        train_config(
            tiny_run, tmp_path / "placed", max_steps=2, teacher_dtype="float32",
            teacher_device_map="auto",
        )
    )  # fmt: skip
    a, b = train_records(tmp_path / "plain"), train_records(tmp_path / "placed")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6)
    assert plain.is_dir() and placed.is_dir()
    with pytest.raises(DistillError, match="teacher_dtype='int8'"):  # before any rank starts
        check_config(train_config(tiny_run, tmp_path / "bad", teacher_dtype="int8"), True)


def test_on_policy_and_seq_kd_need_a_live_teacher(tiny_run, tmp_path):
    cfg = train_config(tiny_run, tmp_path / "x", mode="on_policy", teacher_cache=str(tmp_path))
    with pytest.raises(DistillError, match="cache made on the data set cannot score"):
        distill_student(cfg)
    with pytest.raises(DistillError, match="mode='bogus': use one of off_policy"):
        distill_student(replace(cfg, mode="bogus", teacher_cache=None))


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"ce_warmup_steps": 7}, r"ce_warmup_steps=7 must be in \[0, max_steps\]"),
        ({"ce_warmup_steps": -1}, r"ce_warmup_steps=-1 must be in"),
        ({"ce_ratio": 1.5}, r"ce_ratio=1.5 must be in \[0, 1\]"),
    ],
)
def test_warmup_and_ce_ratio_out_of_range_are_named(tiny_run, tmp_path, bad, message):
    cfg = train_config(tiny_run, tmp_path / "x", max_steps=6, **bad)
    with pytest.raises(DistillError, match=message):
        check_config(cfg, has_teacher=True)


def test_seq_kd_trains_on_the_teachers_replies(tiny_run, models, tmp_path):
    tokenizer, teacher, _ = models
    out = tmp_path / "teacher_replies.jsonl"
    generate_teacher_dataset(teacher, tokenizer, tiny_run["eval"], out, max_new_tokens=10)
    rows, source = read_rows(out), read_rows(tiny_run["eval"])
    greedy = greedy_replies(teacher, tokenizer, [r["prompt"] for r in source], 10)
    assert [r["reply"] for r in rows] == [
        tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in greedy
    ]
    assert [r["reference_reply"] for r in rows] == [r["reply"] for r in source]
    assert [r["action"] for r in rows] == [r["action"] for r in source]
    stamp = out.stat().st_mtime_ns
    generate_teacher_dataset(teacher, tokenizer, tiny_run["eval"], out, max_new_tokens=10)
    assert out.stat().st_mtime_ns == stamp  # same source, teacher, settings: reused

    run = tmp_path / "run"
    data = tmp_path / "train48.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in read_rows(tiny_run["train"])[:48]))
    cfg = train_config(tiny_run, run, max_steps=2, mode="seq_kd", max_new_tokens=8, train_data=data)
    distill_student(cfg)
    generated = read_rows(run / "seq_kd_train.jsonl")
    assert len(generated) == 48
    assert all(r["reference_reply"] for r in generated)
    assert len(train_records(run)) == 2


def test_cached_teacher_at_full_k_trains_like_the_live_teacher(tiny_run, tmp_path):
    from moe2edge.distill.cache import build_cache

    data = tmp_path / "train64.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in read_rows(tiny_run["train"])[:64]))
    vocab = len(load_tokenizer(tiny_run["tokenizer"]))
    cache = tmp_path / "cache"
    common = dict(train_data=str(data), max_steps=4)
    build_cache(
        data=data, tokenizer=tiny_run["tokenizer"], out=cache, teacher=tiny_run["teacher"], k=vocab
    )
    live = distill_student(train_config(tiny_run, tmp_path / "live", **common))
    cached = distill_student(
        train_config(tiny_run, tmp_path / "cached", teacher=None, teacher_cache=cache, **common)
    )
    for a, b in zip(
        train_records(tmp_path / "live"), train_records(tmp_path / "cached"), strict=True
    ):
        assert a["kd"] > 0
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"], (a, b)
        assert abs(a["kd"] - b["kd"]) <= 1e-3 * a["kd"], (a, b)  # fp16 log-probs in the cache
    # fp16 log-probs: Adam amplifies tiny gradients (an element whose gradient is near 0 moves
    # by up to ~lr a step either way), so single elements may differ; the mean may not
    for name, tensor in weights(live).items():
        diff = (weights(cached)[name] - tensor).abs()
        assert diff.max() < 5e-3 and diff.mean() < 1e-5, name

    # A cache made on other data is refused with what to do.
    with pytest.raises(DistillError, match="made on another data set"):
        distill_student(train_config(tiny_run, tmp_path / "bad", teacher=None, teacher_cache=cache))


def test_lora_is_merged_into_a_standard_checkpoint(tiny_run, models, tmp_path):
    tokenizer = models[0]
    student = build_student("tiny", vocab_size=len(tokenizer), seed=0)
    init = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = train_config(
        tiny_run, tmp_path, max_steps=3, lora_r=4, activation_checkpointing=True, grad_accum_steps=2
    )
    out = train_model(student, models[1], tokenizer, cfg, "student")
    saved = weights(out)
    assert not [k for k in saved if "lora" in k] and saved.keys() == init.keys()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded, LlamaForCausalLM)
    assert torch.equal(saved["model.embed_tokens.weight"], init["model.embed_tokens.weight"])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(saved[q], init[q])  # the adapter was trained and merged
    ids = torch.tensor([encode_prompt(tokenizer, "turn on the kitchen lights")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, student.eval()(ids).logits)


def test_grad_accumulation_and_activation_checkpointing_do_not_change_the_step(tiny_run, tmp_path):
    distill_student(train_config(tiny_run, tmp_path / "plain", max_steps=3))
    distill_student(
        train_config(
            tiny_run,
            tmp_path / "accum",
            max_steps=3,
            grad_accum_steps=4,
            activation_checkpointing=True,
        )
    )
    for a, b in zip(
        train_records(tmp_path / "plain"), train_records(tmp_path / "accum"), strict=True
    ):
        for key in ("loss", "kd", "ce", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (key, a, b)


def test_chat_and_text_rows_encode_like_prompt_reply_rows(models):
    tokenizer = models[0]
    prompt_reply = {"prompt": "<|user|> lights on <|assistant|>", "reply": "[lights.on] ok"}
    chat = {
        "messages": [
            {"role": "user", "content": "lights on"},
            {"role": "assistant", "content": "[lights.on] ok"},
        ]
    }
    a, b = encode_rows(tokenizer, [prompt_reply, chat], 64)
    text_ids, text_labels = encode_rows(tokenizer, [{"text": "lights on"}], 64)[0]
    assert a == b  # the tokenizer's chat template renders the demo prompt format
    assert text_labels[0] == IGNORE_INDEX and IGNORE_INDEX not in text_labels[1:]
    assert text_ids[1:] == text_labels[1:]
    with pytest.raises(DistillError, match="expected prompt\\+reply, messages, or text"):
        encode_rows(tokenizer, [{"question": "x"}], 64)


def test_weight_decay_shrinks_matrices_but_not_norm_gains():
    """AdamW decays weight matrices only (nanoGPT, HF Trainer): with a zero gradient, a norm
    gain stays put while a matrix shrinks by lr * weight_decay."""
    from types import SimpleNamespace

    from moe2edge.distill.adapters import make_optimizer

    model = build_student("demo", 64, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = SimpleNamespace(lr=0.1, weight_decay=0.5, peft_method="", lora_r=0)
    optimizer = make_optimizer(model, params, cfg)
    norm = model.model.norm.weight
    matrix = model.model.layers[0].mlp.up_proj.weight
    before = norm.detach().clone(), matrix.detach().clone()
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert torch.equal(norm.detach(), before[0])
    torch.testing.assert_close(matrix.detach(), before[1] * (1 - 0.1 * 0.5))
