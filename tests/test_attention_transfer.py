"""Attention transfer (distill/attention_transfer.py): the loss against a float64 reference
written out loop by loop, the layer mapping, and a training run that uses it."""

from __future__ import annotations

import math

import pytest
import torch

from moe2edge.distill.attention_transfer import (
    attention_transfer_loss,
    eager_attention,
    teacher_layer_for,
)
from moe2edge.distill.data import collate, encode_rows
from moe2edge.distill.errors import DistillError
from moe2edge.distill.pipeline import distill_student
from moe2edge.distill.student import load_student
from moe2edge.distill.teacher import load_teacher
from moe2edge.distill.tokenizer import load_tokenizer
from moe2edge.distill.train import check_config
from moe2edge.rows import read_rows
from tests._train_common import train_config, train_records


def _maps(layers: int, batch: int, heads: int, t: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    out = []
    for _ in range(layers):
        scores = torch.randn(batch, heads, t, t, generator=g).masked_fill(~causal, -math.inf)
        out.append(scores.softmax(-1))
    return tuple(out)


def _reference(student, teacher, mask, last_layers=0) -> float:
    ls, lt = len(student), len(teacher)
    layers = list(range(ls - last_layers, ls)) if last_layers else list(range(ls))
    total = 0.0
    for i in layers:
        j = max(round((i + 1) * lt / ls) - 1, 0)
        s, t = student[i].double().mean(1), teacher[j].double().mean(1)
        kl, count = 0.0, 0
        for b in range(mask.shape[0]):
            for q in range(mask.shape[1]):
                if not mask[b, q]:
                    continue
                count += 1
                for k in range(s.shape[-1]):
                    if t[b, q, k] > 0:
                        kl += float(t[b, q, k] * (t[b, q, k].log() - s[b, q, k].log()))
        total += kl / count
    return total / len(layers)


@pytest.mark.parametrize(
    "student_layers, teacher_layers, heads, last",
    [(3, 3, (6, 4), 0), (2, 4, (2, 3), 0), (3, 6, (4, 4), 1)],
)
def test_loss_equals_the_float64_reference(student_layers, teacher_layers, heads, last):
    student = _maps(student_layers, 2, heads[0], 5, seed=0)
    teacher = _maps(teacher_layers, 2, heads[1], 5, seed=1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    got = attention_transfer_loss(student, teacher, mask, last)
    assert got.item() == pytest.approx(_reference(student, teacher, mask, last), rel=1e-5)
    assert attention_transfer_loss(teacher[:student_layers], teacher[:student_layers], mask) < 1e-6


def test_only_the_student_gets_a_gradient():
    student = tuple(m.clone().requires_grad_(True) for m in _maps(2, 1, 2, 4, seed=0))
    teacher = tuple(m.clone().requires_grad_(True) for m in _maps(2, 1, 2, 4, seed=1))
    attention_transfer_loss(student, teacher, torch.ones(1, 4)).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    assert all(t.grad is None for t in teacher)


def test_layer_mapping_is_uniform_and_bounds_are_checked():
    assert [teacher_layer_for(i, 3, 3) for i in range(3)] == [0, 1, 2]
    assert [teacher_layer_for(i, 2, 6) for i in range(2)] == [2, 5]
    assert [teacher_layer_for(i, 4, 2) for i in range(4)] == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="not in"):
        teacher_layer_for(3, 3, 6)
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        attention_transfer_loss((), (), torch.ones(1, 2))


def test_the_real_teacher_and_student_give_maps_that_fit(tiny_run):
    """DeepSeek-V3 MLA teacher and Llama student, eager: head counts differ, maps line up."""
    tokenizer = load_tokenizer(tiny_run["tokenizer"])
    teacher = load_teacher(tiny_run["teacher"])
    student = load_student(tiny_run["student"])
    eager_attention(student, teacher)
    rows = read_rows(tiny_run["train"])[:4]
    batch = collate(encode_rows(tokenizer, rows, 64), tokenizer.pad_token_id)
    s = student(input_ids=batch["input_ids"], output_attentions=True).attentions
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], output_attentions=True).attentions
    loss = attention_transfer_loss(s, t, batch["attention_mask"])
    assert torch.isfinite(loss) and loss > 0


def test_training_with_attention_transfer_moves_the_students_attention(tiny_run, tmp_path):
    tokenizer = load_tokenizer(tiny_run["tokenizer"])
    teacher = load_teacher(tiny_run["teacher"])
    rows = read_rows(tiny_run["train"])[:16]
    batch = collate(encode_rows(tokenizer, rows, 64), tokenizer.pad_token_id)

    def at_loss(student_dir):
        student = load_student(student_dir)
        eager_attention(student, teacher)
        with torch.no_grad():
            s = student(input_ids=batch["input_ids"], output_attentions=True).attentions
            t = teacher(input_ids=batch["input_ids"], output_attentions=True).attentions
        return float(attention_transfer_loss(s, t, batch["attention_mask"]))

    common = dict(max_steps=12, lr=1e-2, ce_ratio=0.5, temperature=1.0)
    plain = distill_student(train_config(tiny_run, tmp_path / "plain", **common))
    moved = distill_student(train_config(tiny_run, tmp_path / "at", attention_weight=5.0, **common))
    assert at_loss(moved) < 0.8 * at_loss(plain)
    assert all(math.isfinite(r["loss"]) for r in train_records(tmp_path / "at"))
    # the checkpoint is saved as it would be without the term (sdpa, not eager)
    assert load_student(moved).config._attn_implementation != "eager"


def test_attention_transfer_needs_the_live_teacher(tiny_run, tmp_path):
    cfg = train_config(tiny_run, tmp_path / "x", attention_weight=1.0)
    with pytest.raises(DistillError, match="attention_weight=1.0 needs the live teacher"):
        check_config(cfg, has_teacher=False)
    with pytest.raises(DistillError, match="attention_weight and attention_layers must be >= 0"):
        check_config(train_config(tiny_run, tmp_path / "y", attention_layers=-1), True)
