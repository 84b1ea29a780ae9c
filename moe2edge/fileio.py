"""Atomic writes and file hashes: the one implementation every stage uses.

Every artifact on disk (teacher-cache shards and index, checkpoints, students, bundles,
engines, reports) is written so that a reader sees the old content or the whole new
content, never a part, even after SIGKILL or a power cut: write a temporary sibling,
fsync it, ``os.replace`` it into place, fsync the directory. This module is stdlib-only
so that the device runtime can use it too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path, block_bytes: int = 1 << 20) -> str:
    """sha256 of a file, read in blocks (shards, checkpoints and ONNX data can be many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_bytes):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically (tmp + fsync + replace + fsync of the directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a unique sibling opened with "x" (not mkstemp): the file gets the umask's mode, as a
    # plain open would, so a service running as another user can still read the artifact
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """``atomic_write`` of ``obj`` as JSON (keys kept in insertion order)."""
    return atomic_write(path, json.dumps(obj, indent=indent) + "\n")


def fsync_tree(root: str | Path) -> None:
    """fsync every file below ``root`` and every directory, deepest first."""
    root = Path(root)
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling and move it into place as a whole.

    ``with atomic_dir(out) as tmp: write files into tmp``. On success every file is fsynced,
    a previous ``out`` is moved aside and removed only after the new one is in place; on an
    exception (or a kill) only the ``.tmp`` sibling is left, which no reader ever opens.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp")
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
