"""Streaming detokenization that never emits half of a UTF-8 character."""

from __future__ import annotations

from tokenizers import Tokenizer


class StreamDecoder:
    """Feed token ids one by one; get back the new text once it is complete.

    Decodes the whole reply so far and emits the new suffix, holding it back while the
    text ends in U+FFFD (a byte-level token that is only part of a character).
    """

    def __init__(self, tokenizer: Tokenizer, strip_leading_space: bool = True):
        self.tokenizer = tokenizer
        self.strip_leading_space = strip_leading_space
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already returned

    def _text(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return text.lstrip(" ") if self.strip_leading_space else text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self._text()
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted :], len(text)
        return new

    def flush(self) -> str:
        text = self._text()
        new, self.emitted = text[self.emitted :], len(text)
        return new

    @property
    def text(self) -> str:
        return self._text()
