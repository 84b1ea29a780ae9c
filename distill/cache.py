"""Teacher cache: score a data set with the teacher once, train from its top-k many times.

``cache/index.json`` (teacher identity, tokenizer hash, k, data sha256, per-shard sha256) and
``shard-N.safetensors`` (ids int32 [R, k], logprobs float16 [R, k], tail float16 [R] = log of
the mass outside the top k, offsets int64 [n+1]). Example i (``moe2edge.distill.data.encode_rows``' T ids) owns
T - 1 rows; row t is the top-k for the token after token t (logits position t). Why the tail is
stored, the exact layout and the resume rules: docs/teacher-cache.md.

Writes are atomic (tmp + fsync + os.replace) and the index is rewritten after each shard, so
an interrupted run resumes: shards listed in the index whose sha256 still matches are skipped,
and a half-written ``*.tmp`` is never read (it is deleted on the next run).
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save as save_safetensors
from tqdm import tqdm

from moe2edge.distill.data import encode_rows
from moe2edge.distill.demo_data import read_jsonl
from moe2edge.distill.errors import DistillError
from moe2edge.distill.files import sha256_file
from moe2edge.distill.tokenizer import check_vocab_matches, load_tokenizer, tokenizer_hash

log = logging.getLogger(__name__)

FORMAT_NAME = "moe2edge-teacher-cache"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
# Settings a resumed run must share with the cache it continues.
RESUME_KEYS = ("teacher", "tokenizer_sha256", "k", "max_seq_len", "dataset", "shard_examples")

# A scorer maps token-id sequences (each T tokens) to per-sequence (ids [T-1, k], logprobs
# [T-1, k]) arrays: row t is the teacher's top-k for the token after token t.
Scorer = Callable[[list[list[int]]], list[tuple[np.ndarray, np.ndarray]]]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` so that a reader sees the old file or the whole new one, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k log-probs and ids of ``logits`` [..., V] in float32, precise near 0.

    ``values - logsumexp`` would round the top log-prob to the ulp of the logits (~1e-6), which
    is more than a trained teacher's tail mass; here it is ``-log1p(sum of the other probs)``.
    """
    logits = logits.float()
    values, ids = logits.topk(k, dim=-1)
    top = values[..., :1]
    rest = (logits - top).exp().scatter_(-1, ids[..., :1], 0.0).sum(-1, keepdim=True)
    return (values - top) - torch.log1p(rest), ids


def local_scorer(model: torch.nn.Module, k: int, batch_size: int = 8) -> Scorer:
    """A Scorer running an HF causal LM: right-padded batches, no grad, float32 top-k."""
    vocab = model.config.vocab_size
    if not 1 <= k <= vocab:
        raise DistillError(f"k={k} must be between 1 and the teacher's vocabulary size {vocab}")
    device = next(model.parameters()).device

    @torch.no_grad()
    def score(seqs: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for a in range(0, len(seqs), batch_size):
            chunk = seqs[a : a + batch_size]
            width = max(len(s) for s in chunk)
            input_ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, s in enumerate(chunk):
                input_ids[row, : len(s)] = torch.tensor(s)
                mask[row, : len(s)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            for row, s in enumerate(chunk):
                lps, ids = topk_logprobs(logits[row, : len(s) - 1], k)
                out.append((ids.cpu().numpy().astype(np.int32), lps.cpu().numpy()))
        return out

    return score


def score_local(
    model: torch.nn.Module,
    tokenizer,
    rows: Sequence[dict | list[int]],
    k: int,
    max_seq_len: int = 64,
    batch_size: int = 8,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Top-k (ids int32 [T-1, k], logprobs float32 [T-1, k]) for data set rows or id lists."""
    seqs = [
        r if isinstance(r, list) else encode_rows(tokenizer, [r], max_seq_len)[0][0] for r in rows
    ]
    return local_scorer(model, k, batch_size)(seqs)


def encode_dataset(tokenizer, data_path: str | Path, max_seq_len: int) -> list[list[int]]:
    """The token ids of every row, exactly as training encodes them (moe2edge.distill.data.encode_rows:
    prompt/reply, chat ``messages`` or plain ``text`` rows)."""
    path = Path(data_path)
    if not path.is_file():
        raise DistillError(f"data set {path} does not exist; pass a JSONL file")
    try:
        rows = read_jsonl(path)
    except json.JSONDecodeError as exc:
        raise DistillError(f"{path} is not valid JSONL (line {exc.lineno}): {exc.msg}") from exc
    if not rows:
        raise DistillError(f"data set {path} is empty")
    if not all(isinstance(row, dict) for row in rows):
        raise DistillError(f"every line of {path} must be a JSON object")
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


def _load_index(path: Path) -> dict:
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
        old = _load_index(index_path)
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
    atomic_write_bytes(path, data)
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
    atomic_write_bytes(path, (json.dumps(index, indent=2) + "\n").encode())


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
    on_shard: Callable[[int], None] | None = None,
) -> dict:
    """Fill (or finish) the teacher cache ``out`` from a local teacher dir or a served one."""
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

        model = load_teacher(teacher, trust_remote_code=trust_remote_code)
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


class TeacherCache:
    """Read a teacher cache: verified, tokenizer-checked, top-k per example as torch tensors.

    ``verify``: True checks every shard's sha256 when the cache is opened; "lazy" checks each
    shard on its first access (fast start for very large caches); False trusts the files.
    """

    def __init__(
        self, path: str | Path, tokenizer_dir: str | Path | None = None, verify: bool | str = True
    ):
        self.path = Path(path)
        if not (self.path / INDEX_FILE).is_file():
            raise DistillError(
                f"{self.path} is not a teacher cache (no {INDEX_FILE}); create one with "
                "`moe2edge distill cache`"
            )
        self.meta = _load_index(self.path / INDEX_FILE)
        if not self.meta.get("complete"):
            raise DistillError(
                f"the teacher cache {self.path} is incomplete ({len(self.meta.get('shards', []))} "
                "shards written); re-run `moe2edge distill cache` with the same arguments to "
                "finish it (completed shards are kept)"
            )
        if tokenizer_dir is not None:
            if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
                raise DistillError(f"no tokenizer.json in {tokenizer_dir}; pass a tokenizer dir")
            have = tokenizer_hash(tokenizer_dir)
            want = self.meta["tokenizer_sha256"]
            if have != want:
                raise DistillError(
                    f"the teacher cache {self.path} was made with the tokenizer whose "
                    f"tokenizer.json has sha256 {want}, but {tokenizer_dir} has sha256 {have}: "
                    "its token ids would not match. Train with the tokenizer the cache was made "
                    f"with, or rebuild the cache with `moe2edge distill cache --tokenizer "
                    f"{tokenizer_dir}`"
                )
        self.k: int = self.meta["k"]
        self.shards: list[dict] = self.meta["shards"]
        self._starts = [s["first_example"] for s in self.shards]
        if verify not in (True, False, "lazy"):
            raise ValueError(f"verify must be True, False or 'lazy', got {verify!r}")
        self._lazy = verify == "lazy"
        self._verified: set[int] = set()
        self._open: dict[int, tuple] = {}
        if verify and not self._lazy:
            for n in range(len(self.shards)):
                self._verify(n)

    def __len__(self) -> int:
        return self.meta["num_examples"]

    @property
    def bytes_per_token(self) -> float:
        return self.meta["bytes_per_token"]

    def __getstate__(self) -> dict:  # picklable for DataLoader workers: reopen shards there
        return {**self.__dict__, "_open": {}}

    def check_data(self, data_path: str | Path, max_seq_len: int) -> None:
        """Raise DistillError unless the cache was made from this data file and max_seq_len."""
        want = self.meta["dataset"]
        if sha256_file(data_path) != want["sha256"] or max_seq_len != self.meta["max_seq_len"]:
            raise DistillError(
                f"the teacher cache {self.path} was made from {want['path']} (sha256 "
                f"{want['sha256'][:16]}...) with max_seq_len={self.meta['max_seq_len']}, not from "
                f"{data_path} with max_seq_len={max_seq_len}: its rows would not line up with the "
                "examples. Build a cache for this data with `moe2edge distill cache`"
            )

    def _verify(self, n: int) -> None:
        shard = self.shards[n]
        path = self.path / shard["file"]
        if not path.is_file():
            raise DistillError(
                f"teacher cache shard {path} is missing; re-run `moe2edge distill cache` with the "
                "same arguments to re-create it (the other shards are kept)"
            )
        got = sha256_file(path)
        if got != shard["sha256"]:
            raise DistillError(
                f"teacher cache shard {path} is corrupted: its sha256 is {got} but the index "
                f"says {shard['sha256']}. Re-run `moe2edge distill cache` with the same arguments: "
                "it re-scores only the shards that do not match"
            )
        self._verified.add(n)

    def _shard(self, n: int) -> tuple:
        if n not in self._open:
            if self._lazy and n not in self._verified:
                self._verify(n)
            path = self.path / self.shards[n]["file"]
            try:
                handle = safe_open(str(path), framework="pt")
                offsets = handle.get_tensor("offsets").tolist()
            except Exception as exc:  # a damaged file read with verify=False
                raise DistillError(f"cannot read teacher cache shard {path}: {exc}") from exc
            if len(offsets) != self.shards[n]["num_examples"] + 1:
                raise DistillError(f"teacher cache shard {path} does not match the index")
            self._open[n] = (handle, offsets)
        return self._open[n]

    def topk(self, example_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids LongTensor [T, k], logprobs FloatTensor [T, k]) of example i (T = its tokens).

        Row t is the teacher's top-k for token t + 1; the last row is padding (id 0, logprob 0).
        """
        if not 0 <= example_index < len(self):
            raise IndexError(f"example {example_index} is outside the cache (0..{len(self) - 1})")
        n = bisect.bisect_right(self._starts, example_index) - 1
        handle, offsets = self._shard(n)
        j = example_index - self._starts[n]
        a, b = offsets[j], offsets[j + 1]
        lps = handle.get_slice("logprobs")[a:b].double()
        tail = handle.get_slice("tail")[a:b].double()[:, None]
        # Rescale the rounded probabilities so that 1 - sum(exp(lps)) is the stored tail.
        kept = torch.where(tail > -0.693, torch.log(-torch.expm1(tail)), torch.log1p(-tail.exp()))
        lps = (lps - lps.logsumexp(-1, keepdim=True) + kept).float()
        pad = torch.zeros((1, self.k))
        return torch.cat([handle.get_slice("ids")[a:b].long(), pad.long()]), torch.cat([lps, pad])

    def batch(
        self, indices: Sequence[int], pad_to: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, pad_to, k] ids and logprobs, right-padded with id 0 / logprob 0 like collate."""
        items = [self.topk(i) for i in indices]
        width = max(len(ids) for ids, _ in items) if pad_to is None else pad_to
        ids = torch.zeros((len(items), width, self.k), dtype=torch.long)
        lps = torch.zeros((len(items), width, self.k), dtype=torch.float32)
        for row, (i, lp) in enumerate(items):
            if len(i) > width:
                raise ValueError(f"example {indices[row]} has {len(i)} tokens > pad_to={width}")
            ids[row, : len(i)] = i
            lps[row, : len(i)] = lp
        return ids, lps


def register_cache_command(sub) -> None:
    """Add ``moe2edge distill cache`` to the distill action subparsers."""
    p = sub.add_parser(
        "cache",
        help="score a data set with the teacher once into a top-k cache (local or served)",
        description="Score a JSONL data set (prompt/reply, messages or text rows) with the "
        "teacher and write its top-k "
        "token ids and log-probs into safetensors shards + index.json. Resumable.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--teacher", help="local Hugging Face teacher checkpoint directory")
    where.add_argument("--server", help="URL of a vLLM or SGLang server serving the teacher")
    p.add_argument("--api", choices=("vllm", "sglang"), default="vllm", help="server API")
    p.add_argument("--model", help="served model name (default: ask the server)")
    p.add_argument("--data", required=True, help="JSONL data set (as `train` reads it)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (shared with student)")
    p.add_argument("--out", required=True, help="cache directory (resumed if it exists)")
    p.add_argument("--k", type=int, default=32, help="top-k entries stored per token")
    p.add_argument("--max-seq-len", type=int, default=64)
    p.add_argument("--shard-examples", type=int, default=256, help="examples per shard")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (served)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward (local)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (served)")
    p.add_argument("--retries", type=int, default=5, help="retries per request (served)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(handler=run_cache)


def run_cache(args: argparse.Namespace) -> int:
    names = ("data", "tokenizer", "out", "teacher", "server", "api", "k", "max_seq_len")
    names += ("shard_examples", "concurrency", "batch_size", "timeout", "retries")
    opts = {name: getattr(args, name) for name in names}
    index = build_cache(model_name=args.model, trust_remote_code=args.trust_remote_code, **opts)
    keys = ("num_examples", "skipped_shards", "tokens", "bytes", "bytes_per_token")
    summary = {"cache": str(args.out), "shards": len(index["shards"])}
    print(json.dumps({**summary, **{key: index[key] for key in keys}}))
    return 0
