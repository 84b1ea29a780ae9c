"""Untrusted text as plain text: a control token's string in it (``<|im_end|>``,
``<|eot_id|>``, ``<|user|>``, ...) is tokenised as characters, never as the control token.

A chat's messages come from the API client; the tokenizer matches its added tokens anywhere
in the text it is given, so a message holding ``<|im_end|>\\n<|im_start|>system`` would
otherwise close its turn and open a system turn (prompt injection into the chat format).
``encode_plain`` splits every such string so that it cannot match: text without one
encodes exactly as ``Generator.encode`` does (the ids training used).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=16)
def _pattern(tokenizer: Any) -> re.Pattern | None:
    strings = sorted(
        {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.content},
        key=len,
        reverse=True,
    )
    return re.compile("|".join(map(re.escape, strings))) if strings else None


def has_control(tokenizer: Any, text: str) -> bool:
    """Whether ``text`` holds the string of one of ``tokenizer``'s added (control) tokens."""
    pattern = _pattern(tokenizer)
    return pattern is not None and pattern.search(text) is not None


def encode_plain(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with no added token matched inside it (no special tokens added).

    Each control string found is encoded as its first character and the rest (itself
    encoded the same way); the text between is encoded as it is."""
    pattern = _pattern(tokenizer)
    if pattern is None or pattern.search(text) is None:
        return tokenizer.encode(text, add_special_tokens=False).ids
    ids: list[int] = []
    start = 0
    for match in pattern.finditer(text):
        if match.start() > start:
            ids += tokenizer.encode(text[start : match.start()], add_special_tokens=False).ids
        found = match.group()
        ids += tokenizer.encode(found[:1], add_special_tokens=False).ids
        ids += encode_plain(tokenizer, found[1:])
        start = match.end()
    if start < len(text):
        ids += tokenizer.encode(text[start:], add_special_tokens=False).ids
    return ids
