"""Data set rows: the one reader for training, the teacher cache, calibration and export prompts.

A row is one JSON object per line, in one of three forms:

- ``{"prompt": ..., "reply": ...}``: only the reply is learnt;
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: a chat, rendered with the
  tokenizer's chat template;
- ``{"text": ...}``: plain text, every token learnt.
"""

from __future__ import annotations

import json
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


def read_rows(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The rows of a JSONL file (blank lines skipped), each checked to be one of ROW_FORMS."""
    path = Path(path)
    if not path.is_file():
        raise RowError(
            f"data file {path} does not exist; pass a JSONL file of {', '.join(ROW_FORMS)} rows"
        )
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RowError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            row_form(row, f"{path}:{n}")
            rows.append(row)
    return rows
