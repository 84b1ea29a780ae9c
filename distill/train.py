"""The training recipe: distil a teacher into a student (or pre-train the demo teacher).

One readable loop in the style of torchtune's recipes, driven by ``TrainConfig``
(YAML + ``key=value`` overrides): AdamW, linear warmup + cosine decay, gradient
clipping, periodic atomic checkpoints (safetensors), tqdm progress, ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from distill.config import to_dict
from distill.data import batch_indices, collate, encode_rows
from distill.demo_data import read_jsonl
from distill.errors import DistillError
from distill.losses import distillation_loss

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    run_dir: str = "runs/distill"
    train_data: str = "runs/demo/data/train.jsonl"
    tokenizer: str = "runs/demo/tokenizer"
    teacher: str | None = "runs/demo/teacher"  # None: plain CE training (teacher pre-training)
    student_preset: str = "demo"
    student_init: str | None = None  # an HF checkpoint dir to start from instead of a preset
    loss: str = "fkl"
    temperature: float = 2.0
    ce_ratio: float = 0.5
    max_steps: int = 400
    batch_size: int = 32
    max_seq_len: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    threads: int = 0  # 0: torch's default


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup then cosine decay to ``min_lr_ratio * lr`` (as a multiplier of lr)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


def save_checkpoint(
    model, optimizer, scheduler, step: int, cfg: TrainConfig, run_dir: Path
) -> Path:
    """Write ``checkpoints/step-N`` atomically: a reader never sees a half-written one."""
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng_torch": torch.get_rng_state(),
        "config": to_dict(cfg),
    }
    torch.save(state, tmp / "training_state.pt")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    old = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())[: -cfg.keep_checkpoints]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return final


def save_final(model, tokenizer, out_dir: Path) -> Path:
    """The finished model as a standard HF checkpoint directory (+ its tokenizer), atomically."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def train_model(model, teacher, tokenizer, cfg: TrainConfig, out_name: str) -> Path:
    """Train ``model`` (against ``teacher`` if given, else CE only); return the saved dir."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    if not Path(cfg.train_data).is_file():
        raise DistillError(f"training data {cfg.train_data} does not exist")
    examples = encode_rows(tokenizer, read_jsonl(cfg.train_data), cfg.max_seq_len)
    if not examples:
        raise DistillError(f"training data {cfg.train_data} is empty")
    ce_ratio = 1.0 if teacher is None else cfg.ce_ratio
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg))
    torch.manual_seed(cfg.seed)
    model.train()
    metrics_file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
    tokens_seen, started = 0, time.perf_counter()
    bar = tqdm(range(cfg.max_steps), desc=f"train {out_name}", unit="step", mininterval=2.0)
    for step in bar:
        batch = collate(
            [examples[i] for i in batch_indices(step, cfg.batch_size, len(examples), cfg.seed)],
            tokenizer.pad_token_id,
        )
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
        losses = distillation_loss(
            logits,
            batch["labels"],
            teacher_logits=teacher_logits,
            loss=cfg.loss,
            temperature=cfg.temperature,
            ce_ratio=ce_ratio,
        )
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        tokens_seen += int(batch["attention_mask"].sum())
        if step % cfg.log_every == 0 or step == cfg.max_steps - 1:
            record = {
                "step": step,
                "loss": losses["loss"].item(),
                "kd": losses["kd"].item(),
                "ce": losses["ce"].item(),
                "grad_norm": float(grad_norm),
                "lr": scheduler.get_last_lr()[0],
                "tok_s": tokens_seen / (time.perf_counter() - started),
            }
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            bar.set_postfix(loss=f"{record['loss']:.3f}")
        if (
            cfg.checkpoint_every
            and (step + 1) % cfg.checkpoint_every == 0
            and step + 1 < cfg.max_steps
        ):
            save_checkpoint(model, optimizer, scheduler, step + 1, cfg, run_dir)
    metrics_file.close()
    model.eval()
    return save_final(model, tokenizer, run_dir / out_name)
