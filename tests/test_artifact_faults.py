"""Artifacts on disk: names that leave their directory, files the manifest does not hash, an
altered TensorRT plan, an edited manifest, a full disk, and the bench harnesses
(bench/reliability_artifacts.py) at small counts: SIGKILL mid-write, RLIMIT_FSIZE, and one
of every corruption kind, each refused with a user error and never a traceback."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from moe2edge.distill.errors import DistillError
from moe2edge.fileio import DiskFullError, atomic_dir, atomic_write, member_problem, seal
from moe2edge.runtime.errors import BundleError
from moe2edge.runtime.manifest import read_manifest, verify_bundle, write_manifest
from tests.conftest import PYTHON, ROOT, subprocess_env

sys.path.append(str(ROOT / "bench"))  # last: bench/gguf.py must not shadow gguf
import _artifact_kit as kit  # noqa: E402
import reliability_artifacts as rel  # noqa: E402


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """One intact bundle (with a TensorRT engine), teacher cache and checkpoint run."""
    root = tmp_path_factory.mktemp("artifacts")
    out = {kind: root / kind for kind in kit.KINDS}
    kit.write("bundle", out["bundle"], 1)
    kit.write("bundle", out["engine"], 0)
    kit.write("engine", out["engine"], 1)
    kit.write("cache", out["cache"], 1)
    kit.write("checkpoint", out["checkpoint"], 1)
    return out


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    return dst


def _reseal(path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(seal(meta)))


def test_intact_artifacts_load(artifacts):
    assert kit.load_bundle(artifacts["bundle"])["finite"]
    plan_sha = hashlib.sha256(kit.plan_bytes(1)).hexdigest()
    assert kit.load_engine(artifacts["engine"])["plan"] == plan_sha
    assert kit.load_cache(artifacts["cache"])["digest"]
    assert kit.load_checkpoint_artifact(artifacts["checkpoint"])["step"] == 3


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda m: m["io"].update(model_file="../model.onnx"),
            "io.model_file '../model.onnx' leaves",
        ),
        (
            lambda m: m["files"].update({"../x": m["files"]["model.onnx"]}),
            "files entry '../x' leaves",
        ),
        (lambda m: m["files"].update({"/etc/hostname": m["files"]["model.onnx"]}), "absolute path"),
        (lambda m: m["files"].pop("model.onnx"), "model_file 'model.onnx' is not among the hashed"),
    ],
)
def test_manifest_names_must_stay_inside_and_be_hashed(artifacts, tmp_path, edit, message):
    bundle = _copy(artifacts["bundle"], tmp_path / "b")
    _reseal(bundle / "manifest.json", edit)
    with pytest.raises(BundleError, match=message):
        read_manifest(bundle)


def test_symlink_out_of_the_bundle_and_unhashed_files_are_refused(artifacts, tmp_path):
    bundle = _copy(artifacts["bundle"], tmp_path / "b")
    outside = tmp_path / "elsewhere.json"
    outside.write_bytes((bundle / "tokenizer.json").read_bytes())  # same bytes, same sha256
    (bundle / "tokenizer.json").unlink()
    (bundle / "tokenizer.json").symlink_to(outside)
    with pytest.raises(BundleError, match="symlink that leads out"):
        read_manifest(bundle)
    assert member_problem(bundle, "model.onnx") is None
    other = _copy(artifacts["bundle"], tmp_path / "c")
    (other / "model.onnx_data").write_bytes(b"weights nobody hashed")
    with pytest.raises(BundleError, match="model.onnx_data: next to model.onnx but not hashed"):
        verify_bundle(other)
    third = _copy(artifacts["bundle"], tmp_path / "d")
    _reseal(third / "manifest.json", lambda m: m["files"].pop("tokenizer.json"))
    with pytest.raises(BundleError, match="tokenizer tokenizer.json is not among the manifest's"):
        kit.load_bundle(third)


def test_writer_refuses_names_outside_the_bundle(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"x")
    manifest = kit.bundle_manifest(0)
    manifest["files"] = ["model.onnx", "../model.onnx"]
    with pytest.raises(BundleError, match="refusing to write .*'../model.onnx' leaves"):
        write_manifest(tmp_path, manifest)


def test_edited_manifest_is_refused_and_version_1_still_reads(artifacts, tmp_path):
    bundle = _copy(artifacts["bundle"], tmp_path / "b")
    meta = json.loads((bundle / "manifest.json").read_text())
    meta["generation"]["max_new_tokens"] = 5  # an edit without resealing
    (bundle / "manifest.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="checksum does not match"):
        read_manifest(bundle)
    meta.pop("checksum")
    meta["format_version"] = 1  # bundles from before the checksum
    (bundle / "manifest.json").write_text(json.dumps(meta))
    assert read_manifest(bundle)["generation"]["max_new_tokens"] == 5


def test_plan_hash_is_recorded_and_an_altered_plan_refused(artifacts, tmp_path):
    engine = _copy(artifacts["engine"], tmp_path / "e")
    meta = json.loads((engine / "engine" / "engine.json").read_text())
    assert meta["plan_sha256"] == kit.write_engine_artifact(engine, 1)["plan"]
    assert meta["plan_bytes"] == len(kit.plan_bytes(1))
    plan = engine / "engine" / "model.plan"
    data = bytearray(plan.read_bytes())
    data[1000] ^= 0x10
    plan.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match the sha256 in engine.json"):
        kit.load_engine(engine)
    plan.write_bytes(bytes(data[:-10]))
    with pytest.raises(BundleError, match="truncated or half-written"):
        kit.load_engine(engine)


def test_cache_and_checkpoint_names_must_stay_inside(artifacts, tmp_path):
    cache = _copy(artifacts["cache"], tmp_path / "c")
    _reseal(cache / "index.json", lambda m: m["shards"][0].update(file="../shard.safetensors"))
    with pytest.raises(DistillError, match="shard 0 file '../shard.safetensors' leaves"):
        kit.load_cache(cache)
    run = _copy(artifacts["checkpoint"], tmp_path / "r")
    step = run / "checkpoints" / "step-00000003"
    _reseal(
        step / "manifest.json", lambda m: m["files"].update({"../x": {"sha256": "0", "bytes": 1}})
    )
    with pytest.raises(DistillError, match="files entry '../x' leaves"):
        kit.load_checkpoint_artifact(run, step)


FULL_DISK = """
import resource, signal, sys
from pathlib import Path
from moe2edge.fileio import DiskFullError, atomic_dir, atomic_write
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
root = Path(sys.argv[1])
try:
    atomic_write(root / "plan.bin", b"x" * 10000)
except DiskFullError as exc:
    print("FILE", exc.strerror)
try:
    with atomic_dir(root / "bundle") as tmp:
        (tmp / "a.bin").write_bytes(b"y" * 3000)
        (tmp / "b.bin").write_bytes(b"z" * 9000)
except DiskFullError as exc:
    print("DIR", exc.strerror)
"""


def test_full_disk_names_the_path_and_the_space_and_leaves_nothing(tmp_path):
    proc = subprocess.run(
        [PYTHON, "-c", FULL_DISK, str(tmp_path)], env=subprocess_env(), cwd=ROOT,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    assert (
        f"not enough space to write {tmp_path / 'plan.bin'}: it needs 10,000 bytes" in lines["FILE"]
    )
    assert "file size limit (ulimit -f) 4,096 bytes" in lines["FILE"]
    assert f"not enough space to write {tmp_path / 'bundle'}: it needs more than" in lines["DIR"]
    assert "bytes free on" in lines["DIR"]
    assert sorted(os.listdir(tmp_path)) == []  # no temporary file, no half bundle
    assert issubclass(DiskFullError, OSError) and atomic_write and atomic_dir


def test_corruptions_of_every_kind_are_refused_without_tracebacks():
    result = rel.corruption(len(rel.MUTATORS), seed=1)
    assert all(result["controls_loaded"].values())
    assert result["tracebacks"] == 0, result["traceback_examples"]
    assert result["accepted"] == 0, result["accepted_examples"]
    assert result["refused"] == result["mutations"] == len(rel.MUTATORS)


def test_sigkill_and_full_disk_never_leave_a_loadable_corrupt_artifact():
    faults = rel.faults(trials=2, seed=1)
    assert faults["trials"] == 8 and faults["corrupt_loaded"] == 0 and faults["tracebacks"] == 0
    assert faults["resumed_or_rebuilt"] == 8
    full = rel.disk_full(trials=1, seed=1)
    assert full["trials"] == 4 and full["corrupt_left"] == 0 and full["tmp_left"] == 0
    assert full["clear_errors"] == 4, full["example_errors"]
