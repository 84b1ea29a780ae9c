"""One spoken reply: incremental prefill, generation, streaming synthesis, paced audio out.

``PromptCache`` keeps the KV cache of the user turn being spoken: the prompt template's
prefix is computed once, the stable words of each partial transcript are appended as they
arrive, and when a later transcript disagrees the cache rolls back to the longest common
prefix (snapshots are cheap: ``KVCache.copy()`` shares the arrays, which ``forward``
replaces rather than changes).

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

from moe2edge.runtime.engine import KVCache
from moe2edge.runtime.generate import GenerationResult, Generator
from moe2edge.runtime.sampling import SamplingParams
from moe2edge.runtime.session import common_prefix_len
from moe2edge.runtime.voice.audio import SAMPLE_RATE, float32_to_pcm16
from moe2edge.runtime.voice.tts import PhraseSplitter, Synthesizer

log = logging.getLogger(__name__)

Emit = Callable[[dict], None]


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


class PromptCache:
    """The KV cache of the user turn being spoken, kept in step with its partial transcripts."""

    def __init__(self, generator: Generator, base: KVCache | None = None) -> None:
        self.generator = generator
        template = generator.prompt_template
        self.prefix_text = template.split("{prompt}")[0] if "{prompt}" in template else None
        if base is None:
            # What the template puts before any transcript, as tokens: the common prefix of
            # a few prompts (the space before the first word may merge into that word).
            prompts = [generator.encode_prompt(w) for w in ("the", "turn", "what", "I", "a", "x")]
            prefix = prompts[0]
            for ids in prompts[1:]:
                prefix = prefix[: common_prefix_len(prefix, ids)]
            base = generator.engine.new_cache()
            if prefix:
                generator.engine.forward(prefix, base)
        self.base = base
        self.empty = generator.engine.new_cache()
        self.prefilled_now = 0  # tokens run by the last sync()
        self.reset()

    def _encode_prefix(self, words: str) -> list[int]:
        g = self.generator
        bos = [g.bos_token_id] if g.bos_token_id is not None else []
        if self.prefix_text is None:
            return bos
        text = self.prefix_text + words
        return bos + (g.tokenizer.encode(text, add_special_tokens=False).ids if text else [])

    def reset(self) -> None:
        self.cache = self.base.copy()
        self._snapshots = [self.empty.copy(), self.base.copy()]

    @property
    def tokens(self) -> list[int]:
        return self.cache.tokens

    def _rollback(self, keep: int) -> None:
        while len(self._snapshots) > 1 and self._snapshots[-1].length > keep:
            self._snapshots.pop()
        self.cache = self._snapshots[-1].copy()

    def sync(self, target: list[int]) -> int:
        """Make the cache hold ``target`` (roll back to the common prefix, run the rest)."""
        lcp = common_prefix_len(self.cache.tokens, target)
        if lcp < self.cache.length:
            self._rollback(lcp)
        todo = target[self.cache.length :]
        if todo:
            self.generator.engine.forward(todo, self.cache)
            self._snapshots.append(self.cache.copy())
        self.prefilled_now = len(todo)
        return len(todo)

    def prefill_partial(self, transcript: str) -> int:
        """Prefill the words of a partial transcript that later audio is unlikely to change
        (all but the last). Returns the number of tokens run."""
        if self.prefix_text is None:
            return 0
        words = transcript.split()[:-1]
        if not words:
            return 0
        target = self._encode_prefix(" ".join(words))
        if len(target) >= self.generator.engine.max_length:
            return 0
        return self.sync(target)

    def prompt_ids(self, transcript: str) -> list[int]:
        return self.generator.encode_prompt(transcript)

    def fork(self, prompt_ids: list[int]) -> tuple[KVCache, list[int]]:
        """A private cache holding the longest usable prefix of ``prompt_ids``, and the rest
        (at least one token, so generation has logits to start from)."""
        lcp = min(common_prefix_len(self.cache.tokens, prompt_ids), len(prompt_ids) - 1)
        if lcp < self.cache.length:
            self._rollback(lcp)
        assert self.cache.tokens == prompt_ids[: self.cache.length]
        return self.cache.copy(), prompt_ids[self.cache.length :]


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
        cache: KVCache,
        prompt_ids: list[int],
        options: ReplyOptions,
        times: TurnTimes,
        held: bool = False,
        acquire_slot: Callable[[bool], Callable[[], None]] | None = None,
        step_hook: Callable[[], None] | None = None,
        on_done: Callable[[Reply], None] | None = None,
    ) -> None:
        self.id = new_id("resp")
        self.generator, self.synthesizer = generator, synthesizer
        self._session_emit = emit
        self.transcript, self.item_id = transcript, item_id
        self.cache, self.prompt_ids = cache, prompt_ids
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
        self._prompt_len = cache.length + len(prompt_ids)
        if not held:
            self.gate.set()
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
        self.cancel_event.set()
        self.gate.set()

    def discard(self) -> None:
        """Drop a draft silently (nothing it produced is sent)."""
        with self._lock:
            self._discarded = True
            self._buffer.clear()
        self.cancel("discarded")

    # --- internals ------------------------------------------------------------------------

    def _emit(self, event: dict) -> None:
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
            obj["output"] = [
                {
                    "id": new_id("item"),
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
            for piece in self.generator.stream(
                self.prompt_ids,
                params,
                cache=self.cache,
                result=self.result,
                step_hook=self.step_hook,
                cancel=self.cancel_event,
            ):
                if self.times.first_token is None:
                    self.times.first_token = time.perf_counter()
                self._emit({"type": "response.text.delta", "response_id": self.id, "delta": piece})
                self._text_q.put(piece)
                if self.cancel_event.is_set():
                    break
        except Exception as exc:  # busy scheduler, context overflow, engine failure
            busy = hasattr(exc, "retry_after_s")
            if self.held:  # a draft that could not run: the normal path will take over
                self.error = "draft_failed"
            else:
                self.error = str(exc)
                self._emit(
                    {
                        "type": "error",
                        "error": {
                            "type": "server_error" if not busy else "rate_limit_error",
                            "code": "server_busy" if busy else "generation_failed",
                            "message": str(exc),
                        },
                    }
                )
            if not busy:
                log.exception("voice reply generation failed")
            self.cancel_event.set()
        finally:
            if release_slot is not None:
                release_slot()
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
                yield phrase, self.synthesizer.synthesize(phrase)
                if first:  # after a short first phrase, the synthesizer's own phrasing
                    first = False
                    splitter.max_words = self.synthesizer.max_words
                    splitter.min_words_at_comma = 3
            if piece is None:
                return

    def _speak(self) -> None:
        chunk = max(1, int(self.options.audio_chunk_ms * SAMPLE_RATE / 1000))
        lead_s = self.options.audio_lead_ms / 1000
        play_start, sent_s = None, 0.0
        try:
            for _phrase, audio in self._chunks():
                pcm = float32_to_pcm16(audio)
                for i in range(0, len(audio), chunk):
                    if play_start is None:
                        self.gate.wait()
                        play_start = time.perf_counter()
                    wait = play_start + sent_s - lead_s - time.perf_counter()
                    if (wait > 0 and self.cancel_event.wait(wait)) or self.cancel_event.is_set():
                        break
                    data = pcm[2 * i : 2 * (i + chunk)]
                    if self.times.first_audio is None:
                        self.times.first_audio = time.perf_counter()
                    self._emit(
                        {
                            "type": "response.audio.delta",
                            "response_id": self.id,
                            "delta": base64.b64encode(data).decode("ascii"),
                        }
                    )
                    sent_s += len(data) / 2 / SAMPLE_RATE
        except Exception as exc:
            log.exception("voice reply synthesis failed")
            self.error = f"speech synthesis failed: {exc}"
            self.cancel_event.set()
        finally:
            self._finish(sent_s)

    def _finish(self, audio_s: float) -> None:
        self.gate.wait()  # a draft is finished only once it is released or discarded
        self._generated.wait()  # the generation thread has stopped and freed its slot
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
        self.done.set()
        if self.on_done is not None:
            self.on_done(self)
