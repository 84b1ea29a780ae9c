"""The teacher cache's on-disk names and its index reader (shared by the writer and reader)."""

from __future__ import annotations

import json
from pathlib import Path

from moe2edge.distill.errors import DistillError

FORMAT_NAME = "moe2edge-teacher-cache"
# 2: ``tokenizer_sha256`` is ``tokenizer_hash``'s fingerprint of all tokenizer files (v1: of
# tokenizer.json alone), so a v1 cache cannot be checked against a tokenizer and is refused.
FORMAT_VERSION = 2
INDEX_FILE = "index.json"
# Settings a resumed run must share with the cache it continues.
RESUME_KEYS = ("teacher", "tokenizer_sha256", "k", "max_seq_len", "dataset", "shard_examples")


def load_index(path: Path) -> dict:
    """The parsed ``index.json`` at ``path``; DistillError if unreadable or another format."""
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DistillError(f"cannot read teacher cache index {path}: {exc}") from exc
    if index.get("format") != FORMAT_NAME or index.get("version") != FORMAT_VERSION:
        raise DistillError(
            f"{path} is not a {FORMAT_NAME} v{FORMAT_VERSION} index (format "
            f"{index.get('format')!r}, version {index.get('version')!r}); rebuild the cache with "
            "`moe2edge distill cache`"
        )
    return index
