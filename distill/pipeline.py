"""The distill stage's steps as plain functions (the CLI and the demo call these).

``distill_student`` lives in ``train.py`` (its torchrun entry point needs it without importing
this module) and is re-exported here with the other steps.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from moe2edge.distill.data import read_data
from moe2edge.distill.errors import DistillError
from moe2edge.distill.teacher import (
    active_parameters,
    build_demo_teacher,
    count_parameters,
    load_teacher,
)
from moe2edge.distill.tokenizer import check_vocab_matches, load_tokenizer, train_tokenizer
from moe2edge.distill.train import TrainConfig, distill_student, train_model

__all__ = ["distill_student", "make_tokenizer", "merge_teacher_into_dense", "pretrain_demo_teacher"]

log = logging.getLogger(__name__)


def make_tokenizer(train_jsonl: str | Path, out_dir: str | Path, vocab_size: int = 384) -> Path:
    rows = read_data(train_jsonl)
    return train_tokenizer([r["prompt"] + " " + r["reply"] for r in rows], out_dir, vocab_size)


def pretrain_demo_teacher(cfg: TrainConfig) -> Path:
    """DEMO ONLY: pre-train a tiny DeepSeek-V3 on the demo data so there is a teacher.

    A real teacher is a published checkpoint (e.g. DeepSeek-V3) loaded by ``load_teacher``.
    """
    tokenizer = load_tokenizer(cfg.tokenizer)
    teacher = build_demo_teacher(len(tokenizer), seed=cfg.seed)
    out = train_model(teacher, None, tokenizer, replace(cfg, teacher=None), "teacher")
    info = {
        "demo_only": True,
        "params": count_parameters(teacher),
        "active_params": active_parameters(teacher),
    }
    (out / "moe2edge_teacher.json").write_text(json.dumps(info, indent=2))
    return out


def merge_teacher_into_dense(
    teacher_dir: str | Path,
    tokenizer_dir: str | Path,
    calib_jsonl: str | Path,
    out_dir: str | Path,
    keep_experts: int | None = None,
    calib_examples: int = 64,
    max_seq_len: int = 64,
) -> Path:
    """Write a dense HF checkpoint merged from the teacher's experts (use as student_init)."""
    from moe2edge.distill.checkpoint import save_final
    from moe2edge.distill.data import collate, encode_rows
    from moe2edge.distill.merge import merge_moe_to_dense

    teacher = load_teacher(teacher_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    check_vocab_matches(tokenizer, teacher.config.vocab_size, "teacher")
    rows = read_data(calib_jsonl, calib_examples)
    if not rows:
        raise DistillError(f"calibration data {calib_jsonl} is empty")
    examples = encode_rows(tokenizer, rows, max_seq_len)
    batches = [
        collate(examples[i : i + 16], tokenizer.pad_token_id) for i in range(0, len(examples), 16)
    ]
    batches = [{k: b[k] for k in ("input_ids", "attention_mask")} for b in batches]
    student = merge_moe_to_dense(teacher, batches, keep_experts)
    return save_final(student, tokenizer, Path(out_dir))
