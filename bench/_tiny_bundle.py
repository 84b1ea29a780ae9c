"""The tiny demo bundle the service benchmarks serve (seconds to build; the service is measured,
not the model): demo data -> tokenizer -> tiny MoE teacher -> tiny student -> FP32 bundle,
the recipe of the tests' ``tiny_run`` fixture."""

from __future__ import annotations

from pathlib import Path


def build_tiny_bundle(root: str | Path) -> dict[str, Path]:
    """Build (or reuse) the tiny bundle under ``root``: {"bundle", "grammar", "eval"}."""
    root = Path(root)
    bundle = root / "bundle"
    paths = {"bundle": bundle, "grammar": root / "data" / "grammar.jsgf", "eval": root / "data"}
    if (bundle / "manifest.json").is_file():
        return _found(root, paths)
    import torch

    from moe2edge.distill.demo_data import write_demo_data
    from moe2edge.distill.pipeline import distill_student, make_tokenizer
    from moe2edge.distill.teacher import build_demo_teacher
    from moe2edge.distill.tokenizer import load_tokenizer
    from moe2edge.distill.train import TrainConfig, train_model
    from moe2edge.export.onnx_export import export_fp32

    torch.set_num_threads(1)
    data = write_demo_data(root / "data", seed=1, train_size=400, eval_size=12)
    make_tokenizer(data["train"], root / "tokenizer", vocab_size=448)
    tokenizer = load_tokenizer(root / "tokenizer")
    common = dict(
        train_data=str(data["train"]),
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
    cfg = TrainConfig(run_dir=str(root / "teacher_run"), teacher=None, **common)
    teacher_dir = train_model(teacher, None, tokenizer, cfg, "teacher")
    student_dir = distill_student(
        TrainConfig(
            run_dir=str(root / "student_run"),
            teacher=str(teacher_dir),
            student_preset="tiny",
            **common,
        )
    )
    export_fp32(student_dir, bundle, max_new_tokens=12)
    return _found(root, paths | {"grammar": data["grammar"], "eval": data["eval"]})


def _found(root: Path, paths: dict[str, Path]) -> dict[str, Path]:
    if not paths["grammar"].is_file():
        grammars = sorted((root / "data").glob("*.jsgf"))
        paths["grammar"] = grammars[0] if grammars else None
    return paths
