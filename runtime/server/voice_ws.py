"""Voice over WebSocket (``/v1/realtime``): PCM16 frames in, Realtime-style JSON events out.

See docs/voice-protocol.md. Binary messages are 16 kHz mono PCM16 audio; text messages are
JSON client events. Every problem with a message (bad audio, wrong sample rate, oversized,
invalid JSON, unknown event) is answered with an ``error`` event and the connection stays
open; only a missing token or one in the query string (1008) or a full house (1013) closes
it, and a foreign Origin is refused at the handshake (403; runtime/server/guard.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import threading
import time
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.concurrency import run_in_threadpool  # idle threads end, unlike to_thread's

from moe2edge.runtime.generate import Generator
from moe2edge.runtime.server.batching import LoopEngine
from moe2edge.runtime.server.guard import BEARER_PROTOCOL, origin_allowed, ws_credentials
from moe2edge.runtime.server.heap import release_free_heap
from moe2edge.runtime.server.realtime_shapes import RealtimeShapes
from moe2edge.runtime.server.scheduler import Overloaded
from moe2edge.runtime.server.state import APIError, ServiceState, check_token
from moe2edge.runtime.server.tools import ToolError
from moe2edge.runtime.server.versions import session_key
from moe2edge.runtime.server.voice_actions import (
    SessionActions,
    record_call_output,
    tools_update,
)
from moe2edge.runtime.server.voice_resources import VoiceResources
from moe2edge.runtime.server.voice_session_config import parse_session_update, session_view
from moe2edge.runtime.voice.pipeline import VoiceSession
from moe2edge.runtime.voice.reply import error_event, new_id
from moe2edge.runtime.voice.vad import VoiceActivityDetector

log = logging.getLogger(__name__)
router = APIRouter()
_held = threading.local()  # slots the current thread holds (voice replies, session setup)

CLIENT_EVENTS = (
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "response.cancel",
    "conversation.item.truncate",
    "conversation.item.create",
)


@router.websocket("/v1/realtime")
async def realtime(websocket: WebSocket) -> None:
    state: ServiceState = websocket.app.state.service
    voice: VoiceResources | None = state.voice
    config = state.config
    if not origin_allowed(websocket, config.ws_origins):
        # before accepting: the handshake is answered 403 (a page of another site)
        log.warning("voice WebSocket from origin %r refused", websocket.headers.get("origin"))
        await websocket.close(code=1008, reason="origin not allowed")
        return
    presented, subprotocol = ws_credentials(websocket)
    in_query = "token" in websocket.query_params
    if presented is None and in_query and config.ws_query_token:
        presented = websocket.query_params.get("token")
    await websocket.accept(subprotocol=subprotocol)
    sent = 0
    shapes = RealtimeShapes()  # the Realtime schema's shapes, beta or GA (realtime_shapes.py)

    async def send(event: dict) -> None:
        nonlocal sent
        sent += 1
        event = shapes.outgoing(event)
        event.setdefault("event_id", f"event_{sent}")
        if event["type"] == "error":
            state.metrics.ws_errors.labels(event["error"].get("code", "")).inc()
        await websocket.send_text(json.dumps(event))

    if in_query and not config.ws_query_token:
        await send(
            error_event(
                "token_in_query",
                "a token in the URL's query string is refused (URLs are logged and kept in "
                "history): send 'Authorization: Bearer <token>' or the WebSocket subprotocol "
                f"'{BEARER_PROTOCOL}<token>'",
                type="authentication_error",
            )
        )
        await websocket.close(code=1008, reason="token in query string")
        return
    if not check_token(state, presented):
        await send(
            error_event(
                "invalid_api_key",
                "missing or wrong token: send 'Authorization: Bearer <token>' or the "
                f"WebSocket subprotocol '{BEARER_PROTOCOL}<token>'",
                type="authentication_error",
            )
        )
        await websocket.close(code=1008, reason="missing or wrong token")
        return
    if voice is None:
        await send(
            error_event("voice_disabled", "voice is disabled on this server (voice_enabled=false)")
        )
        await websocket.close(code=1008, reason="voice disabled")
        return
    try:  # the version this session talks to (server/versions.py), held until it closes
        query = websocket.query_params
        key = session_key(websocket.headers, query.get("session"))
        routed = state.versions.routed(state, query.get("model"), key, websocket.scope)
    except APIError as exc:
        await send(error_event(exc.code or "model_not_found", exc.message, param="model"))
        await websocket.close(code=1008, reason="unknown model")
        return
    if not voice.try_open():
        await send(
            error_event(
                "server_busy",
                f"all {state.config.max_voice_sessions} voice sessions are in use; try again later",
                type="rate_limit_error",
            )
        )
        await websocket.close(code=1013, reason="voice sessions full")
        return
    try:
        session_id = new_id("sess")
        actions = voice.actions.session(routed.generator, session_id)
    except (ToolError, ValueError) as exc:  # the default tools do not fit this version
        voice.closed()
        await send(error_event("invalid_tools", str(exc), type="server_error"))
        await websocket.close(code=1011, reason="voice tools do not fit the model")
        return
    state.metrics.voice_sessions.inc()
    loop = asyncio.get_running_loop()
    outbox: asyncio.Queue = asyncio.Queue()

    def emit(event: dict) -> None:  # called from pipeline threads
        try:
            loop.call_soon_threadsafe(outbox.put_nowait, event)
        except RuntimeError:
            pass

    def acquire_slot(wait: bool):
        """A slot for this thread (``wait``: in the queue, else only if one is free now);
        the engine calls the thread makes meanwhile run under it. Returns its release."""
        if not wait:
            slot = asyncio.run_coroutine_threadsafe(_try_acquire(state), loop).result()
            if slot is None:
                raise Overloaded(1, state.scheduler.queued)
        else:
            slot = asyncio.run_coroutine_threadsafe(state.scheduler.acquire(), loop).result()
        loop.call_soon_threadsafe(state.refresh_gauges)
        _held.count = getattr(_held, "count", 0) + 1
        owner = threading.current_thread()

        def release() -> None:
            if threading.current_thread() is owner:
                _held.count -= 1
            slot.release()
            loop.call_soon_threadsafe(state.refresh_gauges)

        return release

    @contextlib.contextmanager
    def hold():
        """Every voice prefill and decode step holds a slot: the thread's own (a reply's),
        or one taken for the call, only if one is free (a partial transcript's prefill is
        skipped otherwise, and runs with the reply)."""
        if getattr(_held, "count", 0):
            yield
            return
        release = acquire_slot(False)
        try:
            yield
        finally:
            release()

    engine = LoopEngine(
        routed.generator.engine, routed.batching, hold, chunk=state.config.prefill_chunk
    )
    generator = Generator(engine, routed.generator.tokenizer)

    def open_session() -> VoiceSession:
        release = acquire_slot(True)  # its first prefill (the prompt head) runs now
        try:
            settings = voice.settings()
            return VoiceSession(
                generator,
                voice.take_recognizer(),
                voice.synthesizer,
                emit,
                settings=settings,
                vad=VoiceActivityDetector(
                    threshold=settings.vad_threshold,
                    min_speech_ms=settings.min_speech_ms,
                    end_silence_ms=settings.end_silence_ms,
                ),
                acquire_slot=acquire_slot,
                step_hook=state.step_hook,
                metrics=state.metrics,
                actions=actions.for_reply,
            ).start()
        finally:
            release()

    session: VoiceSession | None = None
    sender: asyncio.Task | None = None
    try:
        try:
            session = await run_in_threadpool(open_session)
        except Overloaded as exc:
            await send(error_event("server_busy", str(exc), type="rate_limit_error"))
            await websocket.close(code=1013, reason="server busy")
            return

        async def pump() -> None:
            while True:
                await send(await outbox.get())

        sender = asyncio.create_task(pump())
        emit(
            {
                "type": "session.created",
                "session": {"id": session_id, **session_view(session.settings), **actions.view()},
            }
        )
        await _receive_loop(websocket, state, session, emit, actions, shapes)
    except WebSocketDisconnect:
        pass
    finally:
        if session is not None:
            await run_in_threadpool(session.close)
            if not session.running():
                voice.give_back(session.asr)
        if sender is not None:
            sender.cancel()
        voice.closed()
        state.metrics.voice_sessions.dec()
        if session is not None:  # what its threads freed, back to the OS (heap.py)
            await run_in_threadpool(release_free_heap, voice.sessions == 0)


async def _try_acquire(state: ServiceState):
    s = state.scheduler
    if s.active < s.capacity() and not s.queued:
        return await s.acquire()
    return None


async def _receive_loop(
    websocket: WebSocket,
    state: ServiceState,
    session: VoiceSession,
    emit,
    actions: SessionActions,
    shapes: RealtimeShapes,
) -> None:
    limit = state.config.max_ws_message_bytes
    while True:
        message = await websocket.receive()
        arrived = time.perf_counter()
        if message["type"] == "websocket.disconnect":
            return
        data, text = message.get("bytes"), message.get("text")
        size = len(data) if data is not None else len((text or "").encode())
        if size > limit:
            emit(
                error_event(
                    "message_too_large",
                    f"message of {size} bytes exceeds the limit of "
                    f"{limit} bytes; send audio in frames of 20 ms (640 bytes)",
                )
            )
            continue
        if data is not None:
            _push(session, data, arrived, emit)
            continue
        try:
            event = json.loads(text or "")
        except (ValueError, RecursionError) as exc:  # ValueError: also a number of 4300+ digits
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            emit(error_event("invalid_json", f"text messages must be JSON events: {reason}"))
            continue
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            emit(
                error_event("invalid_event", "an event must be a JSON object with a string 'type'")
            )
            continue
        try:
            shapes.incoming(event)
            _handle_event(session, event, arrived, emit, actions)
        except Exception as exc:  # never let one bad event end the session
            log.exception("voice event %r failed", event.get("type"))
            emit(error_event("server_error", f"this event failed: {exc}", type="server_error"))


def _push(session: VoiceSession, pcm: bytes, arrived: float, emit, event_id: Any = None) -> None:
    try:
        session.push_audio(pcm, arrived)
    except OverflowError as exc:
        emit(error_event("input_overflow", str(exc), event_id=event_id))
    except (ValueError, TypeError) as exc:
        emit(
            error_event(
                "invalid_audio",
                f"{exc} (16 kHz mono PCM16 little-endian expected)",
                event_id=event_id,
            )
        )


def _handle_event(
    session: VoiceSession, event: dict, arrived: float, emit, actions: SessionActions
) -> None:
    kind, event_id = event["type"], event.get("event_id")
    if not isinstance(event_id, str | int) or isinstance(event_id, bool):
        event_id = None  # echoed in error events: only an id, never a NaN
    if kind == "input_audio_buffer.append":
        try:
            pcm = base64.b64decode(event.get("audio") or "", validate=True)
        except (binascii.Error, TypeError, ValueError):
            emit(
                error_event(
                    "invalid_audio",
                    "input_audio_buffer.append needs 'audio': base64 of 16 kHz mono PCM16",
                    param="audio",
                    event_id=event_id,
                )
            )
            return
        _push(session, pcm, arrived, emit, event_id)
    elif kind == "session.update":
        try:
            changes = parse_session_update(event.get("session"))
            tools = tools_update(event["session"], actions)
            session.update(**changes)
        except (ValueError, TypeError) as exc:
            code = "unsupported_sample_rate" if "sample rate" in str(exc) else "invalid_session"
            emit(error_event(code, str(exc), param="session", event_id=event_id))
            return
        if tools is not None:  # the next update is checked over this one
            actions.accepted = tools

        def updated() -> None:  # in order with the audio: replies after it have the new tools
            if tools is not None:
                actions.apply(tools)
            view = session_view(session.settings) | actions.view()
            emit({"type": "session.updated", "session": view})

        session.call(updated)
    elif kind == "conversation.item.create":  # a function_call_output: into the history
        problem = record_call_output(session, event.get("item"), actions, emit)
        if problem is not None:
            emit(error_event(*problem, event_id=event_id))
    elif kind == "input_audio_buffer.commit":
        session.commit()
        session.call(lambda: emit({"type": "input_audio_buffer.committed"}))
    elif kind == "input_audio_buffer.clear":
        session.clear()
    elif kind == "response.cancel":
        if not session.cancel_reply("client_cancelled"):
            emit(
                error_event(
                    "response_cancel_not_active", "there is no reply to cancel", event_id=event_id
                )
            )
    elif kind == "conversation.item.truncate":
        item_id, end_ms = event.get("item_id"), event.get("audio_end_ms")
        if not isinstance(item_id, str) or not _finite_ms(end_ms):
            emit(
                error_event(
                    "invalid_truncate",
                    "conversation.item.truncate needs 'item_id' (the assistant item of the "
                    "latest reply) and 'audio_end_ms' (a number >= 0: the audio played)",
                    param="audio_end_ms" if isinstance(item_id, str) else "item_id",
                    event_id=event_id,
                )
            )
            return
        session.truncate(
            item_id,
            float(end_ms),
            lambda code, msg, param: emit(error_event(code, msg, param=param, event_id=event_id)),
        )
    else:
        emit(
            error_event(
                "unknown_event",
                f"unknown event type {kind!r}; this server accepts "
                f"{', '.join(CLIENT_EVENTS)} and binary audio frames",
                param="type",
                event_id=event_id,
            )
        )


def _finite_ms(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 <= value <= 86_400_000
    )
