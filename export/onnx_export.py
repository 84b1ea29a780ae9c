"""FP32 ONNX export of an HF student with optimum (``text-generation-with-past``).

optimum writes ``model.onnx`` (+ ``model.onnx_data`` for large models) with
``past_key_values.{i}.key/value`` inputs and ``present.{i}.key/value`` outputs; we put
it in a bundle with the tokenizer and a manifest (see docs/bundle-format.md).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from moe2edge.export.bundle import describe_io, kv_contract, load_json, model_summary, write_bundle
from moe2edge.export.errors import ExportError

log = logging.getLogger(__name__)

PROMPT_PLACEHOLDER = "{prompt}"


def prompt_template_from_tokenizer(tokenizer) -> str:
    """Render the tokenizer's chat template for one user turn into a ``{prompt}`` template."""
    if not getattr(tokenizer, "chat_template", None):
        return PROMPT_PLACEHOLDER
    marker = "\x00PROMPT\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], add_generation_prompt=True, tokenize=False
    )
    return text.replace("{", "{{").replace("}", "}}").replace(marker, PROMPT_PLACEHOLDER)


def generation_config(student_dir: Path, tokenizer, max_new_tokens: int) -> dict[str, Any]:
    eos = tokenizer.eos_token_id
    return {
        "prompt_template": prompt_template_from_tokenizer(tokenizer),
        "add_bos": tokenizer.bos_token_id is not None,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_ids": [eos] if eos is not None else [],
        "pad_token_id": tokenizer.pad_token_id,
        "max_new_tokens": max_new_tokens,
    }


def check_student_dir(student_dir: Path) -> dict[str, Any]:
    if not student_dir.is_dir():
        raise ExportError(
            f"student directory {student_dir} does not exist; pass the HF "
            "checkpoint directory that `moe2edge distill train` wrote"
        )
    if not (student_dir / "config.json").is_file():
        raise ExportError(f"{student_dir} has no config.json: not a Hugging Face checkpoint")
    if not (student_dir / "tokenizer.json").is_file():
        raise ExportError(
            f"{student_dir} has no tokenizer.json; save the tokenizer with the "
            "student (distill does) or copy it there"
        )
    return load_json(student_dir / "config.json")


def export_fp32(
    student_dir: str | Path,
    bundle_dir: str | Path,
    max_new_tokens: int = 64,
    overwrite: bool = False,
    opset: int | None = None,
) -> Path:
    """Export ``student_dir`` to an FP32 ONNX Runtime bundle at ``bundle_dir``."""
    from optimum.exporters.onnx import main_export
    from transformers import AutoTokenizer

    student_dir = Path(student_dir)
    config = check_student_dir(student_dir)
    tokenizer = AutoTokenizer.from_pretrained(student_dir, local_files_only=True)
    summary = model_summary(config)

    def fill(tmp: Path) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(dir=tmp.parent) as work:
            log.info("exporting %s with optimum (text-generation-with-past)", student_dir)
            try:
                main_export(
                    str(student_dir),
                    output=work,
                    task="text-generation-with-past",
                    opset=opset,
                    device="cpu",
                    do_validation=False,
                    local_files_only=True,
                )
            except Exception as exc:  # optimum raises many types; name the model and the fix
                raise ExportError(
                    f"optimum could not export {student_dir} ({type(exc).__name__}: {exc})"
                ) from exc
            onnx_files = [
                p.name
                for p in Path(work).iterdir()
                if p.name == "model.onnx" or p.name.startswith("model.onnx_data")
            ]
            for name in onnx_files:
                shutil.move(str(Path(work) / name), tmp / name)
        shutil.copy(student_dir / "tokenizer.json", tmp / "tokenizer.json")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        return {
            "model": summary,
            "target": "onnxruntime",
            "precision": {
                "weights": "fp32",
                "activations": "fp32",
                "method": "none",
                "block_size": None,
                "parent": None,
            },
            "io": {
                "model_file": "model.onnx",
                "tokenizer_file": "tokenizer.json",
                "max_sequence_length": summary["max_position_embeddings"],
                "kv_cache": kv_contract(summary, "float32"),
                **describe_io(tmp / "model.onnx"),
            },
            "generation": generation_config(student_dir, tokenizer, max_new_tokens),
            "source": {"student_dir": str(student_dir.resolve()), "exporter": "optimum-onnx"},
            "files": onnx_files + ["tokenizer.json", "config.json"],
        }

    return write_bundle(bundle_dir, fill, overwrite=overwrite)
