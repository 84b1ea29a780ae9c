"""The service's settings: one flat pydantic model, from YAML and ``key=value`` overrides.

Flat on purpose: every key can be overridden on the command line as ``key=value``
(``moe2edge serve BUNDLE vad_end_silence_ms=250 slots=1``). Every number has a range and
NaN / Infinity are refused; a bad value stops start-up with a message naming the key.
The voice keys share their ranges with a session's ``VoiceSettings``.

The YAML + ``key=value`` loading mirrors ``distill/config.py`` on purpose: the runtime is
the leaf package and may not import ``distill`` (which needs torch), so the small loader
is kept here rather than shared.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moe2edge.runtime.errors import RuntimeUserError
from moe2edge.runtime.voice.settings import (
    MAX_NEW_TOKENS,
    AudioChunkMs,
    AudioLeadMs,
    EchoDb,
    EndSilenceMs,
    EnergyOnsetMs,
    HistoryTurns,
    MinSpeechMs,
    PrerollMs,
    SpeculateAfterMs,
    Temperature,
    VadThreshold,
    WakeThreshold,
    WakeTimeoutMs,
    WakeWord,
    describe_errors,
)

VersionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
VersionWeight = Annotated[float, Field(ge=0, le=1e6)]


class VersionSpec(BaseModel):
    """One more bundle the service serves beside the main one (docs/service.md, versions)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: VersionName
    bundle: str = Field(min_length=1)
    weight: VersionWeight = 1.0


def parse_version(text: str) -> dict[str, Any]:
    """``NAME=DIR[:WEIGHT]`` (``serve --version``) as a ``VersionSpec``'s fields."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise RuntimeUserError(f"bad version {text!r}: use NAME=DIR or NAME=DIR:WEIGHT")
    bundle, colon, weight = rest.rpartition(":")
    if colon and bundle:
        try:
            return {"name": name, "bundle": bundle, "weight": float(weight)}
        except ValueError:
            pass  # a ':' in the path
    return {"name": name, "bundle": rest}


class ServerConfig(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        allow_inf_nan=False,
        coerce_numbers_to_str=True,  # `token: 1234` in YAML is the string "1234"
    )

    # where and who
    host: str = Field("127.0.0.1", min_length=1)  # loopback unless told otherwise
    port: int = Field(8000, ge=0, le=65535)
    token: str | None = None  # bearer token; None: no authentication
    model_name: str | None = None  # the id /v1/models reports (default: the bundle's folder name)
    cors_origins: list[str] = Field(default_factory=list)  # empty: no CORS (closed)
    # web origins that may open the voice WebSocket besides the page's own ("*": any)
    ws_origins: list[str] = Field(default_factory=list)
    ws_query_token: bool = False  # UNSAFE: also take ?token= on the WebSocket (it gets logged)
    rate_limit_rps: float = Field(20.0, ge=0, le=1e6)  # per client address, on /v1/; 0: off
    rate_limit_burst: int = Field(60, ge=1, le=1 << 20)  # requests a client may send at once
    # engine
    device: Literal["cpu", "cuda", "tensorrt", "tensorrt-native"] = "cpu"
    threads: int = Field(1, ge=1, le=256)  # ORT intra-op threads per session (1: batch-1, 2 cores)
    # speculative decoding (runtime/speculative.py) and prefix reuse (runtime/prefix_cache.py)
    speculative_decoding: Literal["off", "ngram", "draft"] = "off"
    draft_bundle: str | None = None  # the draft bundle's directory (speculative_decoding=draft)
    max_draft_tokens: int = Field(8, ge=1, le=64)
    prefix_cache_mb: float = Field(128.0, ge=0, le=1 << 20)  # KV kept for reuse; 0: off
    # limits
    max_body_bytes: int = Field(256 * 1024, ge=1024, le=1 << 30)  # larger bodies get 413
    max_prompt_tokens: int | None = Field(None, ge=1, le=1 << 20)  # None: the context minus one
    max_new_tokens_limit: int = Field(512, ge=1, le=1 << 20)  # the most any request may ask for
    slots: int = Field(2, ge=1, le=1024)  # generations running at once (rows of the batch)
    prefill_chunk: int = Field(64, ge=1, le=1 << 16)  # prompt tokens per batching-loop step
    queue: int = Field(8, ge=0, le=1 << 16)  # waiting for a slot; beyond that 429 + Retry-After
    retry_after_s: float = Field(1.0, ge=0, le=3600)  # the smallest Retry-After given
    # voice
    voice_enabled: bool = True
    max_voice_sessions: int = Field(4, ge=1, le=1024)
    max_ws_message_bytes: int = Field(64 * 1024, ge=1024, le=16 << 20)  # larger: error event
    recognizer: str = "pocketsphinx"
    recognizer_options: dict[str, Any] = Field(default_factory=dict)
    grammar: str | None = None  # JSGF file for the recognizer (strongly recommended)
    tts: Literal["auto", "espeak", "piper"] = "auto"  # auto: Piper when installed, else espeak
    tts_voice: str = Field("en-us", min_length=1)  # espeak-ng voice
    tts_speed_wpm: int = Field(175, ge=80, le=500)
    piper_model: str | None = None  # voice.onnx (+ .onnx.json); None: the packaged joe voice
    vad_threshold: VadThreshold = 0.5
    vad_min_speech_ms: MinSpeechMs = 96.0
    vad_end_silence_ms: EndSilenceMs = 300.0  # the endpoint setting: silence that ends a turn
    preroll_ms: PrerollMs = 300.0
    barge_in: bool = True
    barge_in_min_speech_ms: MinSpeechMs = 64.0  # speech that starts a turn while a reply plays
    barge_in_energy_ms: EnergyOnsetMs = 40.0  # ... or loud audio this long (0: off)
    barge_in_echo_db: EchoDb | None = -24.0  # the reply's echo bound in the mic (None: no test)
    speculate: bool = True  # draft the reply during the end-of-turn silence
    speculate_after_ms: SpeculateAfterMs = 96.0  # silence before the draft starts
    draft_while_speaking: bool = True  # also draft once a whole command's partial is stable
    early_silence: bool = True  # predictive: count silence from the drop in energy
    audio_chunk_ms: AudioChunkMs = 100.0
    audio_lead_ms: AudioLeadMs = 300.0  # how far audio is sent ahead of real-time playback
    voice_max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)  # None: the bundle's
    voice_temperature: Temperature = 0.0
    speak_brackets: bool = False  # False: [action tags] are shown but not spoken
    voice_history_turns: HistoryTurns = 4  # finished turns a voice prompt includes (0: none)
    # versions (runtime/server/versions.py): the main bundle plus more, by a weighted split
    version_name: VersionName | None = None  # the main bundle's version (default: model id)
    version_weight: VersionWeight = 1.0  # the main bundle's share of the split
    versions: list[VersionSpec] = Field(default_factory=list)  # serve --version NAME=DIR:W
    wake_word: WakeWord | None = None  # e.g. "hey robot": speech is ignored until it is heard
    wake_threshold: WakeThreshold = 1e-40  # kws_threshold, tuned: runtime/voice/settings.py
    wake_timeout_ms: WakeTimeoutMs = 5000.0  # after the phrase, how long the command may wait
    # actions in the voice path (runtime/server/voice_actions.py, docs/voice-protocol.md)
    voice_tools: str | None = None  # JSON file: the tools a voice session has by default
    action_webhook_url: str | None = None  # each validated action is POSTed here; None: off
    action_webhook_timeout_ms: float = Field(1000.0, ge=10, le=60_000)
    action_failed_reply: str = Field("Sorry, I could not do that.", max_length=200)  # "": silent

    @model_validator(mode="after")
    def _files(self) -> ServerConfig:
        if self.piper_model and not Path(self.piper_model).is_file():
            raise ValueError(f"piper_model file {self.piper_model} does not exist")
        if self.voice_tools and not Path(self.voice_tools).is_file():
            raise ValueError(f"voice_tools file {self.voice_tools} does not exist")
        url = self.action_webhook_url
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError(f"action_webhook_url {url!r} must be an http:// or https:// URL")
        if self.grammar and not Path(self.grammar).is_file():
            raise ValueError(f"grammar file {self.grammar} does not exist")
        if self.speculative_decoding == "draft" and not self.draft_bundle:
            raise ValueError(
                "speculative_decoding=draft needs draft_bundle=DIR (serve --draft DIR)"
            )
        if self.draft_bundle and not (Path(self.draft_bundle) / "manifest.json").is_file():
            raise ValueError(f"draft_bundle {self.draft_bundle} holds no manifest.json")
        names = [v.name for v in self.versions]
        if self.version_name is not None:
            names.append(self.version_name)
        if len(set(names)) != len(names):
            raise ValueError(f"version names must be unique (versions, version_name): {names}")
        for v in self.versions:
            if not (Path(v.bundle) / "manifest.json").is_file():
                raise ValueError(f"version {v.name}: bundle {v.bundle} holds no manifest.json")
        if self.versions and self.version_weight + sum(v.weight for v in self.versions) <= 0:
            raise ValueError("the version weights (version_weight, versions) sum to 0")
        return self


def speculation_config(config: ServerConfig):
    """The server config's speculative decoding settings as a ``SpeculationConfig``."""
    from moe2edge.runtime.speculative import SpeculationConfig

    return SpeculationConfig(
        method=config.speculative_decoding,
        draft_bundle=config.draft_bundle,
        max_draft_tokens=config.max_draft_tokens,
        initial_draft_tokens=min(4, config.max_draft_tokens),
    )


def _override_value(key: str, raw: str) -> Any:
    """A ``key=value`` string as the value to validate: None for none/null where the key
    takes None, YAML for lists and mappings, else the string (pydantic reads "8" as 8
    and "off" as False, and names what it cannot read)."""
    annotation = ServerConfig.model_fields[key].annotation
    args = typing.get_args(annotation)
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    if raw.lower() in ("none", "null") and union and type(None) in args:
        return None
    inner = next((a for a in args if a is not type(None)), annotation) if union else annotation
    if typing.get_origin(inner) in (list, dict):
        try:
            return yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise RuntimeUserError(f"bad value for {key}: not YAML ({exc})") from None
    return raw


def load_server_config(
    path: str | Path | None = None, overrides: list[str] = (), **values: Any
) -> ServerConfig:
    """YAML file (optional), then ``values`` (from CLI flags), then ``key=value`` overrides."""
    merged: dict[str, Any] = {}
    fields = sorted(ServerConfig.model_fields)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RuntimeUserError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise RuntimeUserError(f"{path} must hold a YAML mapping of config keys")
        unknown = sorted(set(loaded) - set(fields))
        if unknown:
            raise RuntimeUserError(f"unknown keys {unknown} in {path}; valid: {fields}")
        merged.update(loaded)
    merged.update({k: v for k, v in values.items() if v is not None})
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            raise RuntimeUserError(
                f"bad override {item!r}: use key=value with a key among {fields}"
            )
        merged[key] = _override_value(key, raw)
    try:
        return ServerConfig(**merged)
    except ValidationError as exc:
        where = f" (config {path})" if path is not None else ""
        message = describe_errors(exc.errors(), prefix="bad value for ")
        raise RuntimeUserError(message + where) from None
