"""A voice session's settings in the Realtime shapes: ``session.update``'s session object in
(both dialects' audio format fields, turn detection, and our own under ``moe2edge``), the
``session`` object of ``session.created`` / ``session.updated`` out."""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import ValidationError

from moe2edge.runtime.voice.audio import SAMPLE_RATE
from moe2edge.runtime.voice.settings import MAX_NEW_TOKENS, VoiceSettings, describe_errors

ENDPOINTING_OF = {"server_vad": "fixed", "semantic_vad": "predictive"}


def session_view(s: VoiceSettings) -> dict:
    return {
        "object": "realtime.session",
        "input_audio_format": "pcm16",
        "input_audio_sample_rate": SAMPLE_RATE,
        "output_audio_format": "pcm16",
        "output_audio_sample_rate": SAMPLE_RATE,
        "turn_detection": {
            "type": "semantic_vad" if s.endpointing == "predictive" else "server_vad",
            "threshold": s.vad_threshold,
            "silence_duration_ms": s.end_silence_ms,
            "prefix_padding_ms": s.preroll_ms,
        }
        if s.turn_detection
        else None,
        "max_response_output_tokens": s.max_new_tokens,
        "temperature": s.temperature,
        "moe2edge": {
            "endpointing": s.endpointing,
            "complete_silence_ms": s.complete_silence_ms,
            "closed_silence_ms": s.closed_silence_ms,
            "incomplete_silence_ms": s.incomplete_silence_ms,
            "early_silence": s.early_silence,
            "turn_end_scorer": s.turn_end_scorer,
            "barge_in": s.barge_in,
            "barge_in_min_speech_ms": s.barge_in_min_speech_ms,
            "barge_in_energy_ms": s.barge_in_energy_ms,
            "barge_in_echo_db": s.barge_in_echo_db,
            "speculate": s.speculate,
            "speculate_after_ms": s.speculate_after_ms,
            "draft_while_speaking": s.draft_while_speaking,
            "draft_stable_ms": s.draft_stable_ms,
            "min_speech_ms": s.min_speech_ms,
            "audio_lead_ms": s.audio_lead_ms,
            "audio_chunk_ms": s.audio_chunk_ms,
            "speak_brackets": s.speak_brackets,
            "history_turns": s.history_turns,
            "wake_word": s.wake_word,
            "wake_threshold": s.wake_threshold,
            "wake_timeout_ms": s.wake_timeout_ms,
        },
    }


def parse_session_update(session: Any) -> dict[str, Any]:
    """A ``session.update``'s session object -> VoiceSettings changes (ValueError if bad)."""
    if not isinstance(session, dict):
        raise ValueError("session.update needs a 'session' object")
    rate = session.get("input_audio_sample_rate", session.get("sample_rate"))
    fmt = session.get("input_audio_format")
    if isinstance(fmt, dict):  # {"type": "audio/pcm", "rate": 24000} (GA shape)
        rate = fmt.get("rate", rate)
        fmt = fmt.get("type")
    audio_in = session.get("audio") or {}
    for key in ("input", "format"):  # {"audio": {"input": {"format": {...}}}}
        audio_in = audio_in.get(key) if isinstance(audio_in, dict) else None
    if isinstance(audio_in, dict):
        rate = audio_in.get("rate", rate)
        fmt = audio_in.get("type", fmt)
    if fmt is not None and fmt not in ("pcm16", "audio/pcm"):
        raise ValueError(f"input_audio_format {fmt!r} is not supported; send 'pcm16'")
    if rate is not None and rate != SAMPLE_RATE:
        raise ValueError(
            f"input sample rate {rate} Hz is not supported: this server takes {SAMPLE_RATE} Hz "
            "mono PCM16; resample on the client (the web page at / does) and send 16000"
        )
    changes: dict[str, Any] = {}
    where: dict[str, str] = {}  # setting -> where the client wrote it, for error messages

    def take(name: str, value: Any, path: str) -> None:
        changes[name], where[name] = value, path

    if "turn_detection" in session:
        td = session["turn_detection"]
        if td is None:
            take("turn_detection", False, "session.turn_detection")
        elif isinstance(td, dict) and td.get("type", "server_vad") in ENDPOINTING_OF:
            take("turn_detection", True, "session.turn_detection")
            # server_vad: a fixed silence (OpenAI's); semantic_vad: runtime/voice/endpoint.py
            take(
                "endpointing",
                ENDPOINTING_OF[td.get("type", "server_vad")],
                "session.turn_detection.type",
            )
            for key, name in (
                ("silence_duration_ms", "end_silence_ms"),
                ("threshold", "vad_threshold"),
                ("prefix_padding_ms", "preroll_ms"),
            ):
                if key in td:
                    take(name, td[key], f"session.turn_detection.{key}")
        else:
            raise ValueError(
                "turn_detection must be null or {'type': 'server_vad' | 'semantic_vad', ...}"
            )
    if "max_response_output_tokens" in session:
        value = session["max_response_output_tokens"]
        value = MAX_NEW_TOKENS if value == "inf" else value
        take("max_new_tokens", value, "session.max_response_output_tokens")
    if "temperature" in session:
        take("temperature", session["temperature"], "session.temperature")
    extra = session.get("moe2edge") or {}
    if not isinstance(extra, dict):
        raise ValueError("session.moe2edge must be an object of settings")
    known = sorted(f.name for f in dataclasses.fields(VoiceSettings))
    for name, value in extra.items():
        if name not in known:
            raise ValueError(f"unknown setting session.moe2edge.{name}; known: {known}")
        take(name, value, f"session.moe2edge.{name}")
    try:  # each value against its range (no range depends on another setting)
        VoiceSettings(**changes)
    except ValidationError as exc:
        raise ValueError(describe_errors(exc.errors(), where)) from None
    return changes
