"""What keeps the service safe to leave running: a per-client rate limit, the WebSocket's
Origin check and credentials, and an access log that never carries a token.

See docs/service.md "Security" for what is defended and how to deploy it.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from fastapi import WebSocket
from fastapi.responses import JSONResponse

BEARER_PROTOCOL = "moe2edge.bearer."  # subprotocol carrying the token (browsers send no headers)
APP_PROTOCOL = "moe2edge"  # what the server echoes when the client offers it beside the token
_SECRET_QUERY = re.compile(r"(?i)([?&](?:token|access_token|api_key|key)=)[^&\s]*")


class RateLimit:
    """429 + Retry-After once a client (by address) goes over ``rate`` requests a second on
    average, ``burst`` at once (a token bucket each). WebSocket handshakes count too; /health
    and the web page's files do not. ``rate`` 0: off."""

    MAX_CLIENTS = 4096  # buckets kept; the fullest (idle) ones are dropped beyond that

    def __init__(self, app: Any, rate: float, burst: int) -> None:
        self.app, self.rate, self.burst = app, rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, when)
        self._lock = threading.Lock()

    def wait_s(self, client: str, now: float | None = None) -> float:
        """0 and one request taken if ``client`` may go on, else the seconds until it may."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, then = self._buckets.get(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.rate)
            if tokens >= 1:
                self._buckets[client] = (tokens - 1, now)
                if len(self._buckets) > self.MAX_CLIENTS:
                    self._prune(now)
                return 0.0
            self._buckets[client] = (tokens, now)
            return (1 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        full = [c for c, (t, w) in self._buckets.items() if t + (now - w) * self.rate >= self.burst]
        for client in full or list(self._buckets)[: len(self._buckets) // 2]:
            del self._buckets[client]

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if (
            self.rate <= 0
            or scope["type"] not in ("http", "websocket")
            or not path.startswith("/v1/")
        ):
            return await self.app(scope, receive, send)
        client = (scope.get("client") or ("unknown", 0))[0]
        wait = self.wait_s(client)
        if not wait:
            return await self.app(scope, receive, send)
        retry = str(max(1, math.ceil(wait)))
        body = {
            "error": {
                "message": f"too many requests from {client}: at most {self.rate:g} a second "
                f"(burst {self.burst}, rate_limit_rps / rate_limit_burst); retry after {retry} s",
                "type": "rate_limit_error",
                "param": None,
                "code": "rate_limited",
            }
        }
        response = JSONResponse(body, status_code=429, headers={"Retry-After": retry})
        if scope["type"] == "http":
            return await response(scope, receive, send)
        if "websocket.http.response" in scope.get("extensions", {}):
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": 429,
                    "headers": response.raw_headers,
                }
            )
            await send({"type": "websocket.http.response.body", "body": response.body})
            return
        await send({"type": "websocket.close", "code": 1013, "reason": "rate limited"})


def origin_allowed(websocket: WebSocket, allowed: list[str]) -> bool:
    """A browser's WebSocket may come from the page's own origin (Origin's host:port equals
    Host) or one in ``allowed`` (``ws_origins``; ``"*"``: any); a client that sends no
    Origin (not a browser) is let through (the token guards it)."""
    origin = websocket.headers.get("origin")
    if origin is None:
        return True
    if "*" in allowed or origin.rstrip("/") in (a.rstrip("/") for a in allowed):
        return True
    host = websocket.headers.get("host", "")
    try:
        return bool(host) and urlsplit(origin).netloc.lower() == host.lower()
    except ValueError:
        return False


def ws_credentials(websocket: WebSocket) -> tuple[str | None, str | None]:
    """The token a WebSocket client presents (``Authorization: Bearer`` or the subprotocol
    ``moe2edge.bearer.<token>``) and the subprotocol to echo (``moe2edge`` when offered, else
    the bearer one: a browser fails a handshake that answers none of those it offered)."""
    auth = websocket.headers.get("authorization", "")
    token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
    offered = [p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",")]
    offered = [p for p in offered if p]
    bearer = next((p for p in offered if p.startswith(BEARER_PROTOCOL)), None)
    if token is None and bearer is not None:
        token = bearer[len(BEARER_PROTOCOL) :]
    echo = APP_PROTOCOL if APP_PROTOCOL in offered else bearer
    return token, echo


class _RedactSecrets(logging.Filter):
    """Blanks ``token=...`` (and alike) in uvicorn's access-log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _SECRET_QUERY.sub(r"\1[redacted]", a) if isinstance(a, str) else a
                for a in record.args
            )
        elif isinstance(record.msg, str):
            record.msg = _SECRET_QUERY.sub(r"\1[redacted]", record.msg)
        return True


def redact_access_log() -> None:
    """Install the redaction on uvicorn's access and error loggers (once)."""
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactSecrets) for f in logger.filters):
            logger.addFilter(_RedactSecrets())
