"""One spoken reply: its generation, its speech and what of it was heard.

``Reply`` runs a generation thread (text deltas, holding a scheduler slot only while it
decodes) and a speech thread (phrases -> audio chunks sent at most ``audio_lead_ms`` ahead
of real-time playback, so a barge-in can still stop what has not been heard). A reply can
start *held*: it drafts text and the first phrase's audio while the user may still be
speaking, emits nothing, and is either released (its events flushed, audio starts at once)
or discarded.
"""

from __future__ import annotations

import base64
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from moe2edge.runtime.generate import GenerationResult, Generator
from moe2edge.runtime.sampling import SamplingParams
from moe2edge.runtime.session import Conversation
from moe2edge.runtime.voice.audio import SAMPLE_RATE, float32_to_pcm16, speech_bounds
from moe2edge.runtime.voice.echo import EchoReference
from moe2edge.runtime.voice.tts import PhraseSplitter, Synthesizer

log = logging.getLogger(__name__)

Emit = Callable[[dict], None]
LEAD_THRESHOLD = 0.005  # the synthesizer's leading silence before this level is cut ...
LEAD_KEEP = 80  # ... but for 5 ms, from the first phrase


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def error_event(
    code: str,
    message: str,
    param: str | None = None,
    event_id: Any = None,
    type: str = "invalid_request_error",
) -> dict:
    """A Realtime ``error`` server event."""
    err = {"type": type, "code": code, "message": message, "param": param}
    if event_id is not None:
        err["event_id"] = event_id
    return {"type": "error", "error": err}


def words_heard(phrases: list[tuple[float, float, str]], audio_end_ms: float) -> int:
    """Words of ``phrases`` ((audio start s, seconds, text) as sent) heard in the first
    ``audio_end_ms`` of audio: a phrase cut short counts its words in proportion."""
    end_s, words = audio_end_ms / 1000, 0
    for start_s, seconds, phrase in phrases:
        n = len(phrase.split())
        if start_s + seconds <= end_s:
            words += n
        elif start_s < end_s:
            words += int(n * (end_s - start_s) / seconds)
    return words


def text_through_words(text: str, words: int, speak_brackets: bool = False) -> str:
    """``text`` through the end of its ``words``-th spoken word (outside ``[...]`` tags
    unless they are spoken); with 0, the tags before the first spoken word."""
    depth, count, in_word = 0, 0, False
    for i, ch in enumerate(text):
        if not speak_brackets and ch in "[]":
            depth = depth + 1 if ch == "[" else max(0, depth - 1)
            if in_word:
                count, in_word = count + 1, False
            continue
        spoken = depth == 0
        if spoken and not ch.isspace():
            if not in_word and count == words:
                return text[:i].rstrip()
            in_word = True
        elif in_word:
            count, in_word = count + 1, False
    return text


class SpeechText:
    """Streamed reply text -> the text to speak: ``[bracketed action tags]`` are dropped."""

    def __init__(self, speak_brackets: bool = False) -> None:
        self.speak_brackets = speak_brackets
        self.depth = 0

    def push(self, text: str) -> str:
        if self.speak_brackets:
            return text
        out = []
        for ch in text:
            if ch == "[":
                self.depth += 1
            elif ch == "]" and self.depth:
                self.depth -= 1
            elif not self.depth:
                out.append(ch)
        return "".join(out)


_CONTENT_EVENTS = (
    "response.text.delta",
    "response.text.done",
    "response.audio.delta",
    "response.audio.done",
)


@dataclass
class ReplyOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0
    speak_brackets: bool = False
    first_phrase_words: int = 4
    audio_chunk_ms: float = 100.0
    audio_lead_ms: float = 300.0


@dataclass
class TurnTimes:
    """perf_counter() instants of one voice turn (None: did not happen)."""

    last_voiced: float | None = None
    endpoint: float | None = None
    final_transcript: float | None = None
    first_token: float | None = None
    first_audio: float | None = None
    audio_end_ms: float | None = None  # stream position of the last voiced sample
    endpoint_ms: float | None = None  # stream position of the endpoint decision
    extra: dict[str, Any] = field(default_factory=dict)

    def as_event(self) -> dict[str, Any]:
        def since(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else round(1000 * (a - b), 2)

        return {
            "audio_end_ms": self.audio_end_ms,
            "endpoint_ms": self.endpoint_ms,
            "endpoint_delay_ms": since(self.endpoint, self.last_voiced),
            "final_transcript_ms": since(self.final_transcript, self.endpoint),
            "first_token_ms": since(self.first_token, self.endpoint),
            "first_audio_ms": since(self.first_audio, self.endpoint),
            "response_latency_ms": since(self.first_audio, self.endpoint),
            "turn_latency_ms": since(self.first_audio, self.last_voiced),
            **self.extra,
        }


class Reply:
    """Generate and speak one reply; see the module docstring."""

    def __init__(
        self,
        generator: Generator,
        synthesizer: Synthesizer,
        emit: Emit,
        transcript: str,
        item_id: str,
        conversation: Conversation,
        prompt_ids: list[int],
        options: ReplyOptions,
        times: TurnTimes,
        held: bool = False,
        acquire_slot: Callable[[bool], Callable[[], None]] | None = None,
        step_hook: Callable[[], None] | None = None,
        on_done: Callable[[Reply], None] | None = None,
        actions: Callable[[Reply], Any] | None = None,
    ) -> None:
        self.id = new_id("resp")
        self.generator, self.synthesizer = generator, synthesizer
        self._session_emit = emit
        self.transcript, self.item_id = transcript, item_id
        self.conversation, self.prompt_ids = conversation, prompt_ids
        self.options, self.times = options, times
        self.held = held
        self.acquire_slot, self.step_hook, self.on_done = acquire_slot, step_hook, on_done
        self.cancel_event = threading.Event()
        self.gate = threading.Event()  # set on release (or cancel, to wake the speaker)
        self.done = threading.Event()
        self.status, self.reason = "in_progress", None
        self.result = GenerationResult()
        self.error: str | None = None
        self._lock = threading.Lock()
        self._released = not held
        self._discarded = False
        self._buffer: list[dict] = []
        self._text_q: queue.Queue[str | None] = queue.Queue()
        self._generated = threading.Event()
        self._prompt_len = len(prompt_ids)
        self.output_item_id = new_id("item")  # the assistant item (conversation.item.truncate)
        # what was sent, for truncation at the audio played: (audio start s, seconds, phrase)
        self.phrases: list[tuple[float, float, str]] = []
        self.play_start: float | None = None  # perf_counter() of the first audio sent
        self.sent_s = 0.0
        self.echo = EchoReference()  # the levels sent, for the barge-in echo test (echo.py)
        self.cancelled_at: float | None = None
        if not held:
            self.gate.set()
        # its tool calls (runtime/server/voice_actions.py): feed/close, settle before speaking
        self.actions = actions(self) if actions is not None else None
        self._emit({"type": "response.created", "response": self._response_obj()})

    # --- control (any thread) -------------------------------------------------------------

    def start(self) -> Reply:
        threading.Thread(target=self._generate, name=f"gen-{self.id}", daemon=True).start()
        threading.Thread(target=self._speak, name=f"tts-{self.id}", daemon=True).start()
        return self

    @property
    def active(self) -> bool:
        return not self.done.is_set()

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """A held draft becomes the reply: flush what it produced, start its audio."""
        with self._lock:
            if self._released or self._discarded:
                return
            self._released = True
            for event in self._buffer:
                self._session_emit(event)
            self._buffer.clear()
        self.gate.set()

    def cancel(self, reason: str = "client_cancelled") -> None:
        if self.done.is_set():
            return
        self.reason = self.reason or reason
        if self.cancelled_at is None:
            self.cancelled_at = time.perf_counter()
        self.cancel_event.set()
        self.gate.set()

    def discard(self) -> None:
        """Drop a draft silently (nothing it produced is sent)."""
        with self._lock:
            self._discarded = True
            self._buffer.clear()
        self.cancel("discarded")

    def played_ms(self, at: float | None = None) -> float:
        """Audio the listener has heard by ``at`` (perf_counter(); default: when the reply
        was cancelled, else now), assuming playback in real time from the first chunk: at
        most what was sent, which runs ``audio_lead_ms`` ahead of playback."""
        if self.play_start is None:
            return 0.0
        at = at if at is not None else (self.cancelled_at or time.perf_counter())
        return round(1000 * max(0.0, min(self.sent_s, at - self.play_start)), 1)

    def heard_text(self, audio_end_ms: float) -> str:
        """The reply's text up to the last word heard in its first ``audio_end_ms`` of audio
        (a phrase being played counts its words in proportion); the action tags before
        the first word are kept: they were carried out."""
        words = words_heard(self.phrases, audio_end_ms)
        return text_through_words(self.result.text, words, self.options.speak_brackets)

    # --- internals ------------------------------------------------------------------------

    def _emit(self, event: dict) -> None:
        if event["type"] in _CONTENT_EVENTS:  # the Realtime schema places them in the message
            calls = len(self.actions.calls) if self.actions is not None else 0  # come first
            event.update(item_id=self.output_item_id, output_index=calls, content_index=0)
        with self._lock:
            if self._discarded:
                return
            if not self._released:
                self._buffer.append(event)
                return
            self._session_emit(event)

    def _response_obj(self, status: str = "in_progress") -> dict[str, Any]:
        obj: dict[str, Any] = {"id": self.id, "object": "realtime.response", "status": status}
        if status != "in_progress":
            obj["status_details"] = (
                {"type": status, "reason": self.reason} if self.reason else {"type": status}
            )
            if self.error:
                obj["status_details"]["error"] = {"message": self.error}
            calls = self.actions.calls if self.actions is not None else []
            obj["output"] = calls + [
                {
                    "id": self.output_item_id,
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "text", "text": self.result.text}],
                }
            ]
            obj["usage"] = {
                "input_tokens": self._prompt_len,
                "output_tokens": len(self.result.token_ids),
            }
        return obj

    def _generate(self) -> None:
        release_slot: Callable[[], None] | None = None
        try:
            if self.acquire_slot is not None:
                release_slot = self.acquire_slot(not self.held)
            params = SamplingParams(
                max_new_tokens=self.options.max_new_tokens, temperature=self.options.temperature
            )
            self.conversation.sync(self.prompt_ids)  # the rest of it: most was prefilled
            actions = self.actions
            for piece in self.conversation.stream(
                params,
                self.result,
                cancel=self.cancel_event,
                step_hook=self.step_hook,
                constraint=actions.constraint if actions is not None else None,
            ):
                if self.times.first_token is None:
                    self.times.first_token = time.perf_counter()
                self._emit({"type": "response.text.delta", "response_id": self.id, "delta": piece})
                if actions is not None and not actions.feed(piece):
                    break  # an invalid action: nothing more is generated or spoken
                self._text_q.put(piece)
                if self.cancel_event.is_set():
                    break
        except Exception as exc:  # busy scheduler, context overflow, engine failure
            busy = hasattr(exc, "retry_after_s")
            if self.held:  # a draft that could not run: the normal path will take over
                self.error = "draft_failed"
            else:
                self.error = str(exc)
                code = "server_busy" if busy else "generation_failed"
                kind = "rate_limit_error" if busy else "server_error"
                self._emit(error_event(code, str(exc), type=kind))
            if not busy:
                log.exception("voice reply generation failed")
            self.cancel_event.set()
        finally:
            if release_slot is not None:
                release_slot()
            if self.actions is not None:  # before the end of the text: calls are known first
                self.actions.close(cancelled=self.cancel_event.is_set())
            self._text_q.put(None)
            self._generated.set()

    def _chunks(self):
        """(phrase, audio) as the text queue completes phrases; stops on cancel."""
        speech = SpeechText(self.options.speak_brackets)
        splitter = PhraseSplitter(
            max_words=min(self.options.first_phrase_words, self.synthesizer.max_words),
            min_words_at_comma=1,
        )
        first = True
        while not self.cancel_event.is_set():
            try:
                piece = self._text_q.get(timeout=0.05)
            except queue.Empty:
                continue
            phrases = splitter.flush() if piece is None else splitter.push(speech.push(piece))
            for phrase in phrases:
                if self.cancel_event.is_set():
                    return
                audio = self.synthesizer.synthesize(phrase)
                if first:  # the reply's first sound goes out with its first sample
                    audio = audio[max(0, speech_bounds(audio, LEAD_THRESHOLD)[0] - LEAD_KEEP) :]
                yield phrase, audio
                if first:  # after a short first phrase, the synthesizer's own phrasing
                    first = False
                    splitter.max_words = self.synthesizer.max_words
                    splitter.min_words_at_comma = 3
            if piece is None:
                return

    def _speak(self) -> None:
        try:
            for phrase, audio in self._chunks():
                if not self._send(phrase, audio):
                    break
            actions = self.actions
            if actions is not None and not self.cancel_event.is_set():
                self.gate.wait()  # an action-only reply: its calls are carried out now
                if not self._discarded and not actions.settle(self.cancel_event):
                    if actions.fallback and not self.cancel_event.is_set():
                        fallback = actions.fallback  # spoken instead of the confirmation
                        self._send(fallback, self.synthesizer.synthesize(fallback), True)
        except Exception as exc:
            log.exception("voice reply synthesis failed")
            self.error = f"speech synthesis failed: {exc}"
            self.cancel_event.set()
        finally:
            self._finish(self.sent_s)

    def _send(self, phrase: str, audio, settled: bool = False) -> bool:
        """Send a phrase's audio in chunks, at most ``audio_lead_ms`` ahead of real-time
        playback. The first waits for the release and for the reply's actions (``settled``:
        already judged). False: stop (cancelled, or an action failed)."""
        chunk = max(1, int(self.options.audio_chunk_ms * SAMPLE_RATE / 1000))
        lead_s = self.options.audio_lead_ms / 1000
        pcm = float32_to_pcm16(audio)
        for i in range(0, len(audio), chunk):
            if self.play_start is None:
                self.gate.wait()
                if not (settled or self.actions is None or self.actions.settle(self.cancel_event)):
                    return False
                self.play_start = time.perf_counter()
            wait = self.play_start + self.sent_s - lead_s - time.perf_counter()
            if (wait > 0 and self.cancel_event.wait(wait)) or self.cancel_event.is_set():
                return False
            data = pcm[2 * i : 2 * (i + chunk)]
            if i == 0:
                self.phrases.append((self.sent_s, len(audio) / SAMPLE_RATE, phrase))
            if self.times.first_audio is None:
                self.times.first_audio = time.perf_counter()
            self._emit(
                {
                    "type": "response.audio.delta",
                    "response_id": self.id,
                    "delta": base64.b64encode(data).decode("ascii"),
                }
            )
            self.sent_s += len(data) / 2 / SAMPLE_RATE
            self.echo.add(audio[i : i + chunk])
        return True

    def _finish(self, audio_s: float) -> None:
        self.gate.wait()  # a draft is finished only once it is released or discarded
        self._generated.wait()  # the generation thread has stopped and freed its slot
        if self.actions is not None and self.actions.problem and not self.error:
            self.error = self.actions.problem  # the reply did not do what it says: failed
        if self.error and self.reason is None:
            self.status = "failed"
        elif self.cancel_event.is_set():
            self.status = "cancelled"
        elif self.result.finish_reason == "length":
            self.status, self.reason = "incomplete", "max_output_tokens"
        else:
            self.status = "completed"
        if self.status in ("completed", "incomplete"):
            self._emit({"type": "response.audio.done", "response_id": self.id})
        self._emit({"type": "response.text.done", "response_id": self.id, "text": self.result.text})
        timings = self.times.as_event()
        timings.update(
            response_id=self.id,
            item_id=self.item_id,
            status=self.status,
            audio_ms=round(1000 * audio_s, 1),
            output_tokens=len(self.result.token_ids),
        )
        self.timings = timings
        self._emit({"type": "turn.timings", **timings})
        self._emit({"type": "response.done", "response": self._response_obj(self.status)})
        if self.on_done is not None:  # before done: its bookkeeping is queued when done is seen
            self.on_done(self)
        self.done.set()
