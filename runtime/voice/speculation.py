"""The draft: a voice session's reply generated *held* before the user's turn is over.

Once the partial transcript is a whole command (the endpoint policy's ``p`` >= 0.5) and has
not changed for ``draft_stable_ms`` of audio, while the user is still speaking
(``draft_while_speaking``; at once for a *closed* command, one the grammar allows nothing
after: its endpoint comes only ``closed_silence_ms`` after the speech), or after
``speculate_after_ms`` of silence (one window for a whole command), the reply to it is
started held: text and first audio ready, nothing sent. When the partial changes, the
draft is rolled back (discarded) and the next one drafted. At
the endpoint, a draft made for exactly the final transcript, on the same prompt (no turn was
added meanwhile), is released with the endpoint's times and its audio goes out at once;
any other is discarded. Greedy decoding makes the draft the very reply the final transcript
would get, so the generation moves out of the wait that follows the end of speech.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moe2edge.runtime.voice.reply import Reply, TurnTimes
from moe2edge.runtime.voice.settings import VoiceSettings
from moe2edge.runtime.voice.vad import WINDOW_MS

MakeReply = Callable[[str, TurnTimes, bool], "Reply | None"]  # (transcript, times, held)


class Speculation:
    """The session's current draft (used from its input thread only)."""

    def __init__(self, make_reply: MakeReply, metrics: Any = None) -> None:
        self.make_reply, self.metrics = make_reply, metrics
        self.draft: Reply | None = None

    def consider(
        self,
        partial: str,
        s: VoiceSettings,
        whole: bool,
        silence_ms: float,
        stable_ms: float,
        closed: bool = False,
    ) -> None:
        """After each frame of an utterance: draft the reply to ``partial`` when it is time
        (module docstring), roll a draft of an older partial back. ``silence_ms``: the silence
        so far (0 while speaking); ``stable_ms``: audio since the partial last changed;
        ``closed``: the grammar allows nothing after ``partial``."""
        if not s.speculate or not partial:
            return
        if not silence_ms:  # still speaking
            ready = whole and (closed or stable_ms >= s.draft_stable_ms)
            if not (s.draft_while_speaking and ready):
                if self.draft is not None and self.draft.transcript != partial:
                    self.drop()  # the transcript changed: roll the draft back
                return
        elif silence_ms < (min(s.speculate_after_ms, WINDOW_MS) if whole else s.speculate_after_ms):
            return
        if self.draft is not None and self.draft.transcript == partial:
            return
        self.drop()
        self.draft = self.make_reply(partial, TurnTimes(), True)
        if self.draft is not None:
            self.draft.start()

    def drop(self, outcome: str | None = "discarded") -> None:
        """Discard the draft (``outcome``: its metrics label; None: not counted)."""
        if self.draft is not None:
            self.draft.discard()
            if self.metrics is not None and outcome is not None:
                self.metrics.speculation.labels(outcome).inc()
            self.draft = None

    def take(
        self, transcript: str, prompt_of: Callable[[str], list[int]], times: TurnTimes
    ) -> Reply | None:
        """At the endpoint: the draft, released with the endpoint's ``times``, when it was
        made for ``transcript`` on its prompt now (``prompt_of(transcript)``: no turn was
        added meanwhile); else None (a draft is discarded)."""
        draft, self.draft = self.draft, None
        if draft is None:
            return None
        usable = (
            draft.transcript == transcript
            and draft.error is None
            and draft.prompt_ids == prompt_of(transcript)
        )
        if self.metrics is not None:
            self.metrics.speculation.labels("used" if usable else "missed").inc()
        if not usable:
            draft.discard()
            return None
        t = draft.times
        t.last_voiced, t.endpoint = times.last_voiced, times.endpoint
        t.final_transcript = times.final_transcript
        t.audio_end_ms, t.endpoint_ms = times.audio_end_ms, times.endpoint_ms
        t.extra.update(times.extra, drafted=True)
        draft.release()
        return draft
