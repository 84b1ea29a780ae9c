"""The service's settings: one flat dataclass, from YAML and ``key=value`` overrides.

Flat on purpose: every key can be overridden on the command line as ``key=value``
(``moe2edge serve BUNDLE vad_end_silence_ms=250 slots=1``).

The YAML + ``key=value`` loading mirrors ``distill/config.py`` on purpose: the runtime is
the leaf package and may not import ``distill`` (which needs torch), so the small loader
is kept here rather than shared.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from moe2edge.runtime.errors import RuntimeUserError


@dataclass
class ServerConfig:
    # where and who
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    token: str | None = None  # bearer token; None: no authentication
    model_name: str | None = None  # the id /v1/models reports (default: the bundle's folder name)
    cors_origins: list[str] = dataclasses.field(default_factory=list)
    # engine
    device: str = "cpu"
    threads: int = 1  # ORT intra-op threads per session (1 is fastest for batch-1 on 2 cores)
    # limits
    max_body_bytes: int = 256 * 1024  # larger request bodies get 413
    max_prompt_tokens: int | None = None  # None: the model's context minus one
    max_new_tokens_limit: int = 512  # the most any request may ask for
    slots: int = 2  # generations running at once
    queue: int = 8  # generations waiting for a slot; beyond that 429 with Retry-After
    retry_after_s: float = 1.0  # the smallest Retry-After given
    # voice
    voice_enabled: bool = True
    max_voice_sessions: int = 4
    max_ws_message_bytes: int = 64 * 1024  # larger WebSocket messages get an error event
    recognizer: str = "pocketsphinx"
    recognizer_options: dict = dataclasses.field(default_factory=dict)
    grammar: str | None = None  # JSGF file for the recognizer (strongly recommended)
    tts: str = "espeak"  # "espeak" or "piper"
    tts_voice: str = "en-us"  # espeak-ng voice
    tts_speed_wpm: int = 175
    piper_model: str | None = None  # voice.onnx (with voice.onnx.json beside it) when tts=piper
    vad_threshold: float = 0.5
    vad_min_speech_ms: float = 96.0
    vad_end_silence_ms: float = 300.0  # the endpoint setting: silence that ends a turn
    preroll_ms: float = 300.0
    barge_in: bool = True
    speculate: bool = True  # draft the reply during the end-of-turn silence
    speculate_after_ms: float = 96.0  # silence before the draft starts
    audio_chunk_ms: float = 100.0
    audio_lead_ms: float = 300.0  # how far audio is sent ahead of real-time playback
    voice_max_new_tokens: int | None = None  # None: the bundle's default
    voice_temperature: float = 0.0
    speak_brackets: bool = False  # False: [action tags] are shown but not spoken

    def validate(self) -> None:
        if self.slots < 1 or self.queue < 0:
            raise RuntimeUserError("slots must be >= 1 and queue >= 0")
        if self.max_body_bytes < 1024:
            raise RuntimeUserError("max_body_bytes must be at least 1024")
        if self.vad_end_silence_ms <= 0:
            raise RuntimeUserError("vad_end_silence_ms must be > 0")
        if self.tts not in ("espeak", "piper"):
            raise RuntimeUserError(f"tts must be 'espeak' or 'piper', not {self.tts!r}")
        if self.tts == "piper" and not self.piper_model:
            raise RuntimeUserError("tts=piper needs piper_model=/path/to/voice.onnx")
        if self.grammar and not Path(self.grammar).is_file():
            raise RuntimeUserError(f"grammar file {self.grammar} does not exist")


def _coerce(value: str, annotation: Any) -> Any:
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing))  # from __future__ annotations
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if value.lower() in ("none", "null"):
            return None
        annotation = [a for a in typing.get_args(annotation) if a is not type(None)][0]
    if annotation is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if annotation in (int, float, str):
        return annotation(value)
    return yaml.safe_load(value)


def load_server_config(
    path: str | Path | None = None, overrides: list[str] = (), **values: Any
) -> ServerConfig:
    """YAML file (optional), then ``values`` (from CLI flags), then ``key=value`` overrides."""
    merged: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(ServerConfig)}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RuntimeUserError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise RuntimeUserError(f"{path} must hold a YAML mapping of config keys")
        unknown = sorted(set(loaded) - set(fields))
        if unknown:
            raise RuntimeUserError(f"unknown keys {unknown} in {path}; valid: {sorted(fields)}")
        merged.update(loaded)
    merged.update({k: v for k, v in values.items() if v is not None})
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            raise RuntimeUserError(
                f"bad override {item!r}: use key=value with a key among {sorted(fields)}"
            )
        try:
            merged[key] = _coerce(raw, fields[key].type)
        except ValueError as exc:
            raise RuntimeUserError(f"bad value for {key}: {exc}") from exc
    config = ServerConfig(**merged)
    config.validate()
    return config
