"""What every voice session of a service shares: the synthesizer, a pool of recognizers,
the settings from the server config, the default tools and the webhook, and the count of
open sessions (``max_voice_sessions``)."""

from __future__ import annotations

import threading

from moe2edge.runtime.server.state import ServiceState
from moe2edge.runtime.server.voice_actions import VoiceActions
from moe2edge.runtime.voice.asr import make_recognizer
from moe2edge.runtime.voice.settings import MAX_NEW_TOKENS, VoiceSettings
from moe2edge.runtime.voice.tts import Synthesizer
from moe2edge.runtime.voice.voices import make_synthesizer


class VoiceResources:
    """What voice sessions share: the synthesizer and the settings (the KV cache of the
    prompts' common prefix is shared through the engine's ``PrefixStore``)."""

    def __init__(self, state: ServiceState) -> None:
        cfg = self.config = state.config
        self.state = state
        self.synthesizer: Synthesizer = make_synthesizer(
            cfg.tts, cfg.tts_voice, cfg.tts_speed_wpm, cfg.piper_model
        )
        self.sessions = 0
        self._lock = threading.Lock()
        # recognizers of ended sessions, reused: making one takes ~0.4 s of CPU (pocketsphinx
        # with a grammar), each utterance starts afresh (``start_utterance``)
        try:
            self._idle = [self.make_recognizer()]  # fail at start-up (bad grammar), not per call
            self.actions = VoiceActions(cfg, state.generator)  # default tools, the webhook
        except BaseException:
            self._close_synthesizer()  # the pre-started espeak-ng processes
            raise

    def close(self) -> None:
        self._close_synthesizer()
        self.actions.close()

    def _close_synthesizer(self) -> None:
        close = getattr(self.synthesizer, "close", None)
        if close is not None:
            close()

    def make_recognizer(self):
        opts = dict(self.config.recognizer_options)
        if self.config.grammar and self.config.recognizer == "pocketsphinx":
            opts.setdefault("grammar_path", self.config.grammar)
        return make_recognizer(self.config.recognizer, **opts)

    def settings(self) -> VoiceSettings:
        c = self.config
        return VoiceSettings(
            end_silence_ms=c.vad_end_silence_ms,
            vad_threshold=c.vad_threshold,
            min_speech_ms=c.vad_min_speech_ms,
            preroll_ms=c.preroll_ms,
            barge_in=c.barge_in,
            barge_in_min_speech_ms=c.barge_in_min_speech_ms,
            barge_in_energy_ms=c.barge_in_energy_ms,
            barge_in_echo_db=c.barge_in_echo_db,
            speculate=c.speculate,
            speculate_after_ms=c.speculate_after_ms,
            draft_while_speaking=c.draft_while_speaking,
            early_silence=c.early_silence,
            max_new_tokens=c.voice_max_new_tokens
            or min(self.state.generator.default_max_new_tokens, MAX_NEW_TOKENS),
            temperature=c.voice_temperature,
            speak_brackets=c.speak_brackets,
            audio_chunk_ms=c.audio_chunk_ms,
            audio_lead_ms=c.audio_lead_ms,
            history_turns=c.voice_history_turns,
            wake_word=c.wake_word,
            wake_threshold=c.wake_threshold,
            wake_timeout_ms=c.wake_timeout_ms,
        )

    def take_recognizer(self):
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self.make_recognizer()

    def give_back(self, recognizer) -> None:
        """``recognizer`` of a session whose thread has ended, for the next session."""
        with self._lock:
            if len(self._idle) < self.config.max_voice_sessions:
                self._idle.append(recognizer)

    def try_open(self) -> bool:
        with self._lock:
            if self.sessions >= self.config.max_voice_sessions:
                return False
            self.sessions += 1
            return True

    def closed(self) -> None:
        with self._lock:
            self.sessions -= 1
