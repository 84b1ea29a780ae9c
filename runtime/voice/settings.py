"""A voice session's settings and the range of every one of them, checked by pydantic.

A client changes them with ``session.update`` (docs/voice-protocol.md) and the server's
config sets their defaults (``runtime/server/config.py`` uses the same ranges), so one bad
number, a NaN or an Infinity included, is refused with a message naming the setting
instead of reaching the VAD or the decoder.

``VoiceSettings`` is a pydantic *dataclass*: ``dataclasses.fields`` still lists its
settings, and every assignment is validated.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

from moe2edge.runtime.voice.reply import ReplyOptions

# The ranges, shared with ServerConfig. Upper bounds keep a typo from holding a turn open
# for minutes or a reply going on for thousands of tokens.
EndSilenceMs = Annotated[float, Field(gt=0, le=10_000)]
VadThreshold = Annotated[float, Field(gt=0, lt=1)]
MinSpeechMs = Annotated[float, Field(ge=0, le=10_000)]
PrerollMs = Annotated[float, Field(ge=0, le=5_000)]
SpeculateAfterMs = Annotated[float, Field(ge=0, le=10_000)]
MAX_NEW_TOKENS = 4096  # also what max_response_output_tokens="inf" means
MaxNewTokens = Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)]
Temperature = Annotated[float, Field(ge=0, le=2)]
FirstPhraseWords = Annotated[int, Field(ge=1, le=64)]
AudioChunkMs = Annotated[float, Field(ge=10, le=5_000)]
AudioLeadMs = Annotated[float, Field(ge=0, le=10_000)]
MaxFrameMs = Annotated[float, Field(ge=20, le=10_000)]
HistoryTurns = Annotated[int, Field(ge=0, le=64)]
Endpointing = Literal["fixed", "predictive"]
TurnEndWeight = Annotated[float, Field(ge=0, le=1)]
EnergyOnsetMs = Annotated[float, Field(ge=0, le=1_000)]  # 0: off
EchoDb = Annotated[float, Field(ge=-80, le=20)]
WakeWord = Annotated[str, Field(min_length=1, max_length=64)]
WakeThreshold = Annotated[float, Field(ge=1e-80, le=1)]  # pocketsphinx kws_threshold
WakeTimeoutMs = Annotated[float, Field(gt=0, le=60_000)]

STRICT = ConfigDict(validate_assignment=True, allow_inf_nan=False, strict=True, extra="forbid")


@dataclass(config=STRICT)
class VoiceSettings:
    """Per-session settings (a client may change them with ``session.update``)."""

    # the endpoint (runtime/voice/endpoint.py): "fixed" waits end_silence_ms of silence;
    # "predictive" waits complete_silence_ms after a whole command of the grammar (or what
    # the student thinks ends the turn), up to incomplete_silence_ms after a prefix of one
    # (an incomplete_silence_ms below complete_silence_ms counts as complete_silence_ms);
    # closed_silence_ms after a whole command the grammar allows nothing after (capped at
    # complete_silence_ms)
    endpointing: Endpointing = "predictive"
    end_silence_ms: EndSilenceMs = 300.0
    complete_silence_ms: EndSilenceMs = 112.0
    closed_silence_ms: EndSilenceMs = 64.0
    incomplete_silence_ms: EndSilenceMs = 800.0
    # predictive: a whole command's silence counts from the drop in the signal's energy
    # (Silero's probability lags the end of speech by two to three windows; vad.py)
    early_silence: bool = True
    turn_end_scorer: bool = False  # predictive: also ask the student P(end of user turn)
    turn_end_weight: TurnEndWeight = 0.5  # the student's share beside the grammar
    vad_threshold: VadThreshold = 0.5
    min_speech_ms: MinSpeechMs = 96.0
    preroll_ms: PrerollMs = 300.0
    turn_detection: bool = True  # False: the client ends turns with input_audio_buffer.commit
    barge_in: bool = True
    barge_in_min_speech_ms: MinSpeechMs = 64.0  # speech that starts a turn while a reply plays
    # ... or this much loud audio (20 dB over the noise floor; 0: off): Silero does not take a
    # leading /s/ ("stop") for speech until the vowel, 100 ms later. With -30 dB of reply
    # echo in the microphone (bench/barge_in.py --echo-db -30), 40 ms and the echo test at
    # -24 dB stopped replies at p50 53.5 / p95 67.7 ms, missed none of 30 interruptions and
    # cut no reply by its own echo (docs/service.md)
    barge_in_energy_ms: EnergyOnsetMs = 40.0
    # the loudest the reply's own echo can be in the microphone, in dB of the reply's level
    # (after the device's echo cancellation); quieter audio starts no turn (echo.py); None: off
    barge_in_echo_db: EchoDb | None = -24.0
    speculate: bool = True
    speculate_after_ms: SpeculateAfterMs = 96.0
    # draft while the user still speaks once the partial is a whole command and has not
    # changed for draft_stable_ms of audio, at once when it is closed (rolled back when it
    # changes)
    draft_while_speaking: bool = True
    draft_stable_ms: SpeculateAfterMs = 64.0
    max_new_tokens: MaxNewTokens = 64
    temperature: Temperature = 0.0
    speak_brackets: bool = False
    first_phrase_words: FirstPhraseWords = 4
    audio_chunk_ms: AudioChunkMs = 100.0
    audio_lead_ms: AudioLeadMs = 300.0
    max_frame_ms: MaxFrameMs = 1000.0
    history_turns: HistoryTurns = 4  # finished turns later prompts include (0: none)
    # wake mode (runtime/voice/wake.py): speech is ignored until the phrase is spotted; then
    # the rest of that utterance or the next one (within wake_timeout_ms) is the command
    wake_word: WakeWord | None = None  # e.g. "hey robot"; None: every utterance is a turn
    # kws_threshold, tuned by bench/voice.py --sections wake (1e-20..1e-70 on a tuning set of
    # other voices and sentences): 1e-40 has the fewest false wakes of the sweep (1 in 30 min,
    # as 1e-20 and 1e-30) with the best success among them (0.69 at 5 dB, 0.89 at 10 dB);
    # 1e-50 and below wake more in noise but false-wake 3x as often. On the test set it
    # false-woke 10 times per hour (1e-30: 2); no value meets both goals (90% at 5 dB and
    # <= 1 false wake per hour; docs/service.md "Noise and wake word")
    wake_threshold: WakeThreshold = 1e-40
    wake_timeout_ms: WakeTimeoutMs = 5000.0

    def update(self, **values: Any) -> None:
        """Change settings, all or none: ValueError naming each unknown or bad value."""
        known = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown voice setting {unknown[0]!r}; known: {sorted(known)}")
        merged = {name: getattr(self, name) for name in known} | values
        try:
            checked = VoiceSettings(**merged)
        except ValidationError as exc:
            raise ValueError(describe_errors(exc.errors())) from None
        for name in values:
            setattr(self, name, getattr(checked, name))

    def reply_options(self) -> ReplyOptions:
        return ReplyOptions(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            speak_brackets=self.speak_brackets,
            first_phrase_words=self.first_phrase_words,
            audio_chunk_ms=self.audio_chunk_ms,
            audio_lead_ms=self.audio_lead_ms,
        )


def describe_errors(
    errors: list[Mapping[str, Any]], names: Mapping[str, str] | None = None, prefix: str = ""
) -> str:
    """pydantic's error list as one line: ``PREFIX where: what (got VALUE)`` per error.

    ``names`` renames a setting to where the user wrote it (``end_silence_ms`` ->
    ``session.turn_detection.silence_duration_ms``). The value is shown as JSON, so a
    NaN or an Infinity reads as the client sent it.
    """
    parts = []
    for err in errors[:5]:
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if not loc:  # about the whole object (a check across fields)
            parts.append(msg)
            continue
        if names and loc[0] in names:
            loc[0] = names[loc[0]]
        part = f"{prefix}{'.'.join(loc)}: {msg}"
        if "input" in err and err.get("type") not in ("missing", "json_invalid"):
            part += f" (got {_shown(err['input'])})"
        parts.append(part)
    return "; ".join(parts)


def _shown(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
