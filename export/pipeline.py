"""Library-level steps of the export stage that combine a checkpoint and a bundle."""

from __future__ import annotations

from pathlib import Path

from moe2edge.export.bundle import update_manifest
from moe2edge.export.calibration import prompt_text, read_rows
from moe2edge.export.parity import check_parity
from moe2edge.runtime.generate import Generator


def read_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """User messages from a data file (``calibration.prompt_text``: ``utterance`` preferred)."""
    return [prompt_text(row) for row in read_rows(path, limit)]


def parity_for_bundle(
    student_dir: str | Path,
    bundle_dir: str | Path,
    prompts_file: str | Path,
    limit: int | None = 50,
) -> dict:
    """PyTorch-vs-ONNX Runtime parity on the prompts; recorded in the bundle's manifest."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        student_dir, dtype="float32", local_files_only=True
    )
    generator = Generator.from_bundle(bundle_dir)
    result = check_parity(model, generator, read_prompts(prompts_file, limit))
    update_manifest(bundle_dir, "parity", {k: v for k, v in result.items() if k != "per_prompt"})
    return result
