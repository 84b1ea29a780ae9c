"""The corruptions of bench/reliability_artifacts.py: what is damaged, and how.

``MUTATORS`` lists (artifact, file, how). Byte-level damage: ``bitflip`` (one random bit),
``truncate`` (to a random shorter length; JSON keeps at least its last two bytes off, so the
content really changes), ``zero_block`` (64 random bytes zeroed), ``append``, ``empty``,
``delete``, ``swap`` (exchanged with another file of the artifact, or of the older
checkpoint), ``symlink_out`` (replaced by a symlink to an identical copy outside the
artifact), ``rehash_truncate`` (truncated, then its sha256 and size written into the
manifest and the manifest resealed: only the file's own parser can notice), ``altered``
(the plan replaced by other bytes of the same size). JSON-level: ``edit`` (one value
changed, the checksum left as it was) and ``reseal:<edit>`` (a structural edit with the
checksum recomputed, so that the loader's own checks must catch it: ``../`` and absolute
names, ``model_file`` not among the hashed files, missing hashes, wrong types and counts).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

from moe2edge.fileio import seal

BUNDLE = {"manifest": "manifest.json", "model": "model.onnx", "tokenizer": "tokenizer.json"}
STEP = "checkpoints/step-00000003"
OLDER = "checkpoints/step-00000002"
BYTES = ("bitflip", "truncate", "zero_block", "append", "empty", "delete")
JSON = ("bitflip", "truncate", "edit", "delete", "empty")

MUTATORS: list[tuple[str, str, str]] = [
    # the bundle
    *[("bundle", "manifest.json", h) for h in JSON],
    ("bundle", "manifest.json", "swap:tokenizer.json"),
    *[
        ("bundle", "manifest.json", f"reseal:{e}")
        for e in (
            "model_file_dotdot",
            "model_file_abs",
            "model_not_hashed",
            "files_dotdot",
            "files_abs",
            "tokenizer_not_hashed",
            "tokenizer_dotdot",
            "entry_not_object",
            "sha_not_hex",
            "bytes_negative",
            "files_list",
            "version_string",
            "io_list",
            "kv_layers_text",
            "kv_dtype_unknown",
            "generation_list",
            "eos_text",
        )
    ],  # fmt: skip
    *[("bundle", "model.onnx", h) for h in BYTES],
    ("bundle", "model.onnx", "swap:tokenizer.json"),
    ("bundle", "model.onnx", "symlink_out"),
    ("bundle", "model.onnx", "rehash_truncate"),
    ("bundle", "model.onnx", "unhashed_data"),
    *[("bundle", "tokenizer.json", h) for h in ("bitflip", "truncate", "delete", "empty")],
    ("bundle", "tokenizer.json", "symlink_out"),
    ("bundle", "tokenizer.json", "rehash_truncate"),
    # the TensorRT engine
    *[("engine", "engine/engine.json", h) for h in JSON],
    *[
        ("engine", "engine/engine.json", f"reseal:{e}")
        for e in (
            "plan_dotdot",
            "plan_abs",
            "plan_sha_missing",
            "plan_bytes_wrong",
            "profiles_bad",
            "model_sha_other",
            "format_other",
            "gpu_other",
        )
    ],  # fmt: skip
    *[("engine", "engine/model.plan", h) for h in BYTES],
    ("engine", "engine/model.plan", "altered"),
    ("engine", "engine/model.plan", "swap:engine/engine.json"),
    ("engine", "engine/model.plan", "symlink_out"),
    ("engine", "model.onnx", "bitflip"),
    # the teacher cache
    *[("cache", "index.json", h) for h in JSON],
    *[
        ("cache", "index.json", f"reseal:{e}")
        for e in (
            "shard_dotdot",
            "shard_abs",
            "shard_sha_missing",
            "num_examples_wrong",
            "shards_not_list",
            "k_zero",
            "first_example_wrong",
            "incomplete",
            "version_other",
            "shard_counts_text",
        )
    ],  # fmt: skip
    *[("cache", "shard-00002.safetensors", h) for h in BYTES],
    ("cache", "shard-00002.safetensors", "swap:shard-00003.safetensors"),
    ("cache", "shard-00002.safetensors", "symlink_out"),
    ("cache", "shard-00002.safetensors", "rehash_truncate"),
    # the training checkpoint (the newest of two; loaded by its path)
    *[("checkpoint", f"{STEP}/manifest.json", h) for h in JSON],
    ("checkpoint", f"{STEP}/manifest.json", f"swap:{OLDER}/manifest.json"),
    *[
        ("checkpoint", f"{STEP}/manifest.json", f"reseal:{e}")
        for e in (
            "files_dotdot",
            "files_abs",
            "drop_metadata",
            "entry_not_object",
            "step_text",
            "unlisted_file",
            "version_other",
        )
    ],  # fmt: skip
    *[("checkpoint", f"{STEP}/__0_0.distcp", h) for h in BYTES],
    ("checkpoint", f"{STEP}/__0_0.distcp", f"swap:{OLDER}/__0_0.distcp"),
    ("checkpoint", f"{STEP}/__0_0.distcp", "symlink_out"),
    ("checkpoint", f"{STEP}/__0_0.distcp", "rehash_truncate"),
    *[("checkpoint", f"{STEP}/training_state.pt", h) for h in ("bitflip", "truncate", "delete")],
    ("checkpoint", f"{STEP}/training_state.pt", f"swap:{OLDER}/training_state.pt"),
    ("checkpoint", f"{STEP}/training_state.pt", "rehash_truncate"),
    *[("checkpoint", f"{STEP}/.metadata", h) for h in ("bitflip", "truncate", "delete")],
    ("checkpoint", f"{STEP}/.metadata", "rehash_truncate"),
]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest_of(root: Path, artifact: str, name: str) -> Path:
    """The manifest/index that hashes file ``name`` of ``artifact``."""
    if artifact == "cache":
        return root / "index.json"
    if artifact == "checkpoint":
        return root / STEP / "manifest.json"
    if name.startswith("engine/"):
        return root / "engine" / "engine.json"
    return root / "manifest.json"


def _rehash(root: Path, artifact: str, name: str) -> None:
    """Record file ``name``'s present sha256 and size in its manifest, resealed."""
    mpath = manifest_of(root, artifact, name)
    meta = json.loads(mpath.read_text())
    path, base = root / name, Path(name).name
    if artifact == "cache":
        entry = next(s for s in meta["shards"] if s["file"] == base)
        entry.update(sha256=_sha(path), bytes=path.stat().st_size)
    else:
        meta["files"][base].update(sha256=_sha(path), bytes=path.stat().st_size)
    mpath.write_text(json.dumps(seal(meta), indent=2))


def _leaf_paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _leaf_paths(v, (*prefix, k))]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in _leaf_paths(v, (*prefix, i))]
    return [prefix]


def _edit(obj: Any, rng: random.Random) -> str:
    """Change one leaf value (not the checksum itself)."""
    paths = [p for p in _leaf_paths(obj) if p and p[0] != "checksum"]
    path = rng.choice(paths)
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    value = parent[path[-1]]
    if isinstance(value, bool):
        parent[path[-1]] = not value
    elif isinstance(value, int | float):
        parent[path[-1]] = value + 1
    elif isinstance(value, str):
        parent[path[-1]] = value + "x"
    else:
        parent[path[-1]] = 0
    return "/".join(map(str, path))


def _reseal_edit(meta: dict, edit: str, root: Path) -> None:
    files = meta.get("files")
    first = next(iter(files)) if isinstance(files, dict) else None
    io = meta.get("io", {})
    shard = meta["shards"][2] if "shards" in meta else None
    edits = {
        # bundle manifest
        "model_file_dotdot": lambda: io.update(model_file="../model.onnx"),
        "model_file_abs": lambda: io.update(model_file=str(root / "model.onnx")),
        "model_not_hashed": lambda: files.pop(io["model_file"]),
        "files_dotdot": lambda: files.update({"../escape.bin": files[first]}),
        "files_abs": lambda: files.update({"/etc/hostname": files[first]}),
        "tokenizer_not_hashed": lambda: files.pop(io["tokenizer_file"]),
        "tokenizer_dotdot": lambda: io.update(tokenizer_file="../tokenizer.json"),
        "entry_not_object": lambda: files.update({first: "sha256"}),
        "sha_not_hex": lambda: files[first].update(sha256="z" * 64),
        "bytes_negative": lambda: files[first].update(bytes=-1),
        "files_list": lambda: meta.update(files=list(files)),
        "version_string": lambda: meta.update(format_version="2"),
        "io_list": lambda: meta.update(io=[io]),
        "kv_layers_text": lambda: io["kv_cache"].update(num_layers="one"),
        "kv_dtype_unknown": lambda: io["kv_cache"].update(dtype="float8"),
        "generation_list": lambda: meta.update(generation=[1]),
        "eos_text": lambda: meta["generation"].update(eos_token_ids=None, max_new_tokens="x"),
        # engine.json
        "plan_dotdot": lambda: meta.update(plan="../model.onnx"),
        "plan_abs": lambda: meta.update(plan=str(root / "engine" / "model.plan")),
        "plan_sha_missing": lambda: meta.pop("plan_sha256"),
        "plan_bytes_wrong": lambda: meta.update(plan_bytes=meta["plan_bytes"] + 1),
        "profiles_bad": lambda: meta.update(profiles=[{"ranges": 3}]),
        "model_sha_other": lambda: meta.update(model_sha256="0" * 64),
        "format_other": lambda: meta.update(format="other"),
        "gpu_other": lambda: meta.update(compute_capability="9.0"),
        # cache index
        "shard_dotdot": lambda: shard.update(file="../shard-00002.safetensors"),
        "shard_abs": lambda: shard.update(file=str(root / "shard-00002.safetensors")),
        "shard_sha_missing": lambda: shard.pop("sha256"),
        "num_examples_wrong": lambda: meta.update(num_examples=meta["num_examples"] + 1),
        "shards_not_list": lambda: meta.update(shards={"a": 1}),
        "k_zero": lambda: meta.update(k=0),
        "first_example_wrong": lambda: shard.update(first_example=shard["first_example"] + 1),
        "incomplete": lambda: meta.update(complete=False),
        "version_other": lambda: meta.update(
            **({"version": 9} if "version" in meta else {"format_version": 9})
        ),
        "shard_counts_text": lambda: shard.update(num_examples="4"),
        # checkpoint manifest
        "drop_metadata": lambda: files.pop(".metadata"),
        "step_text": lambda: meta.update(step="3"),
        "unlisted_file": lambda: (root / STEP / "extra.bin").write_bytes(b"x"),
    }
    edits[edit]()


def mutate(root: Path, artifact: str, name: str, how: str, rng: random.Random,
           outside: Path) -> str:  # fmt: skip
    """Damage file ``name`` of the artifact copy at ``root``; a description of what was done."""
    path = root / name
    data = path.read_bytes()
    what = f"{artifact}/{name} {how}"
    if how == "bitflip":
        pos = rng.randrange(len(data))
        buf = bytearray(data)
        buf[pos] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(buf))
        return f"{what} @{pos}"
    if how in ("truncate", "rehash_truncate"):
        keep = rng.randrange(len(data) - (2 if name.endswith(".json") else 0))
        path.write_bytes(data[:keep])
        if how == "rehash_truncate":
            _rehash(root, artifact, name)
        return f"{what} to {keep}"
    if how == "zero_block":
        pos = rng.randrange(max(len(data) - 64, 1))
        block = data[pos : pos + 64]
        filler = b"\0" * len(block) if any(block) else b"\1" * len(block)
        path.write_bytes(data[:pos] + filler + data[pos + 64 :])
        return f"{what} @{pos}"
    if how == "append":
        path.write_bytes(data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))))
        return what
    if how == "empty":
        path.write_bytes(b"")
        return what
    if how == "delete":
        path.unlink()
        return what
    if how == "altered":
        path.write_bytes(rng.randbytes(len(data)))
        return what
    if how.startswith("swap:"):
        other = root / how.split(":", 1)[1]
        swapped = other.read_bytes()
        path.write_bytes(swapped)
        other.write_bytes(data)
        return what
    if how == "symlink_out":
        copy = outside / f"{rng.randrange(1 << 30)}-{path.name}"
        shutil.copy(path, copy)
        path.unlink()
        path.symlink_to(copy)
        return what
    if how == "unhashed_data":
        (root / "model.onnx_data").write_bytes(rng.randbytes(128))
        return what
    meta = json.loads(data)
    if how == "edit":
        where = _edit(meta, rng)
        path.write_text(json.dumps(meta, indent=2))
        return f"{what} {where}"
    if how.startswith("reseal:"):
        _reseal_edit(meta, how.split(":", 1)[1], root)
        path.write_text(json.dumps(seal(meta), indent=2))
        return what
    raise ValueError(f"unknown mutation {how!r}")
