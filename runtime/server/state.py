"""What every route needs: the service state, errors in OpenAI's shape, the bearer token."""

from __future__ import annotations

import inspect
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from moe2edge.runtime.generate import Generator
from moe2edge.runtime.prefix_cache import PrefixCache
from moe2edge.runtime.server.batching import BatchLoop
from moe2edge.runtime.server.config import ServerConfig
from moe2edge.runtime.server.metrics import Metrics
from moe2edge.runtime.server.scheduler import Scheduler


class APIError(Exception):
    """An error answered as ``{"error": {message, type, param, code}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def paced_hook(
    step_hook: Callable[..., None] | None, scheduler: Scheduler
) -> Callable[[], None] | None:
    """Call ``step_hook`` before each decode step, passing ``active=`` when it takes one
    (the Jetson governor's ``before_decode_step(active)`` does)."""
    if step_hook is None:
        return None
    try:
        takes_active = "active" in inspect.signature(step_hook).parameters
    except (TypeError, ValueError):
        takes_active = False
    if takes_active:
        return lambda: step_hook(active=max(1, scheduler.active))
    return step_hook


@dataclass
class ServiceState:
    config: ServerConfig
    generator: Generator
    scheduler: Scheduler
    metrics: Metrics
    model_id: str
    batching: BatchLoop
    step_hook: Callable[[], None] | None = None
    voice: Any = (
        None  # moe2edge.runtime.server.voice_resources.VoiceResources, when voice is enabled
    )
    versions: Any = None  # server.versions.Versions: every bundle served (generator: the default)
    version: Any = None  # the routed server.versions.Version (on a request's view of the state)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def prefix_cache(self) -> PrefixCache | None:
        """Earlier requests' KV, reused by later ones (``config.prefix_cache_mb``)."""
        return self.batching.prefix_cache

    def refresh_gauges(self) -> None:
        self.metrics.active.set(self.scheduler.active)
        self.metrics.queued.set(self.scheduler.queued)
        self.metrics.rows_in_use.set(self.batching.batch.in_use)


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


_bearer = HTTPBearer(auto_error=False)


def check_token(state: ServiceState, presented: str | None) -> bool:
    expected = state.config.token
    if not expected:
        return True
    return presented is not None and secrets.compare_digest(presented.encode(), expected.encode())


async def require_token(request: Request) -> None:
    """401 unless the request carries ``Authorization: Bearer <token>`` (when one is set)."""
    state = get_state(request)
    if not state.config.token:
        return
    credentials: HTTPAuthorizationCredentials | None = await _bearer(request)
    if credentials is None or not check_token(state, credentials.credentials):
        raise APIError(
            401,
            "missing or wrong bearer token: send the header 'Authorization: Bearer <token>' "
            "with the token the server was started with",
            type="authentication_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
