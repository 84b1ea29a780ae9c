"""What a voice session remembers: its conversation and the turns of its replies as heard.

``VoiceConversation`` is a voice session's conversation: the last ``history_turns`` turns
(user text and reply, rendered with the bundle's chat template by ``render_chat``) and one
``Conversation`` (runtime/session.py, the same mechanism the HTTP API runs on) whose KV
cache is kept in step with the turn being spoken: the stable words of each partial
transcript are prefilled as they arrive, and when a later transcript disagrees the cache
rewinds to the longest common prefix. A reply runs in a ``fork`` of it (storage shared
until written), so a draft can be dropped without touching the session's cache.

``TurnMemory`` adds each sent reply's turn to it once the reply is done: the whole reply,
or after a barge-in only the words played by then (``conversation.item.truncated``); a
client's ``conversation.item.truncate`` cuts the latest one back to what it played.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from moe2edge.runtime.generate import Generator
from moe2edge.runtime.session import Conversation, common_prefix_len, render_chat, user_tokens
from moe2edge.runtime.voice.reply import Emit, Reply

log = logging.getLogger(__name__)


class VoiceConversation:
    """The turns a voice session remembers and the KV cache of its next prompt.

    ``history_turns``: how many finished turns later prompts include (0: none, every
    utterance starts afresh). Older turns are dropped first, and so is any turn that would
    leave less than ``reserve`` positions for the reply. Used from the session's input
    thread only; replies run in forks.
    """

    def __init__(
        self,
        generator: Generator,
        history_turns: int = 4,
        conversation: Conversation | None = None,
    ) -> None:
        self.generator = generator
        self.conversation = conversation or Conversation(generator)  # BOS: the shared prefix
        self.turns: deque[tuple[str, str]] = deque(maxlen=history_turns)
        self._history: list[int] = []
        self._render_history()
        self.prefill_partial("")  # the template's head, before the first word arrives

    @property
    def tokens(self) -> list[int]:
        return self.conversation.tokens

    def set_history_turns(self, turns: int) -> None:
        self.turns = deque(self.turns, maxlen=turns)
        self._render_history()

    def _render_history(self) -> None:
        messages = [m for user, reply in self.turns for m in (("user", user), ("assistant", reply))]
        self._history = render_chat(self.generator, messages)

    def prompt(self, text: str, final: bool = True, reserve: int = 1) -> list[int]:
        """The prompt of the user turn ``text`` after the remembered turns."""
        while True:
            ids = self._history + user_tokens(self.generator, text, final)
            if not self.turns or len(ids) + reserve <= self.generator.engine.max_length:
                return ids
            self.turns.popleft()  # the oldest turn no longer fits beside this one
            self._render_history()

    def prefill_partial(self, transcript: str, reserve: int = 1) -> int:
        """Prefill the words of a partial transcript that later audio is unlikely to change
        (all but the last; none: the history and the template's head). Returns the number
        of tokens run."""
        target = self.prompt(_stable_words(transcript), final=False, reserve=reserve)
        if len(target) >= self.generator.engine.max_length:
            return 0
        return self.conversation.sync(target).tokens

    def fork(self) -> Conversation:
        """A copy of the cache for a reply to run in."""
        return self.conversation.fork()

    def add_turn(
        self,
        user_text: str,
        reply_text: str,
        reply_conversation: Conversation | None = None,
        speaking: str = "",
        reserve: int = 1,
    ) -> int:
        """Remember a finished turn and bring the cache in step with the history and the
        partial transcript ``speaking`` (a turn begun meanwhile). ``reply_conversation`` (the
        fork the reply ran in, idle now) is kept instead when it holds more of the new
        prompt than the session's cache. Returns the number of tokens run."""
        if not self.turns.maxlen:
            return 0
        self.turns.append((user_text, reply_text))
        self._render_history()
        if reply_conversation is not None:
            target = self.prompt(_stable_words(speaking), final=False, reserve=reserve)
            if common_prefix_len(reply_conversation.tokens, target) > common_prefix_len(
                self.conversation.tokens, target
            ):
                self.conversation = reply_conversation
        return self.prefill_partial(speaking, reserve)

    def replace_last_reply(self, reply_text: str, speaking: str = "", reserve: int = 1) -> int:
        """The latest turn's reply becomes ``reply_text`` (what the listener heard); the
        cache rewinds to the common prefix and the new prompt is prefilled."""
        if not self.turns:
            return 0
        user_text, _ = self.turns[-1]
        self.turns[-1] = (user_text, reply_text)
        self._render_history()
        return self.prefill_partial(speaking, reserve)


def _stable_words(transcript: str) -> str:
    """A partial transcript's words but the last (which later audio may still change)."""
    return " ".join(transcript.split()[:-1])


class TurnMemory:
    """The turns of a session's replies, as heard, in its ``VoiceConversation``. Used from
    the session's input thread only; ``speaking`` is the partial transcript of a turn begun
    meanwhile, ``reserve`` the positions kept free for a reply."""

    def __init__(self, prompt: VoiceConversation, emit: Emit) -> None:
        self.prompt, self.emit = prompt, emit
        self.last_reply: Reply | None = None  # the latest reply whose turn is remembered

    def end_turn(self, reply: Reply, speaking: str, reserve: int) -> None:
        if reply.error is not None or not reply.result.token_ids:
            return  # it said nothing: the turn is not remembered
        text = reply.result.text
        if reply.status == "cancelled":  # barge-in or response.cancel: keep what was heard
            played = reply.played_ms()
            text = reply.heard_text(played)
            self._truncated(reply, played)
            if not text:
                return  # nothing was heard: the turn is not remembered
        self.last_reply = reply
        try:
            self.prompt.add_turn(
                reply.transcript, text, reply.conversation, speaking=speaking, reserve=reserve
            )
        except Exception:  # the next prompt is prefilled when it comes
            log.debug("prefill of the history skipped", exc_info=True)

    def _truncated(self, reply: Reply, audio_end_ms: float) -> None:
        self.emit(
            {
                "type": "conversation.item.truncated",
                "item_id": reply.output_item_id,
                "content_index": 0,
                "audio_end_ms": audio_end_ms,
            }
        )

    def truncate(
        self,
        item_id: str,
        audio_end_ms: float,
        emit_error: Callable,
        speaking: str = "",
        reserve: int = 1,
    ) -> None:
        """The client played only ``audio_end_ms`` of reply ``item_id`` (the latest)."""
        reply = self.last_reply
        if reply is None or reply.output_item_id != item_id:
            emit_error(
                "item_truncate_invalid_item_id",
                f"no assistant item {item_id!r} to truncate: only the latest reply "
                f"({reply.output_item_id if reply else 'none yet'}) can be truncated",
                "item_id",
            )
            return
        sent_ms = round(1000 * reply.sent_s, 1)
        if audio_end_ms > sent_ms:
            emit_error(
                "invalid_audio_end_ms",
                f"audio_end_ms {audio_end_ms} is past the {sent_ms} ms of audio sent for "
                f"item {item_id}",
                "audio_end_ms",
            )
            return
        self.prompt.replace_last_reply(
            reply.heard_text(audio_end_ms), speaking=speaking, reserve=reserve
        )
        self._truncated(reply, audio_end_ms)
