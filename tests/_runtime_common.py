"""Helpers shared by tests/test_runtime_*.py: a tiny student with GroupQueryAttention-sized
heads (head_dim 16) and its fast-graph bundles (fp32, int4), built once per test session."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

PROMPTS = ["turn on the kitchen lights", "dim the office lights to forty percent", "hello"]


@functools.cache
def fast_bundles(root: Path, tokenizer_dir: Path) -> dict[str, Path]:
    """student (random init, head_dim 16) -> builder (fp32 + int4, one subprocess) -> bundles."""
    import torch

    from moe2edge.distill.student import build_student
    from moe2edge.distill.tokenizer import load_tokenizer
    from moe2edge.export.genai_graph import export_fast, run_builder

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(tokenizer_dir)
    model = build_student("tiny", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128)
    student = root / "student16"
    model.save_pretrained(student)
    tokenizer.save_pretrained(student)
    built = run_builder(student, {"fp32": root / "genai_fp32", "int4": root / "genai_int4"})
    out = {"student": student, **{f"genai_{p}": d for p, d in built.items()}}
    for precision, src in built.items():
        out[precision] = export_fast(
            student, root / f"fast_{precision}", precision, max_new_tokens=12, builder_dir=src
        )
    return out


def torch_greedy(student_dir: Path, prompt_ids: list[int], steps: int) -> list[int]:
    """The PyTorch student's greedy continuation (no KV cache: full forward every step)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids) :]


def torch_logits(student_dir: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()
