"""Streaming detokenization that never emits half of a UTF-8 character.

Byte-level BPE splits a character such as an emoji or an accented letter over several
tokens; decoding a prefix of them gives U+FFFD. ``StreamDecoder`` decodes a small window
of recent tokens twice (with and without the newest ones, as vLLM and TGI do) and emits
the difference only once it no longer ends in U+FFFD. Decoding a window rather than the
whole reply keeps each step O(1) and keeps tokenizers that drop a leading space from the
first token of a decode (SentencePiece's ``▁``) from losing spaces between steps.
"""

from __future__ import annotations

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"


class StreamDecoder:
    """Feed token ids one by one; get back the new text once it is complete."""

    def __init__(self, tokenizer: Tokenizer, strip_leading_space: bool = True):
        self.tokenizer = tokenizer
        self.strip_leading_space = strip_leading_space
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: decoded once already, for context
        self.read_offset = 0  # tokens before this are emitted
        self.emitted: list[str] = []
        self._started = not strip_leading_space

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _emit(self, text: str) -> str:
        if not self._started:
            text = text.lstrip(" ")
            self._started = bool(text)
        if text:
            self.emitted.append(text)
        return text

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""  # nothing new yet, or a character still incomplete
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._emit(after[len(before) :])

    def flush(self) -> str:
        """Whatever is held back (an incomplete character comes out as U+FFFD)."""
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return self._emit(after[len(before) :]) if len(after) > len(before) else ""

    @property
    def text(self) -> str:
        return "".join(self.emitted)
