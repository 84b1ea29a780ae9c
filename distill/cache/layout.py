"""The teacher cache's on-disk names and its index reader (shared by the writer and reader)."""

from __future__ import annotations

import json
from pathlib import Path

from moe2edge.distill.errors import DistillError
from moe2edge.fileio import member_problem, seal_problem

FORMAT_NAME = "moe2edge-teacher-cache"
# 2: ``tokenizer_sha256`` is ``tokenizer_hash``'s fingerprint of all tokenizer files (v1: of
# tokenizer.json alone), so a v1 cache cannot be checked against a tokenizer and is refused.
# 3: the index carries ``checksum`` (sha256 of its other keys), checked on every load; a v2
# index (no checksum) is still read.
FORMAT_VERSION = 3
READ_VERSIONS = (2, 3)
INDEX_FILE = "index.json"
# Settings a resumed run must share with the cache it continues.
RESUME_KEYS = ("teacher", "tokenizer_sha256", "k", "max_seq_len", "dataset", "shard_examples")


def load_index(path: Path) -> dict:
    """The parsed, intact ``index.json`` at ``path``; DistillError if unreadable, edited,
    malformed or another format."""
    try:
        index = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DistillError(f"cannot read teacher cache index {path}: {exc}") from exc
    if not isinstance(index, dict):
        raise DistillError(f"teacher cache index {path} is not a JSON object; rebuild the cache")
    if index.get("format") != FORMAT_NAME or index.get("version") not in READ_VERSIONS:
        raise DistillError(
            f"{path} is not a {FORMAT_NAME} v{FORMAT_VERSION} index (format "
            f"{index.get('format')!r}, version {index.get('version')!r}); rebuild the cache with "
            "`moe2edge distill cache`"
        )
    if index["version"] >= 3 and (why := seal_problem(index)) is not None:
        raise DistillError(
            f"teacher cache index {path} is damaged: {why}. Re-run `moe2edge distill cache` "
            "with the same arguments into a new --out directory"
        )
    problems = index_problems(path.parent, index)
    if problems:
        raise DistillError(
            f"teacher cache index {path} is malformed: {'; '.join(problems[:5])}; rebuild the "
            "cache with `moe2edge distill cache`"
        )
    return index


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def index_problems(root: Path, index: dict) -> list[str]:
    """Shape errors of an index: shard names outside the cache, missing counts, bad order."""
    problems = []
    if not (_count(index.get("k")) and index["k"] >= 1):
        problems.append(f"k={index.get('k')!r} is not a positive integer")
    if not _count(index.get("num_examples")):
        problems.append("num_examples is not a count")
    for key in ("tokenizer_sha256", "max_seq_len", "shard_examples"):
        if key not in index:
            problems.append(f"{key} is missing")
    if not isinstance(index.get("dataset"), dict) or "sha256" not in index["dataset"]:
        problems.append("dataset must be an object with the data's sha256")
    shards = index.get("shards", [])
    if not isinstance(shards, list):
        return [*problems, "shards is not a list"]
    expected_first = 0
    for n, shard in enumerate(shards):
        if not isinstance(shard, dict):
            problems.append(f"shard {n} is not an object")
            continue
        if (why := member_problem(root, shard.get("file"))) is not None:
            problems.append(f"shard {n} file {why}")
        sha = shard.get("sha256")
        if not (isinstance(sha, str) and len(sha) == 64):
            problems.append(f"shard {n} has no sha256")
        counts = [shard.get(k) for k in ("bytes", "first_example", "num_examples", "tokens")]
        if not all(_count(c) for c in counts):
            problems.append(f"shard {n} lacks bytes/first_example/num_examples/tokens counts")
            continue
        if index.get("complete") and shard["first_example"] != expected_first:
            problems.append(
                f"shard {n} starts at example {shard['first_example']}, not {expected_first}"
            )
        expected_first = shard["first_example"] + shard["num_examples"]
    if (
        index.get("complete")
        and _count(index.get("num_examples"))
        and (expected_first != index["num_examples"])
    ):
        problems.append(
            f"the shards hold {expected_first} examples, the index says {index['num_examples']}"
        )
    return problems
