"""Bundles derived from an FP32 bundle: reading the parent, writing the child, sizes.

A derived bundle's manifest is the parent's with a new ``precision`` (naming the parent by
relative path and hashes), ``target``, ``io`` (re-read from the new graph: the KV cache
dtype follows the graph) and ``files``; the parent's ``parity``/``accuracy`` are dropped.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx.external_data_helper import uses_external_data

from moe2edge.export.bundle import describe_io, write_bundle
from moe2edge.export.errors import ExportError
from moe2edge.export.weights import (
    INLINE_BYTES,
    WeightWriter,
    inline_bytes,
    read_weight,
    to_float16,
)
from moe2edge.fileio import sha256_file
from moe2edge.runtime.errors import BundleError
from moe2edge.runtime.manifest import MANIFEST_NAME, verify_bundle

EXTERNAL_DATA_BYTES = 1 << 30  # above this the weights go to model.onnx_data (protobuf 2 GB cap)
MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx_data"


# --- the parent bundle --------------------------------------------------------------------


def load_parent(parent_dir: str | Path) -> dict[str, Any]:
    """Verify the parent bundle's hashes and insist it is FP32 (we quantize from full precision)."""
    try:
        manifest = verify_bundle(parent_dir)
    except BundleError as exc:
        raise ExportError(f"cannot quantize from {parent_dir}: {exc}") from exc
    weights = (manifest.get("precision") or {}).get("weights")
    if weights != "fp32" or manifest.get("target", "onnxruntime") != "onnxruntime":
        raise ExportError(
            f"{parent_dir} holds {weights} weights for {manifest.get('target')}; quantize from "
            "the FP32 ONNX Runtime bundle (`moe2edge export onnx` writes it)"
        )
    return manifest


def model_path(bundle_dir: str | Path, manifest: dict[str, Any]) -> Path:
    return Path(bundle_dir) / manifest["io"]["model_file"]


def load_model(bundle_dir: str | Path, manifest: dict[str, Any]) -> onnx.ModelProto:
    """The whole model, weights included (for tools that need it in memory: ORT's INT4)."""
    path = model_path(bundle_dir, manifest)
    try:
        return onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # protobuf/onnx raise many types for a broken file
        raise ExportError(f"cannot read {path} ({type(exc).__name__}: {exc}); re-export") from exc


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Stored bytes of one tensor (int4 packs two values a byte), external data included."""
    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    if tensor.raw_data:
        return len(tensor.raw_data)
    numel = int(np.prod(tensor.dims)) if tensor.dims else 1
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (numel + 1) // 2
    return numel * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def model_weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializers and Constant-node tensors: the weights, not the graph."""
    total = sum(tensor_bytes(t) for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            total += sum(tensor_bytes(a.t) for a in node.attribute if a.name == "value")
    return total


def save_model(
    model: onnx.ModelProto,
    out_dir: str | Path,
    base_dir: str | Path | None = None,
    stored_types: dict[str, int] | None = None,
    writer: WeightWriter | None = None,
) -> list[str]:
    """Write ``model.onnx`` (+ ``model.onnx_data`` above ``EXTERNAL_DATA_BYTES``), a weight
    at a time; returns the file names.

    Weights ``writer`` (on ``out_dir/model.onnx_data``) already holds stay; external ones
    are read from ``base_dir`` (as ``stored_types`` says they were written; float32 becomes
    float16 where the graph now says so); those inside the proto are moved out. A model
    that turns out small gets its weights back into one file, as optimum writes it.
    """
    out_dir = Path(out_dir)
    writer = writer or WeightWriter(out_dir, DATA_FILE)
    if writer.path != out_dir / DATA_FILE:
        raise ExportError(f"{writer.path} is not {out_dir / DATA_FILE}; this is a bug, report it")
    stored_types = stored_types or {}
    with writer:
        for tensor in model.graph.initializer:
            if tensor.name in writer.names:
                continue
            if uses_external_data(tensor):
                if base_dir is None:
                    raise ExportError(f"{tensor.name} is external data of an unknown folder (bug)")
                stored = stored_types.get(tensor.name, tensor.data_type)
                values = read_weight(tensor, base_dir, stored)
                if stored != tensor.data_type:
                    if (stored, tensor.data_type) != (
                        onnx.TensorProto.FLOAT,
                        onnx.TensorProto.FLOAT16,
                    ):
                        raise ExportError(
                            f"{tensor.name}: no conversion {stored} -> {tensor.data_type}"
                        )
                    values = to_float16(values)
                tensor.CopyFrom(writer.add(values, tensor.name))
                del values  # one weight at a time: drop the map before the next
            elif inline_bytes(tensor) >= INLINE_BYTES:
                writer.move(tensor)
    if model_weight_bytes(model) > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(out_dir / MODEL_FILE))
        return [MODEL_FILE, DATA_FILE]
    onnx.load_external_data_for_model(model, str(out_dir))
    writer.path.unlink()
    onnx.save_model(model, str(out_dir / MODEL_FILE))
    return [MODEL_FILE]


def weight_nodes(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """Names of MatMuls with a constant 2-D weight and of Gathers over a constant table."""
    inits = {i.name: i for i in model.graph.initializer}
    matmuls, gathers = [], []
    for node in model.graph.node:
        if (
            node.op_type == "MatMul"
            and node.input[1] in inits
            and len(inits[node.input[1]].dims) == 2
        ):
            matmuls.append(node.name)
        elif node.op_type == "Gather" and node.input[0] in inits:
            if len(inits[node.input[0]].dims) == 2:
                gathers.append(node.name)
    unnamed = [i for i, n in enumerate(model.graph.node) if not n.name]
    if unnamed:  # ORT's quantizers select nodes by name
        for i in unnamed:
            model.graph.node[i].name = f"node_{i}_{model.graph.node[i].op_type}"
        return weight_nodes(model)
    return matmuls, gathers


def parent_record(parent_dir: str | Path, manifest: dict[str, Any], out_dir: str | Path) -> dict:
    """How a derived bundle names its parent: a relative path plus content hashes.

    ``manifest_sha256`` pins the parent manifest as it was at quantization time;
    ``model_sha256`` stays valid when ``report``/``parity`` later annotate that manifest.
    """
    parent_dir = Path(parent_dir).resolve()
    model_file = manifest["io"]["model_file"]
    return {
        "path": os.path.relpath(parent_dir, Path(out_dir).resolve().parent),
        "manifest_sha256": sha256_file(parent_dir / MANIFEST_NAME),
        "model_sha256": manifest["files"][model_file]["sha256"],
        "precision": manifest["precision"]["weights"],
    }


def graph_kv_dtype(io: dict[str, Any], kv: dict[str, Any]) -> str:
    name = kv["past_key"].format(layer=0)
    for entry in io["inputs"]:
        if entry["name"] == name:
            return entry["dtype"]
    raise ExportError(f"the quantized graph lost its KV input {name}; this is a bug, report it")


def derived_bundle(
    parent_dir: str | Path,
    parent_manifest: dict[str, Any],
    out_dir: str | Path,
    build: Callable[[Path], list[str]],
    precision: dict[str, Any],
    target: str = "onnxruntime",
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a bundle whose model ``build(tmp_dir) -> files`` makes; the rest from the parent."""
    parent_dir = Path(parent_dir)
    record = parent_record(parent_dir, parent_manifest, out_dir)

    def fill(tmp: Path) -> dict[str, Any]:
        files = build(tmp)
        io = dict(parent_manifest["io"])
        io["model_file"] = MODEL_FILE
        io.update(describe_io(tmp / MODEL_FILE))
        io["kv_cache"] = {**io["kv_cache"], "dtype": graph_kv_dtype(io, io["kv_cache"])}
        copied = []
        for name in (io.get("tokenizer_file", "tokenizer.json"), "config.json"):
            if (parent_dir / name).is_file():
                shutil.copy(parent_dir / name, tmp / name)
                copied.append(name)
        manifest = {
            k: v
            for k, v in parent_manifest.items()
            if k not in ("files", "parity", "accuracy", "format", "format_version", "checksum")
        }
        manifest.update(
            target=target,
            precision={**precision, "parent": record},
            io=io,
            files=files + copied,
        )
        manifest.update(extra or {})
        return manifest

    return write_bundle(out_dir, fill, overwrite=overwrite)


def check_block_size(block_size: int | None) -> int:
    if block_size is None or block_size < 16 or block_size & (block_size - 1):
        raise ExportError(
            f"block size {block_size} is not supported: use a power of two >= 16 (32, 64, 128)"
        )
    return block_size


def onnx_runtime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
