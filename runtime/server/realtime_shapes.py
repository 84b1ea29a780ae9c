"""Our voice events in the shapes the OpenAI Realtime schema types them (docs/voice-protocol.md,
"OpenAI's client").

Two dialects per connection. Both: stream positions (``audio_start_ms``, ``audio_end_ms``)
as integers and a ``usage`` on the final transcript, as both schemas require. ``ga``
(switched on by a ``session.update`` whose session has ``"type": "realtime"``, the field the
GA schema requires and the beta one lacks): the GA names of the reply's content events
(``response.output_text.delta`` for ``response.text.delta``, ...), ``output_text`` content
parts, ``session.type``, and ``session.audio.input.turn_detection`` read as
``session.turn_detection``. Events of ours (``turn.timings``, ``wake``) pass unchanged;
``input_audio_buffer.committed`` names the utterance it ended (none: a commit of nothing).
"""

from __future__ import annotations

from typing import Any

GA_NAMES = {
    "response.text.delta": "response.output_text.delta",
    "response.text.done": "response.output_text.done",
    "response.audio.delta": "response.output_audio.delta",
    "response.audio.done": "response.output_audio.done",
}
_INT_MS = {
    "input_audio_buffer.speech_started": ("audio_start_ms",),
    "input_audio_buffer.speech_stopped": ("audio_end_ms", "endpoint_ms"),
    "conversation.item.truncated": ("audio_end_ms",),
}


class RealtimeShapes:
    """One connection's dialect: ``incoming`` sees each client event, ``outgoing`` rewrites
    each server event just before it is sent."""

    def __init__(self) -> None:
        self.ga = False
        self._spoken: dict[str, list[float]] = {}  # item id -> [audio_start_ms, audio_end_ms]
        self._ended: str | None = None  # the latest utterance's item, for its commit
        self._last_end = 0  # stream position where the latest utterance ended (ms)

    def incoming(self, event: dict[str, Any]) -> None:
        session = event.get("session")
        if event.get("type") != "session.update" or not isinstance(session, dict):
            return
        if session.get("type") == "realtime":
            self.ga = True
        audio = session.get("audio")
        audio_in = audio.get("input") if isinstance(audio, dict) else None
        audio_in = audio_in if isinstance(audio_in, dict) else {}
        if "turn_detection" in audio_in and "turn_detection" not in session:
            session["turn_detection"] = audio_in["turn_detection"]  # the GA place

    def outgoing(self, event: dict[str, Any]) -> dict[str, Any]:
        """``event`` as this connection sends it (a copy: the pipeline may keep the dict)."""
        event, kind = dict(event), event.get("type")
        for key in _INT_MS.get(kind, ()):
            if isinstance(event.get(key), float):
                event[key] = round(event[key])
        item = event.get("item_id")
        if kind == "input_audio_buffer.speech_started" and isinstance(item, str):
            self._spoken[item] = [event.get("audio_start_ms") or 0, 0]
        elif kind == "input_audio_buffer.speech_stopped" and isinstance(item, str):
            # without turn detection there is no speech_started: the turn's audio began
            # where the previous one ended
            end = event.get("audio_end_ms") or 0
            self._spoken[item] = [self._spoken.get(item, [self._last_end])[0], end]
            self._last_end = end
        elif kind == "conversation.item.input_audio_transcription.completed":
            start, end = self._spoken.pop(item, [0, 0])
            event.setdefault("usage", {"type": "duration", "seconds": max(0, end - start) / 1000})
            self._ended = item
        elif kind == "input_audio_buffer.committed" and self._ended is not None:
            event.setdefault("item_id", self._ended)  # the utterance the commit ended
            self._ended = None
        if not self.ga:
            return event
        if kind in GA_NAMES:
            event["type"] = GA_NAMES[kind]
        elif kind in ("session.created", "session.updated"):
            event["session"] = {"type": "realtime", **event.get("session", {})}
        elif kind == "response.done" and isinstance(event.get("response"), dict):
            response = event["response"] = dict(event["response"])
            response["output"] = [_ga_item(out) for out in response.get("output", [])]
        return event


def _ga_item(item: dict[str, Any]) -> dict[str, Any]:
    """An output item with GA content parts (``output_text`` for the beta ``text``)."""
    if item.get("type") != "message":
        return item
    parts = [
        {**part, "type": "output_text"} if part.get("type") == "text" else part
        for part in item.get("content", [])
    ]
    return {**item, "content": parts}
