"""``moe2edge distill finetune``: domain fine-tuning of a distilled student with peft adapters.

The same training loop as distillation (``train.train_model``) from ``student_init``, with
the adapter keys of ``TrainConfig`` (distill/adapters.py): ``peft_method``, ``lora_r``,
``lora_alpha``, ``lora_target_modules``, ``lora_plus_lr_ratio``, ``stage_steps`` and
``merge_adapters``. CE on the new domain's replies; with ``teacher`` (or ``teacher_cache``)
the loss is the distillation loss mixed with CE by ``ce_ratio``, as in ``distill train``.

``merge_adapters: true`` writes ``run_dir/finetuned`` as a plain checkpoint (adapters merged,
no peft needed, ready for ``moe2edge export``); ``false`` writes the unchanged base there and
the adapters in ``run_dir/finetuned/adapter`` (peft's ``save_pretrained``);
``moe2edge distill merge-adapters`` merges such a directory later.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from moe2edge.distill.adapters import ADAPTER_DIR, PEFT_METHODS, adapter_method, merge_adapters
from moe2edge.distill.errors import DistillError
from moe2edge.distill.student import load_student
from moe2edge.distill.tokenizer import apply_special_ids, check_vocab_matches, load_tokenizer
from moe2edge.distill.train import TrainConfig, teacher_of, train_model
from moe2edge.fileio import atomic_dir


@dataclass
class FinetuneConfig(TrainConfig):
    """``TrainConfig`` with fine-tuning defaults: LoRA r=8 on a student, CE only."""

    run_dir: str = "runs/finetune"
    tokenizer: str = ""  # "": the tokenizer saved with student_init
    teacher: str | None = None  # a teacher (or teacher_cache) adds KD to the CE loss
    peft_method: str | None = "lora"
    lora_r: int = 8
    lora_alpha: int = 16
    lr: float = 1e-3
    max_steps: int = 100
    warmup_steps: int = 10
    checkpoint_every: int = 0


def finetune_student(cfg: TrainConfig) -> Path:
    """Fine-tune ``cfg.student_init`` on ``cfg.train_data``; returns ``run_dir/finetuned``."""
    if not cfg.student_init:
        raise DistillError("finetune starts from a distilled student: set student_init=DIR")
    if not Path(cfg.student_init, "config.json").is_file():
        raise DistillError(f"student_init={cfg.student_init} is not an HF checkpoint directory")
    if adapter_method(cfg) is None:
        raise DistillError(f"finetune trains adapters: set peft_method to one of {PEFT_METHODS}")
    if not cfg.tokenizer:
        cfg = replace(cfg, tokenizer=str(cfg.student_init))
    teacher = teacher_of(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer)
    student = load_student(cfg.student_init)
    apply_special_ids(student, tokenizer)
    check_vocab_matches(tokenizer, student.config.vocab_size, "student")
    if teacher is not None and teacher.config.vocab_size != student.config.vocab_size:
        raise DistillError(
            f"teacher vocabulary {teacher.config.vocab_size} != student vocabulary "
            f"{student.config.vocab_size}; KD needs the same vocabulary (or drop teacher)"
        )
    return train_model(student, teacher, tokenizer, cfg, "finetuned")


def load_with_adapters(model_dir: str | Path):
    """The base of ``model_dir`` with its ``adapter`` dir (``merge_adapters=false``), in peft."""
    from peft import PeftModel

    model_dir = Path(model_dir)
    if not (model_dir / ADAPTER_DIR / "adapter_config.json").is_file():
        raise DistillError(f"{model_dir} has no {ADAPTER_DIR}/adapter_config.json to load")
    return PeftModel.from_pretrained(load_student(model_dir), model_dir / ADAPTER_DIR)


def merge_adapter_dir(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Merge the adapters of ``model_dir`` into its base: a plain checkpoint at ``out_dir``."""
    from transformers import AutoTokenizer

    merged = merge_adapters(load_with_adapters(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)
