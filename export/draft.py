"""The manifest's optional ``draft`` object: this bundle drafts for another (speculative decoding).

``moe2edge distill draft`` writes ``draft.json`` into the draft checkpoint (the student it
drafts for and the sha256 of that student's weights). ``export onnx DRAFT BUNDLE`` carries it
into the manifest; ``--draft-for TARGET_BUNDLE`` also names the target bundle, pinned by its
model file's sha256, after checking that both bundles use the same tokenizer and vocabulary.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from moe2edge.export.bundle import load_json
from moe2edge.export.errors import ExportError
from moe2edge.runtime.manifest import read_manifest

log = logging.getLogger(__name__)

DRAFT_META = "draft.json"  # written by moe2edge.distill.draft (export does not import distill)


def draft_entry(
    student_dir: Path,
    bundle_dir: Path,
    target_bundle: str | Path | None,
    vocab_size: int,
    tokenizer_sha256: str,
) -> dict[str, Any] | None:
    """The ``draft`` object for a bundle exported from ``student_dir``, or None (not a draft)."""
    meta_path = Path(student_dir) / DRAFT_META
    meta = load_json(meta_path).get("draft_for", {}) if meta_path.is_file() else None
    entry: dict[str, Any] = {}
    if meta is not None:
        entry["student_dir"] = meta.get("student_dir")
        entry["student_weights_sha256"] = meta.get("weights_sha256")
    if target_bundle is None:
        if meta is None:
            return None
        log.info("%s is a draft: --draft-for TARGET_BUNDLE names the target bundle", student_dir)
        return {"target": entry}
    target_bundle = Path(target_bundle)
    target = read_manifest(target_bundle)
    files = target["files"]
    model_file = target["io"]["model_file"]
    if target["model"]["vocab_size"] != vocab_size:
        raise ExportError(
            f"the draft's vocabulary ({vocab_size}) differs from {target_bundle}'s "
            f"({target['model']['vocab_size']}): a draft must share the target's vocabulary"
        )
    theirs = files.get(target["io"]["tokenizer_file"], {}).get("sha256")
    if theirs != tokenizer_sha256:
        raise ExportError(
            f"the draft's tokenizer.json differs from {target_bundle}'s: a draft must use the "
            "target's tokenizer"
        )
    exported_from = target.get("source", {}).get("student_dir")
    if meta and exported_from and Path(exported_from) != Path(meta.get("student_dir") or ""):
        raise ExportError(
            f"{student_dir} drafts for {meta.get('student_dir')}, but {target_bundle} was "
            f"exported from {exported_from}; export the draft against that student's bundle"
        )
    entry.setdefault("student_dir", exported_from)
    entry.update(
        name=target_bundle.resolve().name,
        path=os.path.relpath(target_bundle.resolve(), Path(bundle_dir).resolve().parent),
        model_file=model_file,
        model_sha256=files[model_file]["sha256"],
    )
    return {"target": entry}
