"""Read a teacher cache back: verified, tokenizer-checked, top-k per example as tensors."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import torch
from safetensors import safe_open

from moe2edge.distill.cache.layout import INDEX_FILE, load_index
from moe2edge.distill.errors import DistillError
from moe2edge.distill.tokenizer import TOKENIZER_FILES, tokenizer_hash
from moe2edge.fileio import sha256_file


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
        self.meta = load_index(self.path / INDEX_FILE)
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
                    f"fingerprint is {want}, but {tokenizer_dir} has {have} (the sha256 over "
                    f"{', '.join(TOKENIZER_FILES[:3])} and the chat template): its token ids "
                    "would not match. Train with the tokenizer the cache was made with, or "
                    f"rebuild the cache with `moe2edge distill cache --tokenizer {tokenizer_dir}`"
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

    def example_lengths(self) -> list[int]:
        """Tokens of every cached example (its rows + 1), from the shards' offsets."""
        lengths = []
        for n in range(len(self.shards)):
            offsets = self._shard(n)[1]
            lengths += [b - a + 1 for a, b in pairwise(offsets)]
        return lengths

    def check_lengths(self, lengths: Sequence[int], data_name: str = "the data set") -> None:
        """Raise DistillError unless example i of the data has ``lengths[i]`` cached rows + 1.

        The data's sha256 and max_seq_len can match while the encoding differs (another
        tokenizer version, chat template or BOS rule): then rows would silently misalign and
        the missing ones become id 0 / logprob 0 targets. Reads only the shards' offsets.
        """
        if len(lengths) != len(self):
            raise DistillError(
                f"the teacher cache {self.path} holds {len(self)} examples but {data_name} has "
                f"{len(lengths)}; build a cache for this data with `moe2edge distill cache`"
            )
        for i, (have, want) in enumerate(zip(self.example_lengths(), lengths, strict=True)):
            if have != want:
                raise DistillError(
                    f"example {i} of {data_name} encodes to {want} tokens, but the teacher cache "
                    f"{self.path} holds {have} for it: the cache was made from other data or with "
                    "another tokenizer, chat template or max_seq_len, so its rows would not line "
                    "up. Rebuild the cache on this data with `moe2edge distill cache`"
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

    def topk(self, example_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids LongTensor [T, k], logprobs FloatTensor [T, k], tail FloatTensor [T]) of example i.

        T = its tokens. Row t is the teacher's top-k for token t + 1, ``tail`` the log of the mass
        outside it (exact, -inf when none is left; ``moe2edge.distill.losses`` floors it). The last
        row is padding (id 0, logprob 0, tail 0).
        """
        if not 0 <= example_index < len(self):
            raise IndexError(f"example {example_index} is outside the cache (0..{len(self) - 1})")
        n = bisect.bisect_right(self._starts, example_index) - 1
        handle, offsets = self._shard(n)
        j = example_index - self._starts[n]
        a, b = offsets[j], offsets[j + 1]
        lps = handle.get_slice("logprobs")[a:b].double()
        tail = handle.get_slice("tail")[a:b].double()[:, None]
        # Rescale the fp16-rounded probabilities so that they and the stored tail sum to 1.
        kept = torch.where(tail > -0.693, torch.log(-torch.expm1(tail)), torch.log1p(-tail.exp()))
        lps = (lps - lps.logsumexp(-1, keepdim=True) + kept).float()
        pad = torch.zeros((1, self.k))
        ids = torch.cat([handle.get_slice("ids")[a:b].long(), pad.long()])
        return ids, torch.cat([lps, pad]), torch.cat([tail[:, 0].float(), pad[:, 0]])

    def batch(
        self, indices: Sequence[int], pad_to: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, pad_to, k] ids and logprobs and [B, pad_to] tails, right-padded with 0 like collate.

        The three are ``distillation_loss``'s ``teacher_topk_ids / _logprobs / _tail``.
        """
        items = [self.topk(i) for i in indices]
        width = max(len(item[0]) for item in items) if pad_to is None else pad_to
        ids = torch.zeros((len(items), width, self.k), dtype=torch.long)
        lps = torch.zeros((len(items), width, self.k), dtype=torch.float32)
        tails = torch.zeros((len(items), width), dtype=torch.float32)
        for row, (i, lp, tail) in enumerate(items):
            if len(i) > width:
                raise ValueError(f"example {indices[row]} has {len(i)} tokens > pad_to={width}")
            ids[row, : len(i)] = i
            lps[row, : len(i)] = lp
            tails[row, : len(i)] = tail
        return ids, lps, tails
