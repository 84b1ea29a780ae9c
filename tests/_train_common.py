"""Helpers shared by the tests/test_train_*.py files (training on the tiny_run fixture)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def train_overrides(tiny_run, run_dir: Path, **extra) -> list[str]:
    """key=value overrides for a quick tiny-student run against the tiny teacher."""
    values = dict(
        run_dir=run_dir,
        train_data=tiny_run["train"],
        tokenizer=tiny_run["tokenizer"],
        teacher=tiny_run["teacher"],
        student_preset="tiny",
        batch_size=8,
        max_steps=6,
        warmup_steps=2,
        checkpoint_every=0,
        log_every=1,
        threads=1,
        tensorboard=False,
        plot=False,
    )
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def train_config(tiny_run, run_dir: Path, **extra):
    from moe2edge.distill.config import load_config
    from moe2edge.distill.train import TrainConfig

    return load_config(TrainConfig, None, train_overrides(tiny_run, run_dir, **extra))


def train_records(run_dir: Path, split: str = "train") -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split", "train") == split]


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(model_dir) / "model.safetensors")


def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    """(sha256, mtime_ns) of every file under root: to show nothing was touched."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }
