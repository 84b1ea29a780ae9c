"""TRL's ``GKDTrainer`` on the same work as one of our runs (used by bench/distill.py).

Same teacher object, same student initial weights (a saved checkpoint both start from), same
rows (as ``messages``, which TRL's ``DataCollatorForChatML`` renders with the tokenizer's chat
template: the ids our encoder produces, see tests/test_prompt_encoding.py), same global
batch, steps, optimizer settings (AdamW, betas 0.9/0.95, weight decay, warm-up then cosine
to 10% of the peak rate, gradient clipping) and divergence: generalized JSD at
``beta``, temperature 1 (so our T^2 scaling is 1 too), off-policy (``lmbda=0``: no student
sampling, the same teacher-forced work as ours). Tokens/s counts the non-pad tokens of the
batches TRL's collator built over ``train_runtime``, as our ``tok_s`` counts the non-pad
tokens of ours over the training loop.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def chat_rows(rows: list[dict]) -> list[dict]:
    """Our rows as TRL's conversational ``messages`` (the last assistant turn is learnt)."""
    out = []
    for row in rows:
        if "messages" in row:
            out.append({"messages": row["messages"]})
        else:
            out.append(
                {
                    "messages": [
                        {"role": "user", "content": row["utterance"]},
                        {"role": "assistant", "content": row["reply"]},
                    ]
                }
            )
    return out


class CountingCollator:
    """TRL's collator, counting the non-pad tokens of every batch it builds."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.tokens = 0

    def __call__(self, examples):
        batch = self.inner(examples)
        self.tokens += int(batch["attention_mask"].sum())
        return batch


def run_trl_gkd(
    student_init: Path,
    teacher,
    tokenizer,
    rows: list[dict],
    out_dir: Path,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_steps: int,
    weight_decay: float,
    grad_clip: float,
    max_seq_len: int,
    beta: float,
    seed: int,
    threads: int = 0,
) -> dict:
    """Train with ``GKDTrainer``; returns {tok_s, seconds, student_dir}."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    from trl.experimental.utils import DataCollatorForChatML

    if threads:
        torch.set_num_threads(threads)
    student = AutoModelForCausalLM.from_pretrained(student_init, dtype=torch.float32)
    args = GKDConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=batch_size,
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=grad_clip,
        lmbda=0.0,
        beta=beta,
        temperature=1.0,
        max_length=max_seq_len,
        logging_steps=max(steps // 5, 1),
        save_strategy="no",
        report_to=[],
        seed=seed,
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    collator = CountingCollator(DataCollatorForChatML(tokenizer=tokenizer, max_length=max_seq_len))
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        data_collator=collator,
        train_dataset=Dataset.from_list(chat_rows(rows)),
        processing_class=tokenizer,
    )
    started = time.perf_counter()
    output = trainer.train()
    seconds = output.metrics.get("train_runtime", time.perf_counter() - started)
    student_dir = out_dir / "student"
    trainer.model.save_pretrained(student_dir)
    tokenizer.save_pretrained(student_dir)
    return {
        "tok_s": round(collator.tokens / seconds, 1),
        "seconds": round(seconds, 1),
        "student_dir": str(student_dir),
    }
