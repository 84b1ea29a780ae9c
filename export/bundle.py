"""Assembling a bundle directory atomically: model files + tokenizer + manifest."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from moe2edge.export.errors import ExportError
from moe2edge.fileio import DiskFullError, atomic_dir
from moe2edge.runtime.manifest import MANIFEST_NAME, read_manifest, write_manifest

ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
}


def describe_io(model_path: Path) -> dict[str, list[dict[str, Any]]]:
    """Names, dtypes and (symbolic) shapes of the graph's inputs and outputs."""
    model = onnx.load(str(model_path), load_external_data=False)

    def entry(value) -> dict[str, Any]:
        tensor = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        return {
            "name": value.name,
            "dtype": ONNX_DTYPES.get(tensor.elem_type, str(tensor.elem_type)),
            "shape": dims,
        }

    return {
        "inputs": [entry(v) for v in model.graph.input],
        "outputs": [entry(v) for v in model.graph.output],
    }


def model_summary(config: dict[str, Any]) -> dict[str, Any]:
    """The model facts a runtime or planner needs, from an HF config.json."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return {
        "architecture": (config.get("architectures") or ["?"])[0],
        "model_type": config.get("model_type"),
        "hidden_size": config["hidden_size"],
        "intermediate_size": config.get("intermediate_size"),
        "num_layers": config["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_kv_heads": config.get("num_key_value_heads", heads),
        "head_dim": head_dim,
        "vocab_size": config["vocab_size"],
        "max_position_embeddings": config.get("max_position_embeddings"),
    }


def kv_contract(summary: dict[str, Any], dtype: str) -> dict[str, Any]:
    return {
        "num_layers": summary["num_layers"],
        "num_kv_heads": summary["num_kv_heads"],
        "head_dim": summary["head_dim"],
        "dtype": dtype,
        "layout": "batch, num_kv_heads, sequence, head_dim",
        "past_key": "past_key_values.{layer}.key",
        "past_value": "past_key_values.{layer}.value",
        "present_key": "present.{layer}.key",
        "present_value": "present.{layer}.value",
    }


def write_bundle(
    bundle_dir: str | Path, fill: Callable[[Path], dict[str, Any]], overwrite: bool = False
) -> Path:
    """Build a bundle in a temporary sibling directory, then move it into place whole.

    ``fill(tmp_dir)`` writes the files and returns the manifest (its ``files`` key lists
    the file names to hash). A crash leaves the previous bundle untouched.
    """
    bundle_dir = Path(bundle_dir)
    if bundle_dir.exists() and not overwrite:
        raise ExportError(f"{bundle_dir} already exists; pass --overwrite to replace it")
    try:
        with atomic_dir(bundle_dir) as tmp:
            write_manifest(tmp, fill(tmp))
    except DiskFullError as exc:
        raise ExportError(f"bundle {bundle_dir}: {exc.strerror}") from exc
    return bundle_dir


def update_manifest(bundle_dir: str | Path, key: str, value: Any) -> None:
    """Set one top-level manifest key (e.g. ``accuracy``), keeping the file hashes."""
    manifest = read_manifest(bundle_dir)
    manifest[key] = value
    write_manifest(bundle_dir, manifest)


def load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read {path}: {exc}") from exc


__all__ = [
    "MANIFEST_NAME",
    "describe_io",
    "kv_contract",
    "model_summary",
    "update_manifest",
    "write_bundle",
]
