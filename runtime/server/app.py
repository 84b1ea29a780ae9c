"""The FastAPI app: OpenAI-compatible text API, voice WebSocket, web page, health, metrics.

``create_app(config, generator=...)`` builds it around one loaded bundle. Two optional,
duck-typed hooks let a power manager pace the service without the runtime importing it:
``step_hook()`` runs before every decode step (``before_decode_step``), and
``concurrency_limiter.allowed_concurrency()`` caps how many generation slots are usable.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from moe2edge.runtime.errors import RuntimeUserError
from moe2edge.runtime.generate import Generator
from moe2edge.runtime.prefix_cache import PrefixCache
from moe2edge.runtime.server import openai_api, versions_api, voice_ws
from moe2edge.runtime.server.batching import BatchLoop
from moe2edge.runtime.server.config import ServerConfig
from moe2edge.runtime.server.guard import RateLimit, redact_access_log
from moe2edge.runtime.server.metrics import Metrics
from moe2edge.runtime.server.scheduler import Scheduler
from moe2edge.runtime.server.state import (
    APIError,
    ServiceState,
    get_state,
    paced_hook,
    require_token,
)
from moe2edge.runtime.server.versions import VersionLeases, Versions, load_generator
from moe2edge.runtime.server.voice_resources import VoiceResources
from moe2edge.runtime.voice.settings import describe_errors

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


class BodyLimit:
    """413 for request bodies over ``max_bytes`` (by Content-Length, or counted as they come).

    Our own: neither Starlette nor uvicorn limits HTTP body size."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse(self._error(int(declared)).body(), status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, self._error(seen).message)
            return message

        await self.app(scope, counted, send)

    def _error(self, size: int) -> APIError:
        return APIError(
            413,
            f"request body of {size}+ bytes exceeds the limit of {self.max_bytes} bytes "
            "(max_body_bytes); send a shorter prompt",
            code="request_too_large",
        )


class CountRequests:
    """Counts every HTTP response below 400 by route and status (errors are counted by the
    exception handlers). Plain ASGI: it only watches ``http.response.start`` go by."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message) -> None:
            if message["type"] == "http.response.start" and message["status"] < 400:
                self.metrics.requests.labels(_route(scope), str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


def _validation_message(exc: RequestValidationError) -> str:
    """Field by field; NaN and Infinity (which Python's JSON parser accepts) are refused by
    the request models (``allow_inf_nan=False``) and named here like any bad value."""
    return "invalid request: " + describe_errors(exc.errors())


def create_app(
    config: ServerConfig,
    generator: Generator,
    step_hook: Any = None,
    concurrency_limiter: Any = None,
    loader: Callable[[str], Generator] | None = None,
) -> FastAPI:
    """The service around ``generator`` (a loaded bundle) and ``config.versions`` (opened
    here by ``loader``, also used by hot loads; default ``load_generator``); ``config``
    was checked when made."""
    scheduler = Scheduler(config.slots, config.queue, concurrency_limiter, config.retry_after_s)
    metrics = Metrics()
    model_id = config.model_name or generator.engine.bundle_dir.resolve().name
    paced = paced_hook(step_hook, scheduler)

    def make_loop(gen: Generator) -> BatchLoop:  # each version: its own rows and prefix cache
        mb = config.prefix_cache_mb
        prefixes = PrefixCache(int(mb * 2**20)) if mb else None
        return BatchLoop(gen, config.slots, config.prefill_chunk, paced, metrics, prefixes)

    loader = loader or functools.partial(load_generator, config)
    versions = Versions(model_id, metrics, make_loop, loader)
    try:  # a version or the voice failing to load stops the engine loops already started
        main = versions.add_loaded(
            config.version_name or model_id,
            str(generator.engine.bundle_dir),
            config.version_weight,
            generator,
        )
        for spec in config.versions:
            versions.add_loaded(spec.name, spec.bundle, spec.weight, loader(spec.bundle))
        metrics.rows.set(config.slots)
        state = ServiceState(
            config=config,
            generator=generator,
            scheduler=scheduler,
            metrics=metrics,
            model_id=model_id,
            batching=main.batching,
            step_hook=paced,
            versions=versions,
        )
        versions.attach(state, main)
        if config.voice_enabled:
            state.voice = VoiceResources(state)
    except BaseException:
        versions.close()
        raise

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        if state.voice is not None:
            state.voice.close()  # the pre-started espeak-ng processes
        versions.close()

    app = FastAPI(
        title="moe2edge", version="0.1.0", docs_url="/docs", redoc_url=None, lifespan=lifespan
    )
    app.state.service = state

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError) -> JSONResponse:
        metrics.requests.labels(_route(_request.scope), str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(exc.status_code, str(exc.detail), code=None, headers=exc.headers)
        return await api_error(_request, err)

    @app.exception_handler(RuntimeUserError)
    async def user_error(_request: Request, exc: RuntimeUserError) -> JSONResponse:
        return await api_error(_request, APIError(400, str(exc)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return await api_error(_request, APIError(400, _validation_message(exc)))

    app.add_middleware(CountRequests, metrics=metrics)
    app.include_router(openai_api.router)
    app.include_router(voice_ws.router)
    app.include_router(versions_api.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health(request: Request) -> dict:
        s = get_state(request)
        return {
            "status": "ok",
            "model": s.model_id,
            "voice": s.voice is not None,
            "voice_sessions": s.voice.sessions if s.voice else 0,
            "context": s.generator.engine.max_length,
            "prefix_cache_mb": round(s.prefix_cache.bytes / 2**20, 1) if s.prefix_cache else 0.0,
            "versions": s.versions.describe()["split"],
            **s.scheduler.stats(),
        }

    @app.get("/metrics", dependencies=[Depends(require_token)])
    async def prometheus(request: Request) -> Response:
        get_state(request).refresh_gauges()
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(VersionLeases)
    app.add_middleware(RateLimit, rate=config.rate_limit_rps, burst=config.rate_limit_burst)
    redact_access_log()
    return app


def _route(scope: dict) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"
