"""The voice pipeline of one conversation: VAD -> streaming ASR -> incremental prefill ->
generation -> streaming TTS -> audio out, with barge-in and per-turn latency accounting.

Audio (16 kHz mono PCM16) is pushed from any thread and processed in order on the
session's own input thread:

- Silero VAD judges each 32 ms window; ``speech_start`` opens an utterance (the recognizer
  gets a pre-roll of the audio before the decision). The endpoint closes it: the silence
  is measured and the partial chosen in it by runtime/voice/turn_end.py, and the policy
  (runtime/voice/endpoint.py) says how much silence the partial needs.
- The recognizer decodes as audio arrives; each partial transcript's stable words (all
  but the last) are prefilled into the conversation's KV cache (``VoiceConversation``,
  runtime/voice/history.py), after the last ``history_turns`` turns.
- Draft (runtime/voice/speculation.py): the reply to a whole command's partial is generated
  *held* while the user still speaks or in the silence after, rolled back when the partial
  changes, and released at the endpoint if the final transcript is the same.
- Barge-in: speech that starts while a reply is being sent cancels its generation and
  synthesis (``response.done`` with status ``cancelled``, reason ``turn_detected``); while a
  reply plays, ``barge_in_min_speech_ms`` of speech is enough to start a turn, or
  ``barge_in_energy_ms`` of loud audio; neither counts where the microphone is no louder
  than the reply's own echo could be (``barge_in_echo_db``, runtime/voice/echo.py). The reply's
  turn is remembered as heard: its text through the last word played by then (audio is
  played in real time from its first chunk), announced as ``conversation.item.truncated``;
  a client that knows better sends ``conversation.item.truncate`` with ``audio_end_ms``
  (OpenAI Realtime's semantics) and the history and KV cache are cut back to match.
- History (``TurnMemory``): once a sent reply is done (if it said anything), its turn joins
  the history the next prompts are rendered after; a reply started before that does not
  include it.

Events (dicts shaped like the OpenAI Realtime API's server events, see
docs/voice-protocol.md) go to ``emit``, which must be thread-safe.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from moe2edge.runtime.generate import Generator
from moe2edge.runtime.session import Conversation, common_prefix_len
from moe2edge.runtime.voice.asr import Recognizer
from moe2edge.runtime.voice.audio import SAMPLE_RATE, ms_to_samples, validate_frame
from moe2edge.runtime.voice.echo import echo_level
from moe2edge.runtime.voice.endpoint import EndpointPolicy, StudentTurnEndScorer, TurnEndScorer
from moe2edge.runtime.voice.history import TurnMemory, VoiceConversation
from moe2edge.runtime.voice.reply import Emit, Reply, TurnTimes, error_event, new_id
from moe2edge.runtime.voice.settings import VoiceSettings
from moe2edge.runtime.voice.speculation import Speculation
from moe2edge.runtime.voice.stream import Preroll, StreamClock
from moe2edge.runtime.voice.tts import Synthesizer
from moe2edge.runtime.voice.turn_end import TurnEnd, endpoint_policy
from moe2edge.runtime.voice.vad import (
    SPEECH_START,
    WINDOW_MS,
    VadEvent,
    VoiceActivityDetector,
)
from moe2edge.runtime.voice.wake import WakeGate

log = logging.getLogger(__name__)


class VoiceSession:
    """One conversation's voice pipeline (see the module docstring)."""

    def __init__(
        self,
        generator: Generator,
        recognizer: Recognizer,
        synthesizer: Synthesizer,
        emit: Emit,
        settings: VoiceSettings | None = None,
        vad: VoiceActivityDetector | None = None,
        conversation: Conversation | None = None,
        acquire_slot: Callable[[bool], Callable[[], None]] | None = None,
        step_hook: Callable[[], None] | None = None,
        metrics: Any = None,
        turn_end_scorer: TurnEndScorer | None = None,
        actions: Callable[[Reply], Any] | None = None,  # a reply's tool calls (see Reply)
    ) -> None:
        self.generator, self.asr, self.tts = generator, recognizer, synthesizer
        self.emit, self.actions = emit, actions
        self.settings = settings or VoiceSettings()
        self.vad = vad or VoiceActivityDetector(
            threshold=self.settings.vad_threshold,
            min_speech_ms=self.settings.min_speech_ms,
            end_silence_ms=self.settings.end_silence_ms,
        )
        self.prompt = VoiceConversation(generator, self.settings.history_turns, conversation)
        self.memory = TurnMemory(self.prompt, emit)
        self._scorer = turn_end_scorer  # None: the student's own when turn_end_scorer is set
        s = self.settings
        self.turn_end = TurnEnd(self.vad, self.asr, self._endpoint_policy(), s.early_silence)
        self.wake = self._wake_gate(s.wake_word, s.wake_threshold, s.wake_timeout_ms)
        self.acquire_slot, self.step_hook, self.metrics = acquire_slot, step_hook, metrics
        self._inbox: queue.Queue = queue.Queue()
        self.max_backlog = 1500  # queued frames (30 s of 20 ms frames) before frames are refused
        self._thread: threading.Thread | None = None
        self._closed = False
        self._reset_stream()
        self.reply: Reply | None = None  # the reply being sent (released)
        self.speculation = Speculation(self._make_reply, metrics)  # the held draft

    # --- public API (any thread) -----------------------------------------------------------

    def start(self) -> VoiceSession:
        self._thread = threading.Thread(target=self._run, name="voice-input", daemon=True)
        self._thread.start()
        return self

    def push_audio(self, pcm: bytes, arrived_at: float | None = None) -> None:
        """Queue a frame of 16 kHz mono PCM16 (validated here; ValueError names the problem)."""
        validate_frame(pcm, max_ms=self.settings.max_frame_ms)
        if self._inbox.qsize() >= self.max_backlog:
            raise OverflowError(
                f"audio is arriving faster than real time: {self.max_backlog} messages are "
                "waiting; this frame was dropped (send 20 ms frames at the pace they are recorded)"
            )
        self._inbox.put((pcm, arrived_at if arrived_at is not None else time.perf_counter()))

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the input thread, in order with the audio."""
        self._inbox.put(fn)

    def commit(self) -> None:
        self.call(self._commit)

    def clear(self) -> None:
        self.call(self._clear)

    def cancel_reply(self, reason: str = "client_cancelled") -> bool:
        reply = self.reply
        if reply is not None and reply.active:
            reply.cancel(reason)
            return True
        return False

    def update(self, **values: Any) -> None:
        """Change settings now (ValueError for an unknown key); applied on the input thread."""
        probe = VoiceSettings(
            **{f.name: getattr(self.settings, f.name) for f in fields(VoiceSettings)}
        )
        probe.update(**values)  # raises before anything changes
        keys = ("wake_word", "wake_threshold", "wake_timeout_ms")
        gate = self.wake
        if any(k in values for k in keys):  # a bad phrase is refused here, not in the pipeline
            gate = self._wake_gate(probe.wake_word, probe.wake_threshold, probe.wake_timeout_ms)
        self.call(lambda: self._apply(values, gate))

    @staticmethod
    def _wake_gate(phrase: str | None, threshold: float, timeout_ms: float = 5000.0):
        return None if phrase is None else WakeGate(phrase, threshold, timeout_ms)

    def close(self, timeout: float = 2.0) -> None:
        if self._closed:
            return
        self._closed = True
        self.speculation.drop(None)
        if self.reply is not None:
            self.reply.discard()
        self._inbox.put(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def running(self) -> bool:
        """Whether the session's thread is still going (``close`` waits for it a while)."""
        return self._thread is not None and self._thread.is_alive()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until queued audio is processed, no reply is running and its turn is in
        the history (for tests)."""
        if not self._drain(timeout):
            return False
        reply = self.reply
        if reply is not None and not reply.done.wait(timeout):
            return False
        return self._drain(timeout)  # a reply queues its turn's bookkeeping before it is done

    def _drain(self, timeout: float) -> bool:
        done = threading.Event()
        self.call(done.set)
        return done.wait(timeout)

    # --- input thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._inbox.get()
            if item is None:
                break
            try:
                if callable(item):
                    item()
                else:
                    self._process(*item)
            except Exception as exc:  # never let one bad frame end the session
                log.exception("voice pipeline error")
                message = f"the voice pipeline failed on this input: {exc}"
                self.emit(error_event("pipeline_error", message, type="server_error"))
        if self._utterance:
            self.asr.finish()

    def _reset_stream(self) -> None:
        self.clock = StreamClock()
        self.preroll = Preroll(self.settings.preroll_ms)
        self._utterance = False
        self._item_id: str | None = None
        self._partial = ""
        self._partial_sample = 0  # the stream sample at which the partial last changed

    def _apply(self, values: dict[str, Any], gate: WakeGate | None = None) -> None:
        self.settings.update(**values)
        self.wake = gate if self.settings.wake_word is not None else None
        s = self.settings
        self.vad.threshold = s.vad_threshold
        self.vad.off_threshold = max(0.01, s.vad_threshold - 0.15)
        self.preroll.ms = s.preroll_ms
        self.turn_end.configure(self._endpoint_policy(), s.early_silence)
        if s.history_turns != self.prompt.turns.maxlen:
            self.prompt.set_history_turns(s.history_turns)

    def _endpoint_policy(self) -> EndpointPolicy:
        s = self.settings
        scorer = (self._scorer or StudentTurnEndScorer(self.prompt)) if s.turn_end_scorer else None
        return endpoint_policy(s, self.asr, scorer)

    @property
    def endpoint(self) -> EndpointPolicy:
        return self.turn_end.endpoint

    def _process(self, pcm: bytes, arrived_at: float) -> None:
        self.clock.received(len(pcm) // 2, arrived_at)
        if not self.settings.turn_detection:
            if not self._utterance:
                self._open_utterance(None)
            self._feed_asr(pcm)
            return
        s, reply = self.settings, self.reply
        replying = reply is not None and reply.active and s.barge_in
        self.vad.min_speech_samples = ms_to_samples(
            s.barge_in_min_speech_ms if replying else s.min_speech_ms
        )
        # a loud run stops reply audio; before any has played, Silero's rule is enough
        playing = replying and reply.play_start is not None
        self.vad.arm_energy_onset(ms_to_samples(s.barge_in_energy_ms) if playing else 0)
        if reply is not None:  # its echo may still be in the microphone after it is done
            frame_s = len(pcm) / 2 / SAMPLE_RATE
            self.vad.echo_level = echo_level(
                reply.echo, reply.play_start, arrived_at, frame_s, s.barge_in_echo_db
            )
        events = self.vad.feed(pcm)
        new_window = self.turn_end.count()
        if self._utterance:
            self._feed_asr(pcm)
        else:
            self.preroll.append(pcm)
        gate = self.wake
        woke = gate.feed(pcm, self.clock.samples, self._utterance) if gate is not None else None
        for event in events:
            if event.kind == SPEECH_START:
                if gate is None or gate.awake:  # wake mode: only once the phrase was heard
                    self._on_speech_start(event)
            elif self._utterance:
                self._on_speech_end(event)
            elif gate is not None:
                gate.spotter.reset()  # speech without the phrase ended: search afresh
        if woke is not None:
            self._on_wake(woke)
        if self._utterance and self.vad.in_speech:
            text = self.turn_end.hypothesis_to_take(self._partial, new_window)
            if text is not None:
                self._on_partial(text)
            if self.turn_end.should_end(self._partial):
                event = self.vad.end_speech()
                if event is not None:
                    self._on_speech_end(event)
        self._maybe_draft()

    def _on_wake(self, end: int) -> None:
        """The wake word ended at stream sample ``end``: in the middle of speech, the rest
        of it opens the utterance (the command); else the next speech does."""
        self.emit(
            {
                "type": "wake",
                "phrase": self.wake.phrase,
                "audio_end_ms": self.clock.ms(end - self.clock.origin),
            }
        )
        if self.vad.in_speech and not self._utterance:
            self.preroll.replace(self.wake.audio_since(end))
            now = self.clock.samples - self.clock.origin
            start = end - self.clock.origin
            self._on_speech_start(VadEvent(SPEECH_START, start, now, start, 1.0))

    def _feed_asr(self, pcm: bytes) -> None:
        partial = self.asr.feed(pcm)
        if not partial or partial == self._partial:
            return
        if not self.turn_end.in_silence:  # words "heard" in a silence are noise
            self._on_partial(partial)

    def _open_utterance(self, event: VadEvent | None) -> None:
        self._item_id = new_id("item")
        self._partial = ""
        self.turn_end.new_utterance()
        self._prefill("")
        self.asr.start_utterance()
        self._utterance = True
        if event is not None:
            self.emit(
                {
                    "type": "input_audio_buffer.speech_started",
                    "audio_start_ms": self.clock.ms(event.sample),
                    "item_id": self._item_id,
                }
            )

    def _on_speech_start(self, event: VadEvent) -> None:
        self.speculation.drop()
        self._open_utterance(event)  # speech_started goes out before the cancelled reply's done
        reply = self.reply
        if reply is not None and reply.active and self.settings.barge_in:
            reply.cancel("turn_detected")
            if self.metrics is not None:
                self.metrics.barge_ins.inc()
        for frame in self.preroll.take():
            self._feed_asr(frame)

    def _on_partial(self, partial: str) -> None:
        previous, self._partial = self._partial, partial
        self._partial_sample = self.clock.samples
        delta = partial[len(previous) :] if partial.startswith(previous) else partial
        self.emit(
            {
                "type": "conversation.item.input_audio_transcription.delta",
                "item_id": self._item_id,
                "content_index": 0,
                "delta": delta,
                "transcript": partial,
            }
        )
        self._prefill(partial)

    def _prefill(self, partial: str) -> None:
        try:
            self.prompt.prefill_partial(partial, reserve=self.settings.max_new_tokens)
        except Exception:  # e.g. a transcript longer than the context: prefilled at the end
            log.debug("incremental prefill skipped", exc_info=True)

    def _maybe_draft(self) -> None:
        if not (self.settings.speculate and self._utterance and self._partial):
            return
        judgement = self.endpoint.judge(self._partial)
        self.speculation.consider(
            self._partial,
            self.settings,
            whole=judgement.p is not None and judgement.p >= 0.5,  # its reply is likely wanted
            silence_ms=self.turn_end.silent_windows * WINDOW_MS,
            stable_ms=1000 * (self.clock.samples - self._partial_sample) / SAMPLE_RATE,
            closed=judgement.closed,
        )

    def _on_speech_end(self, event: VadEvent | None) -> None:
        times = TurnTimes(endpoint=time.perf_counter())
        judgement = self.endpoint.judge(self._partial)
        times.extra.update(
            endpointing=self.endpoint.mode if event is not None else "commit",
            endpoint_wait_ms=round(judgement.wait_ms, 1),
            endpoint_complete=judgement.complete,
            turn_end_p=judgement.turn_end_p,
        )
        if event is not None:
            times.last_voiced = self.clock.arrival_of(event.sample)
            times.audio_end_ms = self.clock.ms(event.sample)
            times.endpoint_ms = self.clock.ms(event.decided_sample)
        else:  # committed by the client: the last frame received is the end
            times.last_voiced = self.clock.last_arrival or times.endpoint
            times.audio_end_ms = times.endpoint_ms = self.clock.ms(
                self.clock.samples - self.clock.origin
            )
        self.emit(
            {
                "type": "input_audio_buffer.speech_stopped",
                "audio_end_ms": times.audio_end_ms,
                "endpoint_ms": times.endpoint_ms,
                "item_id": self._item_id,
            }
        )
        transcript = self.asr.finish().strip()
        times.final_transcript = time.perf_counter()
        self._utterance = False
        self.turn_end.new_utterance()
        self.emit(
            {
                "type": "conversation.item.input_audio_transcription.completed",
                "item_id": self._item_id,
                "content_index": 0,
                "transcript": transcript,
            }
        )
        if transcript and self.wake is not None:
            self.wake.close()  # the command was heard: the next one needs the phrase again
        if not transcript:
            self.speculation.drop(None)
            return
        self.reply = self.speculation.take(transcript, self._prompt, times)
        if self.reply is None:
            times.extra["drafted"] = False
            self.reply = self._make_reply(transcript, times, held=False)
            if self.reply is not None:
                self.reply.start()

    def _prompt(self, transcript: str) -> list[int]:
        return self.prompt.prompt(transcript, final=True, reserve=self.settings.max_new_tokens)

    def _make_reply(self, transcript: str, times: TurnTimes, held: bool) -> Reply | None:
        prompt_ids = self._prompt(transcript)
        room = self.generator.engine.max_length - len(prompt_ids)
        if room < 1:
            if not held:
                message = (
                    f"the transcript is {len(prompt_ids)} tokens, more than the model's "
                    f"context of {self.generator.engine.max_length}; speak a shorter request"
                )
                self.emit(error_event("context_length_exceeded", message))
            return None
        conversation = self.prompt.fork()
        options = self.settings.reply_options()
        options.max_new_tokens = min(options.max_new_tokens, room)
        times.extra["prompt_tokens"] = len(prompt_ids)
        times.extra["prefilled_tokens"] = min(
            common_prefix_len(conversation.tokens, prompt_ids), len(prompt_ids) - 1
        )
        return Reply(
            self.generator,
            self.tts,
            self.emit,
            transcript,
            self._item_id or new_id("item"),
            conversation,
            prompt_ids,
            options,
            times,
            held=held,
            acquire_slot=self.acquire_slot,
            step_hook=self.step_hook,
            on_done=self._on_reply_done,
            actions=self.actions,
        )

    def _on_reply_done(self, reply: Reply) -> None:
        """(The reply's speech thread.) A sent reply's turn joins the history."""
        if not reply.released:
            return
        self.call(lambda: self._end_turn(reply))
        if self.metrics is not None:
            self.metrics.voice_turns.labels(reply.status).inc()
            self.metrics.observe_turn(reply.timings)

    def _end_turn(self, reply: Reply) -> None:
        self.memory.end_turn(reply, self._speaking(), self.settings.max_new_tokens)

    def _speaking(self) -> str:
        """The partial transcript of a turn begun meanwhile ("" when none)."""
        return self._partial if self._utterance else ""

    def truncate(self, item_id: str, audio_end_ms: float, emit_error: Callable) -> None:
        """``conversation.item.truncate``: the client played only ``audio_end_ms`` of the
        latest reply; the history (and the KV cache) keep only its words heard by then.
        ``emit_error(code, message, param)`` reports a bad item or time."""
        self.call(
            lambda: self.memory.truncate(
                item_id, audio_end_ms, emit_error, self._speaking(), self.settings.max_new_tokens
            )
        )

    def _commit(self) -> None:
        if self._utterance:
            self.speculation.drop()
            self._on_speech_end(None)
            self.vad.reset()
            self.clock.restart_vad()
            self.turn_end.restart()

    def _clear(self) -> None:
        if self._utterance:
            self.asr.finish()
        self.speculation.drop()
        self.vad.reset()
        self._utterance = False
        self._partial = ""
        self.preroll.take()
        self.clock.restart_vad()
        self.turn_end.restart()
        self.emit({"type": "input_audio_buffer.cleared"})
