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
from moe2edge.fileio import sha256_file
from moe2edge.memory import hand_back_freed_memory

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


def renders_turn_by_turn(tokenizer, prompt_template: str, end_of_turn: str | None) -> bool:
    """Whether the chat template writes a conversation as its turns one after the other: a
    user turn as the one-turn ``prompt_template``, an assistant turn as `` text`` and the end
    of turn (the demo's format, which the runtime renders without Jinja, turn by turn)."""
    chat = [
        {"role": "user", "content": "turn on the lights"},
        {"role": "assistant", "content": "done."},
        {"role": "user", "content": "and the office"},
    ]
    try:
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    except Exception:  # jinja2 errors of all kinds: not a turn-by-turn template
        return False
    turns = (
        prompt_template.format(prompt=chat[0]["content"])
        + f" {chat[1]['content']}{end_of_turn or ''}"
        + prompt_template.format(prompt=chat[2]["content"])
    )
    return text == turns


def _saved_special_ids(student_dir: Path) -> dict[str, Any]:
    """The special ids training saved with the student (generation_config.json), if any."""
    path = student_dir / "generation_config.json"
    return load_json(path) if path.is_file() else {}


def generation_config(student_dir: Path, tokenizer, max_new_tokens: int) -> dict[str, Any]:
    """The manifest's ``generation``: prompt format, special ids and end tokens.

    The end tokens are the student's ``eos_token_id`` (generation_config.json: training puts
    the chat template's end of turn first), else the tokenizer's eos. A chat template that is
    not turn by turn (ChatML, Llama-3, DeepSeek-V3, ...) goes in as Jinja with the special-token
    strings it may use, for the runtime to render conversations exactly as training did.
    """
    saved = _saved_special_ids(Path(student_dir))
    eos = saved.get("eos_token_id", tokenizer.eos_token_id)
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    pad = saved.get("pad_token_id", tokenizer.pad_token_id)
    prompt_template = prompt_template_from_tokenizer(tokenizer)
    out = {
        "prompt_template": prompt_template,
        "add_bos": tokenizer.bos_token_id is not None,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_ids": eos_ids,
        "pad_token_id": pad if pad is not None else (eos_ids[0] if eos_ids else None),
        "max_new_tokens": max_new_tokens,
    }
    template = getattr(tokenizer, "chat_template", None)
    end = tokenizer.convert_ids_to_tokens(eos_ids[0]) if eos_ids else None
    if isinstance(template, str) and not renders_turn_by_turn(tokenizer, prompt_template, end):
        out["chat_template"] = template
        out["template_variables"] = dict(tokenizer.special_tokens_map)
    return out


def check_student_dir(student_dir: Path) -> dict[str, Any]:
    if not student_dir.is_dir():
        raise ExportError(
            f"student directory {student_dir} does not exist; pass the HF "
            "checkpoint directory that `moe2edge distill train` wrote"
        )
    if not (student_dir / "config.json").is_file():
        raise ExportError(f"{student_dir} has no config.json: not a Hugging Face checkpoint")
    if (student_dir / "adapter" / "adapter_config.json").is_file():
        raise ExportError(
            f"{student_dir} holds unmerged peft adapters (adapter/); merge them first: "
            "moe2edge distill merge-adapters DIR OUT (or finetune with merge_adapters=true)"
        )
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
    draft_for: str | Path | None = None,
) -> Path:
    """Export ``student_dir`` to an FP32 ONNX Runtime bundle at ``bundle_dir``.

    A draft model (``draft.json`` in ``student_dir``, or ``draft_for`` naming the target
    bundle) gets the manifest's ``draft`` object (export/draft.py).
    """
    from optimum.exporters.onnx import onnx_export_from_model
    from transformers import AutoTokenizer

    from moe2edge.export.draft import draft_entry
    from moe2edge.export.low_memory import (
        load_unmapped,
        pretranspose_linears,
        weights_released_after_export,
    )

    hand_back_freed_memory()
    student_dir = Path(student_dir)
    config = check_student_dir(student_dir)
    tokenizer = AutoTokenizer.from_pretrained(student_dir, local_files_only=True)
    summary = model_summary(config)
    tokenizer_sha256 = sha256_file(student_dir / "tokenizer.json")  # before the long export
    draft = draft_entry(
        student_dir, Path(bundle_dir), draft_for, summary["vocab_size"], tokenizer_sha256
    )

    def fill(tmp: Path) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(dir=tmp.parent) as work:
            log.info("exporting %s with optimum (text-generation-with-past)", student_dir)
            try:
                model = load_unmapped(student_dir)
                pretranspose_linears(model)  # one copy of the weights at the peak, not three
                with weights_released_after_export(model):
                    onnx_export_from_model(
                        model,
                        output=work,
                        task="text-generation-with-past",
                        opset=opset,
                        device="cpu",
                        do_validation=False,
                    )
                del model
            except ExportError:  # our own checks (missing or truncated weight files) as they are
                raise
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
        manifest = {
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
        if draft is not None:
            manifest["draft"] = draft
        return manifest

    return write_bundle(bundle_dir, fill, overwrite=overwrite)
