"""The bundle manifest (``manifest.json``): format, writing and verification.

A bundle is a directory: ONNX model (+ external data), ``tokenizer.json`` and
``manifest.json``. The manifest is the contract between export and runtime; its
format is documented in docs/bundle-format.md and versioned by ``format_version``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moe2edge.fileio import atomic_write_json, sha256_file
from moe2edge.runtime.errors import BundleError

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "moe2edge.bundle"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "format_version", "model", "io", "precision", "files", "generation")


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
    manifest["files"] = hash_files(bundle_dir, list(manifest["files"]))
    path = bundle_dir / MANIFEST_NAME
    return atomic_write_json(path, manifest)


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
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); re-export the bundle") from exc
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{path} lacks required keys {missing}; re-export the bundle")
    if manifest["format"] != FORMAT_NAME:
        raise BundleError(f"{path} has format {manifest['format']!r}, expected {FORMAT_NAME!r}")
    if manifest["format_version"] > FORMAT_VERSION:
        raise BundleError(
            f"{path} is format version {manifest['format_version']}, this runtime reads up to "
            f"{FORMAT_VERSION}; upgrade moe2edge on this device"
        )
    return manifest


def verify_bundle(bundle_dir: str | Path) -> dict[str, Any]:
    """Read the manifest and recompute every file's size and sha256; raise on any mismatch."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    problems = []
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
