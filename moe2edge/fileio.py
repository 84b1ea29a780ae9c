"""Atomic writes and file hashes: the one implementation every stage uses.

Every artifact on disk (teacher-cache shards and index, checkpoints, students, bundles,
engines, reports) is written so that a reader sees the old content or the whole new
content, never a part, even after SIGKILL or a power cut: write a temporary sibling,
fsync it, ``os.replace`` it into place, fsync the directory. This module is stdlib-only
so that the device runtime can use it too.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

# errors that mean "no room": a full disk, a quota, a file-size limit (RLIMIT_FSIZE)
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
CHECKSUM_KEY = "checksum"


class DiskFullError(OSError):
    """An artifact could not be written for lack of space; the message names the path, the
    bytes it needed and the space there was. Nothing half-written is left behind."""


def disk_full_error(
    path: str | Path, needed: int | None, exc: OSError, at_least: bool = False
) -> DiskFullError:
    """A DiskFullError for ``exc`` (an ENOSPC/EDQUOT/EFBIG while writing ``path``);
    ``at_least``: ``needed`` is what was written before the space ran out."""
    path = Path(path)
    where = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    try:
        free = f"{shutil.disk_usage(where).free:,} bytes free on {where}"
    except OSError:
        free = "free space unknown"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if exc.errno == errno.EFBIG and limit != resource.RLIM_INFINITY:
        free += f", file size limit (ulimit -f) {limit:,} bytes"
    if needed is None:
        need = "needs more space"
    else:
        need = f"needs {'more than ' if at_least else ''}{needed:,} bytes"
    err = DiskFullError(
        exc.errno,
        f"not enough space to write {path}: it {need} ({free}; {os.strerror(exc.errno or 0)}). "
        "Nothing was left half-written; free some space (or write elsewhere) and run again",
    )
    err.filename = str(path)
    return err


def is_no_space(exc: BaseException) -> bool:
    return (
        isinstance(exc, OSError)
        and not isinstance(exc, DiskFullError)
        and (exc.errno in NO_SPACE_ERRNOS)
    )


def canonical_sha256(obj: dict[str, Any]) -> str:
    """sha256 of ``obj`` without its ``checksum`` key, as canonical JSON."""
    body = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def seal(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` plus ``checksum``: the sha256 of its other keys, so an edit or a flipped bit
    anywhere in a manifest or index is noticed on load (``seal_problem``)."""
    return {
        **{k: v for k, v in obj.items() if k != CHECKSUM_KEY},
        CHECKSUM_KEY: canonical_sha256(obj),
    }


def seal_problem(obj: Any) -> str | None:
    """Why ``obj`` (a parsed manifest) is not intact, or None when its checksum matches."""
    if not isinstance(obj, dict):
        return f"it holds a JSON {type(obj).__name__}, not an object"
    want = obj.get(CHECKSUM_KEY)
    if not isinstance(want, str):
        return f"it has no {CHECKSUM_KEY!r}"
    if canonical_sha256(obj) != want:
        return f"its {CHECKSUM_KEY} does not match its content (edited or damaged after it was written)"
    return None


def member_problem(root: str | Path, name: Any) -> str | None:
    """Why ``name`` (a file name from a manifest) is not a plain relative path inside ``root``
    (absolute, ``..``, empty, a symlink leading out), or None when it is one."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        return f"{name!r} is not a file name"
    pure = PurePosixPath(name)
    if pure.is_absolute() or name.startswith("~"):
        return f"{name!r} is an absolute path; manifests name files relative to their directory"
    if any(part in ("..", "") for part in name.split("/")) or ".." in pure.parts:
        return f"{name!r} leaves its directory (..); manifests name files inside it"
    root = Path(root)
    try:
        inside = (root / name).resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError) as exc:  # a symlink loop
        return f"{name!r} cannot be resolved ({exc})"
    if not inside:
        return f"{name!r} is a symlink that leads out of {root}"
    return None


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
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "xb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if is_no_space(exc):
            raise disk_full_error(path, len(raw), exc) from exc  # type: ignore[arg-type]
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
    exception (or a kill) only the ``.tmp`` sibling is left, which no reader ever opens;
    a full disk is a ``DiskFullError`` naming ``final`` (the ``.tmp`` is removed).
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
    except BaseException as exc:
        written = _tree_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if is_no_space(exc):
            raise disk_full_error(final, written or None, exc, at_least=True) from exc  # type: ignore[arg-type]
        raise


def _tree_bytes(root: Path) -> int:
    try:
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    except OSError:
        return 0
