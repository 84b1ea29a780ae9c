"""The tiny demo run the tests and the service benchmarks use (seconds to build): demo data
-> tokenizer -> tiny MoE teacher -> tiny student -> FP32 bundle. The model is nearly
untrained: the service and the pipeline are what is measured, not the model."""

from __future__ import annotations

from pathlib import Path


def build_tiny_run(root: str | Path) -> dict[str, Path]:
    """Build the tiny run under ``root``: paths of its data, tokenizer, models and bundle."""
    root = Path(root)
    import torch

    from moe2edge.distill.demo_data import write_demo_data
    from moe2edge.distill.pipeline import distill_student, make_tokenizer
    from moe2edge.distill.teacher import build_demo_teacher
    from moe2edge.distill.tokenizer import load_tokenizer
    from moe2edge.distill.train import TrainConfig, train_model
    from moe2edge.export.onnx_export import export_fp32

    torch.set_num_threads(1)
    # the tiny model's replies are what the voice tests were written against (a long one to
    # "turn on the kitchen lights"): its data keeps the follow-up-only multi-turn rows of
    # one earlier turn
    paths = write_demo_data(
        root / "data",
        seed=1,
        train_size=400,
        eval_size=12,
        new_command_share=0.0,
        history_turns=1,
        compound_after_turn=False,
    )
    make_tokenizer(paths["train"], root / "tokenizer", vocab_size=448)  # rows fit 128 tokens
    tokenizer = load_tokenizer(root / "tokenizer")
    common = dict(
        train_data=str(paths["train"]),
        tokenizer=str(root / "tokenizer"),
        batch_size=8,
        max_steps=6,
        warmup_steps=2,
        checkpoint_every=0,
        log_every=2,
    )
    teacher = build_demo_teacher(
        len(tokenizer),
        hidden_size=32,
        moe_intermediate_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        v_head_dim=8,
    )
    teacher_dir = train_model(
        teacher,
        None,
        tokenizer,
        TrainConfig(run_dir=str(root / "teacher_run"), teacher=None, **common),
        "teacher",
    )
    student_dir = distill_student(
        TrainConfig(
            run_dir=str(root / "student_run"),
            teacher=str(teacher_dir),
            student_preset="tiny",
            **common,
        )
    )
    bundle_dir = export_fp32(student_dir, root / "bundle", max_new_tokens=12)
    return {
        "root": root,
        "train": paths["train"],
        "eval": paths["eval"],
        "grammar": paths["grammar"],
        "tokenizer": root / "tokenizer",
        "teacher": teacher_dir,
        "student": student_dir,
        "bundle": bundle_dir,
    }
