"""`export verify`: tampered, truncated and mismatched bundles fail with a clear message."""

from __future__ import annotations

import shutil

import pytest

from moe2edge.export.verify import lineage_warning, verify_io_contract
from moe2edge.runtime.errors import BundleError
from moe2edge.runtime.manifest import read_manifest, verify_bundle, write_manifest
from tests._export_common import build_tiny_variants


@pytest.fixture(scope="module")
def tiny_variants(tiny_run, tmp_path_factory):
    return build_tiny_variants(tiny_run, tmp_path_factory)


def copy(bundle, tmp_path, name="b"):
    out = tmp_path / name
    shutil.copytree(bundle, out)
    return out


def rewrite(bundle, **changes):
    """Edit the manifest and re-hash the files (as a careless hand edit would)."""
    manifest = read_manifest(bundle)
    manifest.update(changes)
    write_manifest(bundle, {**manifest, "files": list(manifest["files"])})


def check(bundle):
    verify_io_contract(bundle, verify_bundle(bundle))


@pytest.mark.parametrize("name", ["fp32", "fp16", "int8-static", "int4-gptq-16", "trt-int4-16"])
def test_good_bundles_verify(tiny_variants, name):
    check(tiny_variants[name])
    assert lineage_warning(tiny_variants[name], read_manifest(tiny_variants[name])) is None


def test_tampered_and_truncated_files(tiny_variants, tmp_path):
    b = copy(tiny_variants["int4-rtn-16"], tmp_path)
    data = bytearray((b / "model.onnx").read_bytes())
    data[100] ^= 0x01
    (b / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.onnx: sha256 differs"):
        check(b)
    (b / "model.onnx").write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(BundleError, match="truncated"):
        check(b)
    rewrite(b)  # re-hashed after truncation: the graph itself no longer parses
    with pytest.raises(BundleError, match="not a readable ONNX model"):
        check(b)
    (b / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json: missing"):
        check(b)
    (b / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        check(b)


def test_manifest_that_does_not_match_the_graph(tiny_variants, tmp_path):
    b = copy(tiny_variants["fp16"], tmp_path)
    io = read_manifest(b)["io"]
    rewrite(b, io={**io, "kv_cache": {**io["kv_cache"], "dtype": "float32"}})
    with pytest.raises(BundleError, match="kv_cache.dtype says float32"):
        check(b)
    rewrite(b, io={**io, "kv_cache": {**io["kv_cache"], "num_layers": 3}})
    with pytest.raises(BundleError, match="no input past_key_values.2.key"):
        check(b)
    inputs = [
        dict(e, dtype="float32") if e["name"] == "past_key_values.0.key" else e
        for e in io["inputs"]
    ]
    rewrite(b, io={**io, "inputs": inputs})
    with pytest.raises(BundleError, match="dtype changed"):
        check(b)


def test_precision_claims_are_checked(tiny_variants, tmp_path):
    b = copy(tiny_variants["fp32"], tmp_path, "claims_int4")
    rewrite(b, precision={**read_manifest(b)["precision"], "weights": "int4"})
    with pytest.raises(BundleError, match="says int4 but the graph has no 4-bit weights"):
        check(b)
    t = copy(tiny_variants["int4-rtn-16"], tmp_path, "claims_trt")
    rewrite(t, target="tensorrt")
    with pytest.raises(BundleError, match="standard ONNX ops only"):
        check(t)


def test_lineage_warning_when_the_parent_changed(tiny_variants, tmp_path):
    parent = copy(tiny_variants["fp32"], tmp_path, "fp32")
    child = copy(tiny_variants["int8-dynamic"], tmp_path, "child")
    manifest = read_manifest(child)
    manifest["precision"]["parent"]["path"] = "fp32"
    rewrite(child, precision=manifest["precision"])
    assert lineage_warning(child, read_manifest(child)) is None
    rewrite(parent)  # annotations do not matter ...
    assert lineage_warning(child, read_manifest(child)) is None
    (parent / "model.onnx").write_bytes((parent / "model.onnx").read_bytes() + b"\0")
    rewrite(parent)  # ... another model does
    assert "another model" in lineage_warning(child, read_manifest(child))
    shutil.rmtree(parent)
    assert "not there" in lineage_warning(child, read_manifest(child))
