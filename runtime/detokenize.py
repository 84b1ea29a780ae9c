"""Streaming detokenization that never emits half of a UTF-8 character.

Byte-level BPE splits a character such as an emoji or an accented letter over several
tokens; decoding a prefix of them gives U+FFFD. ``tokenizers.decoders.DecodeStream`` does
the incremental decode (a window of recent tokens decoded with and without the newest, as
vLLM and TGI do, emitted once it no longer ends in U+FFFD). ``StreamDecoder`` is a thin
wrapper over it for what DecodeStream lacks: ``flush`` (the held-back tail at the end of a
reply) and dropping the reply's leading space.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class StreamDecoder:
    """Feed token ids one by one; get back the new text once it is complete."""

    def __init__(self, tokenizer: Tokenizer, strip_leading_space: bool = True):
        self.tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._last: list[int] = []  # the ids of the last piece emitted (context for flush)
        self._held: list[int] = []  # ids pushed since then
        self.emitted: list[str] = []
        self._started = not strip_leading_space

    def _emit(self, text: str) -> str:
        if not self._started:
            text = text.lstrip(" ")
            self._started = bool(text)
        if text:
            self.emitted.append(text)
        return text

    def push(self, token_id: int) -> str:
        self._held.append(int(token_id))
        piece = self._stream.step(self.tokenizer, int(token_id))
        if piece is None:
            return ""  # nothing new yet, or a character still incomplete
        self._last, self._held = self._held, []
        return self._emit(piece)

    def flush(self) -> str:
        """Whatever is held back (an incomplete character comes out as U+FFFD)."""
        if not self._held:
            return ""
        before = self.tokenizer.decode(self._last, skip_special_tokens=True)
        after = self.tokenizer.decode(self._last + self._held, skip_special_tokens=True)
        self._stream = DecodeStream(skip_special_tokens=True)
        self._last, self._held = [], []
        return self._emit(after[len(before) :]) if len(after) > len(before) else ""

    @property
    def text(self) -> str:
        return "".join(self.emitted)
