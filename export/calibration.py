"""Calibration and evaluation rows (``moe2edge.rows``), tokenised as the runtime does.

Calibration (int8 static, int4 gptq) feeds whole ``prompt + reply`` sequences through the
graph with an empty KV cache: every weight MatMul sees exactly the activations it sees
token by token in decoding, because the projections are per position.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from moe2edge.export.errors import ExportError
from moe2edge.fileio import sha256_file
from moe2edge.rows import RowError
from moe2edge.rows import read_rows as read_data_rows
from moe2edge.runtime.engine import LOGITS_TO_KEEP, SEQLENS, TOTAL_LENGTH
from moe2edge.runtime.generate import Generator
from moe2edge.runtime.session import render_chat


def read_rows(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Calibration/evaluation rows (``moe2edge.rows``: JSONL or Parquet, prompt/reply,
    messages or text rows; ``limit`` 0 or None: all). A row's prompt is its ``utterance`` (put
    in the bundle's chat format) if it has one, else its prompt, chat or text."""
    try:
        rows = read_data_rows(path, limit or None)
    except RowError as exc:
        raise ExportError(str(exc)) from exc
    if not rows:
        raise ExportError(f"{path} holds no rows")
    return rows


def _chat(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(str(m["role"]), str(m["content"] or "")) for m in messages]


def _before_reply(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return messages[:-1] if messages[-1].get("role") == "assistant" else messages


def prompt_text(row: dict[str, Any]) -> str:
    """A row's user message as text: its utterance, prompt, last user turn, or text."""
    if row.get("utterance") or row.get("prompt"):
        return row.get("utterance") or row["prompt"]
    if row.get("messages"):
        users = [m for m in row["messages"] if m.get("role") == "user"]
        if users:
            return str(users[-1]["content"])
    if row.get("text"):
        return str(row["text"])
    raise ExportError(f"a row with keys {sorted(row)} has no user message to prompt with")


class PromptEncoder:
    """A bundle's tokenizer and prompt format, as the runtime applies them (no session).

    The prompt ids are the runtime's own (``Generator.encode_prompt``, ``render_chat``),
    from a Generator that has the bundle's tokenizer and manifest but no inference session.
    """

    def __init__(self, bundle_dir: str | Path, manifest: dict[str, Any]):
        tok = Path(bundle_dir) / manifest["io"].get("tokenizer_file", "tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(tok))
        self.generator = Generator(SimpleNamespace(manifest=manifest), self.tokenizer)
        self.eos = self.generator.eos_token_ids

    def prompt(self, row: dict[str, Any]) -> list[int]:
        """The ids the runtime runs for the row: a chat up to its last assistant turn (with
        the generation prompt; the demo's multi-turn rows also have an utterance, their last
        user turn), an utterance in the chat format, or the prompt/text as it is."""
        if row.get("messages"):
            return render_chat(self.generator, _chat(_before_reply(row["messages"])))
        if row.get("utterance"):
            return self.generator.encode_prompt(row["utterance"])
        text = row["prompt"] if "prompt" in row else row.get("text", "")
        return self.generator.encode_prompt(str(text), template=False)

    def reply(self, row: dict[str, Any]) -> list[int]:
        """The reply's ids after ``prompt(row)`` ([] when the row has none): ``" " + reply``
        then end-of-turn, how distill builds prompt/reply sequences, or a chat's last
        assistant turn as the chat format writes it, through its end of turn."""
        messages = row.get("messages")
        if messages and messages[-1].get("role") == "assistant":
            head = self.prompt(row)
            ids = render_chat(self.generator, _chat(messages))[len(head) :]
            ends = [n for n, t in enumerate(ids) if t in self.eos]
            return ids[: ends[0] + 1] if ends else ids
        if not row.get("reply"):
            return []
        return self.generator.encode(" " + row["reply"]) + self.eos[:1]


def prefill_feed(manifest: dict[str, Any], ids: list[int]) -> dict[str, np.ndarray]:
    """Inputs for one prefill of ``ids`` over an empty KV cache, from the io contract.

    Both KV layouts of docs/bundle-format.md: concatenating (past of length 0, mask of the
    new tokens) and shared-buffer (``kv_cache.shared_buffer``: zeroed ``max_length``
    buffers; the attention's lengths as ``seqlens_k``/``total_sequence_length`` inputs, or
    in older bundles a fixed ``[1, max_length]`` mask with ones on the filled positions).
    """
    io, kv = manifest["io"], manifest["io"]["kv_cache"]
    n = len(ids)
    shared = bool(kv.get("shared_buffer"))
    capacity = int(kv.get("max_length") or io["max_sequence_length"]) if shared else 0
    past_shape = (1, int(kv["num_kv_heads"]), capacity, int(kv["head_dim"]))
    past_dtype = np.float16 if kv["dtype"] == "float16" else np.float32
    past_names = {
        kv[kind].format(layer=i)
        for kind in ("past_key", "past_value")
        for i in range(kv["num_layers"])
    }
    feed: dict[str, np.ndarray] = {}
    for entry in io["inputs"]:
        name = entry["name"]
        if name == "input_ids":
            feed[name] = np.asarray([ids], dtype=np.int64)
        elif name == "attention_mask":
            feed[name] = np.ones((1, n), dtype=np.int64)
            if shared:
                feed[name] = np.zeros((1, capacity), dtype=np.int64)
                feed[name][0, :n] = 1
        elif name == "position_ids":
            feed[name] = np.arange(n, dtype=np.int64)[None]
        elif name in past_names:
            feed[name] = np.zeros(past_shape, dtype=past_dtype)
        elif name == SEQLENS:
            feed[name] = np.array([n - 1], dtype=np.int32)
        elif name == TOTAL_LENGTH:
            feed[name] = np.array(n, dtype=np.int32)
        elif name == LOGITS_TO_KEEP:  # every position through the lm_head: more calibration
            feed[name] = np.array(n, dtype=np.int64)
        else:
            raise ExportError(f"cannot build a calibration feed for graph input {name!r}")
    return feed


def calibration_feeds(
    bundle_dir: str | Path, manifest: dict[str, Any], jsonl: str | Path, limit: int = 64
) -> list[dict[str, np.ndarray]]:
    """One prefill feed per row: ``prompt + reply`` when the row has a reply."""
    enc = PromptEncoder(bundle_dir, manifest)
    feeds = []
    for row in read_rows(jsonl, limit):
        ids = enc.prompt(row) + enc.reply(row)
        io = manifest["io"]
        context = int(io["kv_cache"].get("max_length") or io["max_sequence_length"])
        feeds.append(prefill_feed(manifest, ids[:context]))
    return feeds


def calibration_reader(feeds: list[dict[str, np.ndarray]]):
    """An ``onnxruntime.quantization.CalibrationDataReader`` over prepared feeds."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.index = 0

        def get_next(self) -> dict | None:
            if self.index >= len(feeds):
                return None
            self.index += 1
            return feeds[self.index - 1]

        def __len__(self) -> int:
            return len(feeds)

        def rewind(self) -> None:
            self.index = 0

    return Reader()


def calibration_record(jsonl: str | Path, samples: int) -> dict[str, Any]:
    return {"file": str(Path(jsonl).resolve()), "sha256": sha256_file(jsonl), "samples": samples}
