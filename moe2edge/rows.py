"""Data set rows: the one reader for training, the teacher cache, calibration and export prompts.

A data set is a JSONL file (one JSON object per line) or a Parquet file; a row is in one of
three forms:

- ``{"prompt": ..., "reply": ...}``: only the reply is learnt;
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: a chat, rendered with the
  tokenizer's chat template; every assistant turn is learnt;
- ``{"text": ...}``: plain text, every token learnt.

Other fields (``action``, ``utterance``...) ride along. ``iter_rows`` streams (constant
memory, any size); ``read_rows`` is the list of them. JSONL is read line by line with the
stdlib: it already streams, names the failing line, and needs no Arrow schema across rows
of mixed forms. Parquet goes through `datasets` (``load_dataset("parquet", streaming=True)``,
one row group at a time), imported only then, so this module stays stdlib-only for the
runtime and the JSONL path.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROW_FORMS = ("prompt+reply", "messages", "text")


class RowError(ValueError):
    """A data file or row that is not one of ROW_FORMS (the message names the file and line)."""


def row_form(row: Any, where: str = "row") -> str:
    """Which of ROW_FORMS ``row`` is; a clear error naming ``where`` otherwise."""
    if not isinstance(row, dict):
        raise RowError(f"{where} is {type(row).__name__}, not a JSON object")
    if "prompt" in row and "reply" in row:
        return "prompt+reply"
    if "messages" in row:
        messages = row["messages"]
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)
        ):
            raise RowError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        return "messages"
    if "text" in row:
        return "text"
    raise RowError(f"{where} has keys {sorted(row)}; expected prompt+reply, messages, or text")


def file_format(path: str | Path) -> str:
    """``parquet`` for a .parquet file, else ``json`` (JSONL); a RowError if it is missing."""
    path = Path(path)
    if not path.is_file():
        raise RowError(
            f"data file {path} does not exist; pass a JSONL or Parquet file of "
            f"{', '.join(ROW_FORMS)} rows"
        )
    return "parquet" if path.suffix.lower() == ".parquet" else "json"


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise RowError(f"{path}:{n}: not valid JSON ({exc.msg})") from None


def _without_nulls(row: dict[str, Any]) -> dict[str, Any]:
    """A Parquet row as the JSON object it was: Arrow gives every row every column of the
    file (None where a row has none) and every message every struct field."""
    row = {k: v for k, v in row.items() if v is not None}
    if isinstance(row.get("messages"), list):
        row["messages"] = [
            {k: v for k, v in m.items() if v is not None or k == "content"}
            if isinstance(m, dict)
            else m
            for m in row["messages"]
        ]
    return row


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError as exc:
        raise RowError(
            f"reading {path} needs the `datasets` package: pip install 'moe2edge[distill]' "
            "(or convert the data set to JSONL)"
        ) from exc
    stream = datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)
    for n, row in enumerate(stream, 1):
        yield f"{path} row {n}", _without_nulls(row)


def iter_rows(path: str | Path, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """The rows of a JSONL or Parquet file, one at a time, each checked to be one of ROW_FORMS
    (blank JSONL lines are skipped); at most ``limit`` rows."""
    path = Path(path)
    source = _parquet_rows(path) if file_format(path) == "parquet" else _jsonl_rows(path)
    if limit is not None and limit <= 0:
        return
    count = 0
    for where, row in source:
        row_form(row, where)
        yield row
        count += 1
        if limit is not None and count >= limit:
            return


def read_rows(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The rows of a JSONL or Parquet file (``iter_rows``) as a list."""
    return list(iter_rows(path, limit))
