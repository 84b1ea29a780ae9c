"""Fill a teacher cache: score a data set shard by shard, resumably.

Writes are atomic (``moe2edge.fileio.atomic_write``) and the index is rewritten after each
shard, so an interrupted run resumes: shards listed in the index whose sha256 still matches
are skipped, and a half-written ``*.tmp`` is never read (it is deleted on the next run).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import save as save_safetensors
from tqdm import tqdm

from moe2edge.distill.cache.layout import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILE,
    RESUME_KEYS,
    load_index,
)
from moe2edge.distill.cache.scorers import Scorer, local_scorer
from moe2edge.distill.data import encode_rows, read_data
from moe2edge.distill.errors import DistillError
from moe2edge.distill.tokenizer import check_vocab_matches, load_tokenizer, tokenizer_hash
from moe2edge.fileio import DiskFullError, atomic_write, atomic_write_json, seal, sha256_file

log = logging.getLogger(__name__)


def encode_dataset(tokenizer, data_path: str | Path, max_seq_len: int) -> list[list[int]]:
    """The token ids of every row, exactly as training encodes them
    (``moe2edge.distill.data.encode_rows``: prompt/reply, chat ``messages`` or ``text`` rows)."""
    rows = read_data(data_path)
    if not rows:
        raise DistillError(f"data set {data_path} is empty")
    return [ids for ids, _ in encode_rows(tokenizer, rows, max_seq_len)]


def local_teacher_identity(teacher_dir: str | Path) -> dict:
    path = Path(teacher_dir)
    return {
        "kind": "local",
        "name": path.resolve().name,
        "config_sha256": sha256_file(path / "config.json"),
    }


def _shard_bytes(results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[bytes, int]:
    """One shard's safetensors bytes (rows sorted by fp16 logprob desc, then id) and its rows."""
    lengths = [len(ids) for ids, _ in results]
    offsets = np.zeros(len(results) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    ids = np.concatenate([r[0].reshape(-1, k) for r in results]).astype(np.int32)
    exact = np.concatenate([r[1].reshape(-1, k) for r in results]).astype(np.float64)
    with np.errstate(divide="ignore"):  # no tail (k = vocabulary): log 0 = -inf
        tail = np.log(np.clip(1.0 - np.exp(exact).sum(-1), 0.0, 1.0)).astype(np.float16)
    lps = exact.astype(np.float16)
    # Canonical order, so two sources that agree to fp16 write identical bytes.
    order = np.lexsort((ids, -lps.astype(np.float32)), axis=-1)
    ids = np.take_along_axis(ids, order, -1)
    lps = np.take_along_axis(lps, order, -1)
    tensors = {"ids": np.ascontiguousarray(ids), "logprobs": np.ascontiguousarray(lps)}
    tensors.update(tail=tail, offsets=offsets)
    # One metadata key: safetensors writes several in hash order, which would vary the bytes.
    meta = {"moe2edge": json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION, "k": k})}
    return save_safetensors(tensors, metadata=meta), int(offsets[-1])


def _resume_value(header: dict, key: str):
    value = header.get(key)
    if key == "dataset" and isinstance(value, dict):
        return value.get("sha256")  # the same file may have moved
    return value


def write_cache(
    out_dir: str | Path,
    seqs: list[list[int]],
    scorer: Scorer,
    header: dict,
    on_shard: Callable[[int], None] | None = None,
) -> dict:
    """``_write_cache``; a full disk is a DistillError naming the file and the space needed
    (the shards written before it are kept, the next run resumes)."""
    try:
        return _write_cache(out_dir, seqs, scorer, header, on_shard)
    except DiskFullError as exc:
        raise DistillError(f"teacher cache {out_dir}: {exc.strerror}") from exc


def _write_cache(
    out_dir: str | Path,
    seqs: list[list[int]],
    scorer: Scorer,
    header: dict,
    on_shard: Callable[[int], None] | None = None,
) -> dict:
    """Score ``seqs`` shard by shard into ``out_dir``; resume a previous run.

    Returns the index plus ``skipped_shards`` (shards kept from a previous run).

    ``header`` holds RESUME_KEYS (plus optional extras such as ``teacher_url``). ``on_shard``
    is called with the shard number after each shard is committed (tests interrupt from it).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.tmp"):  # a write that was interrupted: never read, drop it
        stale.unlink()
    k, per_shard = header["k"], header["shard_examples"]
    index_path = out / INDEX_FILE
    done: dict[int, dict] = {}
    if index_path.exists():
        old = load_index(index_path)
        for key in RESUME_KEYS:
            if _resume_value(old, key) != _resume_value(header, key):
                raise DistillError(
                    f"the teacher cache in {out} was made with {key}={old.get(key)!r}, but this "
                    f"run asks for {key}={header[key]!r}. Nothing was changed; use another --out "
                    "directory, or run again with the settings of the existing cache"
                )
        for shard in old.get("shards", []):
            path = out / shard["file"]
            if path.is_file() and sha256_file(path) == shard["sha256"]:
                done[shard["first_example"]] = shard
            else:
                log.warning("shard %s is missing or changed since it was written: re-scoring", path)
    index = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **header}
    index.update(num_examples=len(seqs), complete=False)
    shards: list[dict] = []
    skipped = 0
    with tqdm(total=len(seqs), desc="teacher cache", unit="ex", mininterval=2.0) as bar:
        for number, start in enumerate(range(0, len(seqs), per_shard)):
            chunk = seqs[start : start + per_shard]
            name = f"shard-{number:05d}.safetensors"
            previous = done.get(start)
            if previous and previous["file"] == name and previous["num_examples"] == len(chunk):
                shards.append(previous)
                skipped += 1
            else:
                shards.append(_score_shard(out / name, chunk, start, scorer, k))
                # Keep listing the finished shards further on, so a crash now loses nothing.
                later = [s for first, s in sorted(done.items()) if first > start]
                index["shards"] = shards + later
                _commit_index(index_path, index)
            bar.update(len(chunk))
            if on_shard is not None:
                on_shard(number)
    index["shards"] = shards
    index["complete"] = True
    _commit_index(index_path, index)
    return {**index, "skipped_shards": skipped}


def _score_shard(path: Path, chunk: list[list[int]], start: int, scorer: Scorer, k: int) -> dict:
    """Score one shard's examples, write it atomically, return its index entry."""
    results = scorer(chunk)
    for n, ((ids, lps), s) in enumerate(zip(results, chunk, strict=True)):
        if ids.shape != (len(s) - 1, k) or lps.shape != ids.shape:
            raise DistillError(
                f"the teacher gave arrays of shape {ids.shape}/{lps.shape} for example "
                f"{start + n} ({len(s)} tokens); expected ({len(s) - 1}, {k})"
            )
    data, rows = _shard_bytes(results, k)
    atomic_write(path, data)
    return {
        "file": path.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "first_example": start,
        "num_examples": len(chunk),
        "tokens": rows,
    }


def _commit_index(path: Path, index: dict) -> None:
    shards = index.get("shards", [])
    tokens = sum(s["tokens"] for s in shards)
    index["tokens"] = tokens
    index["bytes"] = sum(s["bytes"] for s in shards)
    index["bytes_per_token"] = round(index["bytes"] / tokens, 3) if tokens else None
    atomic_write_json(path, seal(index))


def build_cache(
    *,
    data: str | Path,
    tokenizer: str | Path,
    out: str | Path,
    teacher: str | Path | None = None,
    server: str | None = None,
    api: str = "vllm",
    model_name: str | None = None,
    k: int = 32,
    max_seq_len: int = 64,
    shard_examples: int = 256,
    concurrency: int = 4,
    batch_size: int = 8,
    timeout: float = 120.0,
    retries: int = 5,
    backoff: float = 0.5,
    trust_remote_code: bool = False,
    dtype: str = "auto",
    device_map: str | dict | None = None,
    offload_folder: str | Path | None = None,
    on_shard: Callable[[int], None] | None = None,
) -> dict:
    """Fill (or finish) the teacher cache ``out`` from a local teacher dir or a served one.

    ``dtype`` / ``device_map`` / ``offload_folder``: how a local teacher loads
    (``moe2edge.distill.teacher.load_teacher``)."""
    if (teacher is None) == (server is None):
        raise DistillError("give exactly one teacher: a local directory or a server URL")
    if k < 1 or shard_examples < 1 or max_seq_len < 2:
        raise DistillError(
            f"need k >= 1, shard_examples >= 1 and max_seq_len >= 2 "
            f"(got {k}, {shard_examples}, {max_seq_len})"
        )
    tok = load_tokenizer(tokenizer)
    seqs = encode_dataset(tok, data, max_seq_len)
    header = {
        "tokenizer_sha256": tokenizer_hash(tokenizer),
        "k": k,
        "max_seq_len": max_seq_len,
        "dataset": {"path": str(Path(data).resolve()), "sha256": sha256_file(data)},
        "shard_examples": shard_examples,
    }
    if teacher is not None:
        from moe2edge.distill.teacher import load_teacher

        model = load_teacher(
            teacher,
            dtype,
            trust_remote_code,
            device_map=device_map,
            offload_folder=offload_folder,
        )
        check_vocab_matches(tok, model.config.vocab_size, "teacher")
        header["teacher"] = local_teacher_identity(teacher)
        return write_cache(out, seqs, local_scorer(model, k, batch_size), header, on_shard)
    from moe2edge.distill.served import ServedTeacher

    with ServedTeacher(
        server, api, k, model=model_name, concurrency=concurrency, timeout=timeout,
        retries=retries, backoff=backoff,
    ) as served:  # fmt: skip
        header["teacher"] = served.identity()
        header["teacher_url"] = served.url
        return write_cache(out, seqs, served, header, on_shard)
