"""The end of the utterance being heard, decided after every frame: the silence after the
speech, which hypothesis becomes the partial in it, and the endpoint policy's verdict.

The policy (runtime/voice/endpoint.py) says how much silence a transcript needs; this
module measures that silence and picks the transcript:

- Silence is counted from Silero's last voiced window, or (``early_silence``, predictive)
  from the drop in energy once Silero's latest window is below its onset threshold; for a
  *closed* command (the grammar allows nothing after it) from the drop in energy whatever
  Silero says, since nothing more the user says can change the transcript.
- At the first silent window (32 ms) the recognizer's current hypothesis becomes the
  partial (later hypotheses are not taken: a recognizer constrained by a grammar may match
  words to the silence, e.g. "... fan and"), or earlier, once the energy is quiet, when
  that hypothesis is a closed command.
- The policy is asked on every frame (the energy is measured every 8 ms), not only when
  Silero judges a window (every 32 ms).
"""

from __future__ import annotations

from typing import Any

from moe2edge.runtime.voice.audio import SAMPLE_RATE
from moe2edge.runtime.voice.endpoint import EndpointPolicy, TurnEndScorer
from moe2edge.runtime.voice.settings import VoiceSettings
from moe2edge.runtime.voice.vad import WINDOW_MS, WINDOW_SAMPLES, VoiceActivityDetector


def endpoint_policy(
    settings: VoiceSettings, recognizer: Any, scorer: TurnEndScorer | None = None
) -> EndpointPolicy:
    """The endpoint policy of ``settings``, with the recognizer's grammar as its signal."""
    s = settings
    return EndpointPolicy(
        s.endpointing,
        end_silence_ms=s.end_silence_ms,
        complete_silence_ms=s.complete_silence_ms,
        incomplete_silence_ms=max(s.incomplete_silence_ms, s.complete_silence_ms),
        is_complete=getattr(recognizer, "is_complete", None),
        closed_silence_ms=min(s.closed_silence_ms, s.complete_silence_ms),
        can_continue=getattr(recognizer, "can_continue", None),
        scorer=scorer,
        scorer_weight=s.turn_end_weight,
    )


class TurnEnd:
    """The silence after the speech of one utterance, and whether it ends the turn."""

    def __init__(
        self,
        vad: VoiceActivityDetector,
        recognizer: Any,
        endpoint: EndpointPolicy,
        early_silence: bool = True,
    ) -> None:
        self.vad, self.recognizer = vad, recognizer
        self.configure(endpoint, early_silence)
        self.restart()

    def configure(self, endpoint: EndpointPolicy, early_silence: bool) -> None:
        """A new policy; the VAD keeps its longest wait as its own end-of-speech backstop."""
        self.endpoint, self.early_silence = endpoint, early_silence
        self.vad.end_silence_samples = int(endpoint.max_wait_ms * SAMPLE_RATE / 1000)

    def restart(self) -> None:
        """The VAD was reset: its window count starts again."""
        self._judged = 0  # VAD windows judged when last counted
        self.new_utterance()

    def new_utterance(self) -> None:
        self.silent_windows = 0  # the trailing run of silent VAD windows
        self.hypothesis_taken = False  # in this silence, the hypothesis became the partial

    @property
    def in_silence(self) -> bool:
        """Whether words the recognizer "hears" now are noise (not taken as the partial)."""
        return bool(self.silent_windows or self.hypothesis_taken)

    def silence_ms(self, closed: bool = False) -> float:
        """The silence the endpoint counts (module docstring)."""
        if self.early_silence and self.endpoint.mode == "predictive":
            return self.vad.energy_silence_ms() if closed else self.vad.early_silence_ms()
        return self.vad.silence_ms

    def count(self) -> bool:
        """After the VAD was fed a frame: count silent windows; True on a new window."""
        judged = self.vad.samples_seen // WINDOW_SAMPLES
        if judged <= self._judged:
            return False
        quiet = self.silence_ms() >= WINDOW_MS
        self.silent_windows = self.silent_windows + judged - self._judged if quiet else 0
        self._judged = judged
        return True

    def hypothesis_to_take(self, partial: str, at_window: bool) -> str | None:
        """The recognizer's hypothesis, when it is to become the partial now (else None)."""
        quiet = self.silence_ms(closed=True) >= WINDOW_MS
        if not (quiet or self.silent_windows):
            self.hypothesis_taken = False  # speech: the next silence takes one again
        hypothesis = getattr(self.recognizer, "hypothesis", None)
        if hypothesis is None or self.hypothesis_taken:
            return None
        first = at_window and self.silent_windows == 1
        if not (first or (quiet and self.endpoint.can_continue is not None)):
            return None
        text = hypothesis()
        self.hypothesis_taken = first or bool(text and self.endpoint.judge(text).closed)
        if not (self.hypothesis_taken and text) or text == partial:
            return None
        return None if self._tail_matched(partial, text) else text

    def should_end(self, partial: str) -> bool:
        judgement = self.endpoint.judge(partial)
        if not (self.silent_windows or judgement.closed):
            return False
        return self.endpoint.should_end(self.silence_ms(judgement.closed), partial)

    def _tail_matched(self, partial: str, hypothesis: str) -> bool:
        """Whether the words ``hypothesis`` adds to a whole command are the fading end of
        its last word matched as a word ("... in the bedroom" + "and"): the grammar's
        recognizer fits its words to the quiet tail. Such words wait for the final."""
        if not hypothesis.startswith(partial + " "):
            return False
        return bool(self.endpoint.judge(partial).complete) and not bool(
            self.endpoint.judge(hypothesis).complete
        )
