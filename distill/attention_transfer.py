"""Attention transfer: the student learns where the teacher looks, not only what it says.

A logit loss tells the student which token comes next. Where the next token is copied from
the prompt (a room, a number said in words, the device of an earlier turn) the teacher is
near certain, so its soft targets say little more than the one-hot label; its attention says
where the answer comes from. MiniLM (Wang et al. 2020) and TinyBERT (Jiao et al. 2020)
distil that: KL(teacher attention || student attention) per query position, layer by layer.

Heads are averaged per layer (the two models need not have the same number of heads, and
DeepSeek-V3's MLA heads have no student counterpart), and student layer i is matched with
teacher layer ``round((i + 1) * L_t / L_s) - 1`` (TinyBERT's uniform mapping).

The maps are ``[batch, heads, T, T]`` per layer and need eager attention (``sdpa`` and flash
attention return none): fine for short sequences (the demo: T <= 128); at 4k tokens one map
per layer is ~2.7 GB a sequence for a 40-head 13B student, so ``attention_layers`` restricts
the term to the last layers. It needs the live teacher: a teacher cache holds logits only.
"""

from __future__ import annotations

import torch
from torch import Tensor


def teacher_layer_for(student_layer: int, student_layers: int, teacher_layers: int) -> int:
    """The teacher layer matched with ``student_layer`` (0-based, uniform mapping)."""
    if not 0 <= student_layer < student_layers:
        raise ValueError(f"student layer {student_layer} is not in [0, {student_layers})")
    return max(round((student_layer + 1) * teacher_layers / student_layers) - 1, 0)


def attention_transfer_loss(
    student_attentions: tuple[Tensor, ...],
    teacher_attentions: tuple[Tensor, ...],
    query_mask: Tensor,
    last_layers: int = 0,
) -> Tensor:
    """Mean over matched layers of the mean over ``query_mask`` positions of
    KL(teacher || student) between head-averaged attention rows.

    ``*_attentions``: per layer ``[B, heads, T, T]`` (as HF's ``output_attentions`` gives them;
    the head counts may differ); ``query_mask`` ``[B, T]``: the real (non-pad) positions;
    ``last_layers``: match only the student's last n layers (0: all). The teacher gets no
    gradient.
    """
    n_student, n_teacher = len(student_attentions), len(teacher_attentions)
    if not n_student or not n_teacher:
        raise ValueError(
            "no attention maps: load both models with attn_implementation='eager' and call "
            "them with output_attentions=True"
        )
    if last_layers < 0:
        raise ValueError(f"last_layers must be >= 0, got {last_layers}")
    layers = range(max(n_student - last_layers, 0) if last_layers else 0, n_student)
    valid = query_mask.bool()
    count = valid.sum().clamp_min(1)
    total = student_attentions[0].new_zeros((), dtype=torch.float32)
    for i in layers:
        student = student_attentions[i].float().mean(1)  # [B, T, T]
        teacher = teacher_attentions[teacher_layer_for(i, n_student, n_teacher)]
        teacher = teacher.detach().float().mean(1)
        if student.shape != teacher.shape:
            raise ValueError(
                f"attention maps of student layer {i} {tuple(student.shape)} and its teacher "
                f"layer {tuple(teacher.shape)} differ: the two must see the same tokens"
            )
        # KL(t || s) over the keys; 0 * log 0 = 0 where the teacher gives a key no weight
        log_ratio = torch.log(teacher.clamp_min(1e-12)) - torch.log(student.clamp_min(1e-12))
        kl = (teacher * log_ratio).sum(-1)  # [B, T]
        total = total + (kl * valid).sum() / count
    return total / len(layers)


def eager_attention(*models) -> list[str | None]:
    """Switch ``models`` (None skipped) to eager attention, which returns the maps; returns
    their previous implementations, for ``set_attention`` to put back."""
    previous = [None if m is None else m.config._attn_implementation for m in models]
    set_attention(models, ["eager"] * len(models))
    return previous


def set_attention(models, implementations: list[str | None]) -> None:
    for model, implementation in zip(models, implementations, strict=True):
        if model is not None and implementation is not None:
            model.set_attn_implementation(implementation)
