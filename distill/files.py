"""File helpers shared by the distill stage (caches, checkpoints, generated data sets)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path, block_bytes: int = 1 << 20) -> str:
    """sha256 of a file, read in blocks (shards and checkpoints can be many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(block_bytes), b""):
            digest.update(block)
    return digest.hexdigest()
