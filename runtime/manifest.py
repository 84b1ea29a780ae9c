"""The bundle manifest (``manifest.json``): format, writing and verification.

A bundle is a directory: ONNX model (+ external data), ``tokenizer.json`` and
``manifest.json``. The manifest is the contract between export and runtime; its
format is documented in docs/bundle-format.md and versioned by ``format_version``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moe2edge.fileio import (
    CHECKSUM_KEY,
    atomic_write_json,
    member_problem,
    seal,
    seal_problem,
    sha256_file,
)
from moe2edge.runtime.errors import BundleError

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "moe2edge.bundle"
# 2: the manifest carries ``checksum`` (sha256 of its other keys), required from version 2 on
FORMAT_VERSION = 2
REQUIRED_KEYS = ("format", "format_version", "model", "io", "precision", "files", "generation")
# io keys that name a file of the bundle: each must be one of the hashed ``files`` (the
# default tokenizer.json too, checked where it is opened: ``tokenizer_path``)
REFERENCED_FILES = ("model_file", "tokenizer_file")
HEX = frozenset("0123456789abcdef")


def hash_files(bundle_dir: str | Path, names: list[str]) -> dict[str, dict[str, Any]]:
    bundle_dir = Path(bundle_dir)
    return {
        name: {
            "sha256": sha256_file(bundle_dir / name),
            "bytes": (bundle_dir / name).stat().st_size,
        }
        for name in sorted(names)
    }


def write_manifest(bundle_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Fill in format fields and the hashes of ``manifest['files']`` names, write atomically."""
    bundle_dir = Path(bundle_dir)
    manifest = dict(manifest)
    manifest["format"] = FORMAT_NAME
    manifest["format_version"] = FORMAT_VERSION
    bad = [why for name in manifest["files"] if (why := member_problem(bundle_dir, name))]
    if bad:  # checked before hashing: a name may not even point into the bundle
        raise BundleError(f"refusing to write {bundle_dir / MANIFEST_NAME}: " + "; ".join(bad))
    manifest["files"] = hash_files(bundle_dir, list(manifest["files"]))
    manifest.pop(CHECKSUM_KEY, None)
    problems = structure_problems(bundle_dir, manifest)
    if problems:
        raise BundleError(f"refusing to write {bundle_dir / MANIFEST_NAME}: " + "; ".join(problems))
    path = bundle_dir / MANIFEST_NAME
    return atomic_write_json(path, seal(manifest))


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= HEX


def structure_problems(bundle_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """What is wrong with the shape of a manifest: file names that are not plain relative
    names inside the bundle, entries without a sha256 and size, io files that are not hashed."""
    files, io = manifest.get("files"), manifest.get("io")
    if not isinstance(files, dict) or not files:
        return ["'files' must map file names to their sha256 and size"]
    if not isinstance(io, dict):
        return ["'io' must be an object (the io contract)"]
    problems = []
    for name, entry in files.items():
        why = member_problem(bundle_dir, name)
        if why is None and name == MANIFEST_NAME:
            why = f"{name!r} cannot list itself"
        if why is not None:
            problems.append(f"files entry {why}")
        elif not isinstance(entry, dict):
            problems.append(f"files entry {name!r} is not an object")
        elif not _is_sha256(entry.get("sha256")) or not isinstance(entry.get("bytes"), int):
            problems.append(f"files entry {name!r} lacks a sha256 (64 hex) or a size in bytes")
        elif isinstance(entry["bytes"], bool) or entry["bytes"] < 0:
            problems.append(f"files entry {name!r} has a bad size {entry['bytes']!r}")
    for key in REFERENCED_FILES:
        name = io.get(key)
        if name is None:  # the engine refuses a bundle without model_file when it opens it
            continue
        if (why := member_problem(bundle_dir, name)) is not None:
            problems.append(f"io.{key} {why}")
        elif name not in files and key == "model_file":  # the tokenizer: ``tokenizer_path``
            problems.append(
                f"io.{key} {name!r} is not among the hashed files, so it could not be verified"
            )
    if not isinstance(manifest.get("model"), dict):
        problems.append("'model' must be an object")
    if not isinstance(manifest.get("generation"), dict):
        problems.append("'generation' must be an object")
    return problems


def read_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    """Read and structurally check a manifest (no hashing: see ``verify_bundle``)."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(
            f"bundle directory {bundle_dir} does not exist; pass the directory "
            "that `moe2edge export` wrote (it holds manifest.json)"
        )
    path = bundle_dir / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(
            f"{bundle_dir} has no {MANIFEST_NAME}: it is not a moe2edge bundle; "
            "create one with `moe2edge export onnx`"
        )
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); re-export the bundle") from exc
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc}") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{path} is not a JSON object; re-export the bundle")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{path} lacks required keys {missing}; re-export the bundle")
    if manifest["format"] != FORMAT_NAME:
        raise BundleError(f"{path} has format {manifest['format']!r}, expected {FORMAT_NAME!r}")
    version = manifest["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BundleError(f"{path} has a bad format_version {version!r}; re-export the bundle")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{path} is format version {version}, this runtime reads up to "
            f"{FORMAT_VERSION}; upgrade moe2edge on this device"
        )
    if version >= 2 or CHECKSUM_KEY in manifest:  # version 1 bundles have no checksum
        why = seal_problem(manifest)
        if why is not None:
            raise BundleError(f"{path} is damaged: {why}; re-export the bundle or copy it again")
    problems = structure_problems(bundle_dir, manifest)
    if problems:
        raise BundleError(f"{path} is malformed: " + "; ".join(problems) + "; re-export the bundle")
    return manifest


def verify_bundle(bundle_dir: str | Path) -> dict[str, Any]:
    """Read the manifest and recompute every file's size and sha256; raise on any mismatch."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    problems = []
    model = manifest["io"].get("model_file") or "model.onnx"
    for extra in sorted(bundle_dir.glob(f"{model}*")):  # external data next to the graph
        if extra.is_file() and extra.name not in manifest["files"]:
            problems.append(f"{extra.name}: next to {model} but not hashed in the manifest")
    for name, expected in manifest["files"].items():
        path = bundle_dir / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        size = path.stat().st_size
        if size != expected["bytes"]:
            problems.append(f"{name}: {size} bytes, manifest says {expected['bytes']} (truncated?)")
            continue
        if sha256_file(path) != expected["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (file changed after export)")
    if problems:
        raise BundleError(
            f"bundle {bundle_dir} failed verification: "
            + "; ".join(problems)
            + ". Re-export the bundle or copy it again."
        )
    return manifest


def tokenizer_path(bundle_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """The bundle's tokenizer file, which must exist and be one of the hashed ``files``."""
    name = manifest["io"].get("tokenizer_file", "tokenizer.json")
    path = Path(bundle_dir) / name
    if not path.is_file():
        raise BundleError(f"bundle {bundle_dir} has no {name}; re-export it")
    if name not in manifest["files"]:
        raise BundleError(
            f"bundle {bundle_dir}: its tokenizer {name} is not among the manifest's hashed "
            "files, so it cannot be verified; re-export the bundle"
        )
    return path
