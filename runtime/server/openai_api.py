"""The OpenAI-compatible text API: /v1/models, /v1/completions, /v1/chat/completions.

Requests are typed pydantic models; the service state comes in through FastAPI
dependencies. A prompt is a chat rendered by ``render_chat`` (as voice renders its
history) or a completion's text with BOS.
Streaming answers are server-sent events in OpenAI's chunk format, ending with
``data: [DONE]``. Every generation holds a scheduler slot and runs as a ``Job`` of the
batching loop (``server/batching.py``); if the client goes away the job stops at its next
prefill chunk or decode step, and the loop then gives the slot back.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from moe2edge.runtime.generate import GenerationResult
from moe2edge.runtime.sampling import SamplingParams
from moe2edge.runtime.server.batching import END, Job
from moe2edge.runtime.server.scheduler import Overloaded, Slot
from moe2edge.runtime.server.state import APIError, ServiceState, get_state, require_token
from moe2edge.runtime.server.structured import (
    MAX_TOOLS,
    AssistantToolCall,
    Plan,
    ResponseFormat,
    ToolChoice,
    ToolParam,
    history_text,
    plan,
)
from moe2edge.runtime.server.tools import tool_format
from moe2edge.runtime.server.versions import session_key
from moe2edge.runtime.session import render_chat

router = APIRouter(prefix="/v1", dependencies=[Depends(require_token)])
State = Annotated[ServiceState, Depends(get_state)]


# Every field has a size or range limit (besides the body's, max_body_bytes).
Text = Annotated[str, Field(max_length=1 << 20)]
Name = Annotated[str, Field(max_length=256)]


class TextPart(BaseModel):
    type: Literal["text", "input_text"] = "text"
    text: Text


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[TextPart], Field(max_length=1024)] | None = None
    tool_calls: Annotated[list[AssistantToolCall], Field(max_length=128)] | None = None
    tool_call_id: Annotated[str, Field(max_length=256)] | None = None  # a tool turn: its call

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


MaxTokens = Annotated[int, Field(ge=1, le=1 << 20)]  # the server's limit is checked later


class _Sampling(BaseModel):
    # Unknown OpenAI fields are accepted and ignored. Every number has a range, and NaN /
    # Infinity (which Python's JSON parser reads from the literals) are refused: a 400.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: Name | None = None
    max_tokens: MaxTokens | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1 << 20)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    seed: int | None = Field(None, ge=0, le=2**64 - 1)  # numpy's generator takes no negatives
    stop: Name | Annotated[list[Name], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=128)  # only 1 is served; sampling_params says so
    user: Name | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=4096)
    max_completion_tokens: MaxTokens | None = None
    # structured outputs (server/structured.py)
    tools: Annotated[list[ToolParam], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(_Sampling):
    prompt: Text | Annotated[list[Text], Field(max_length=16)]
    echo: bool = False


# --- prompt building ----------------------------------------------------------------------


def chat_prompt(state: ServiceState, messages: list[ChatMessage]) -> list[int]:
    """Messages -> prompt ids in the bundle's conversation format (``render_chat``: the
    bundle's Jinja chat template and its generation prompt, the ids training encodes the
    same conversation to; for the demo's turn-by-turn format, as the voice pipeline renders
    its history: the prompt template for user turns, `` reply`` and the end-of-turn token for
    assistant turns, system text leading the first user turn)."""
    if messages[-1].role not in ("user", "tool"):
        raise APIError(400, "the last message must have role 'user' or 'tool'", param="messages")
    fmt = tool_format(state.generator.engine.manifest)
    try:
        return render_chat(state.generator, [history_text(m, fmt) for m in messages])
    except ValueError as exc:  # the chat template refused the conversation
        raise APIError(400, str(exc), param="messages") from exc


def encode(state: ServiceState, text: str, template: bool) -> list[int]:
    gen = state.generator
    if template:
        return gen.encode_prompt(text)
    return gen.with_bos(gen.tokenizer.encode(text, add_special_tokens=False).ids)


def sampling_params(
    state: ServiceState, req: _Sampling, prompt_tokens: int, max_tokens: int | None
) -> SamplingParams:
    cfg, context = state.config, state.generator.engine.max_length
    if req.n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    if prompt_tokens == 0:
        raise APIError(400, "the prompt is empty", param="prompt")
    limit = cfg.max_prompt_tokens or context - 1
    if prompt_tokens > limit:
        raise APIError(
            400,
            f"the prompt is {prompt_tokens} tokens; this server takes at most {limit} "
            f"(model context {context}); shorten the prompt or the conversation",
            param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
            code="context_length_exceeded",
        )
    room = context - prompt_tokens
    if max_tokens is not None:
        if max_tokens > cfg.max_new_tokens_limit or max_tokens > room:
            raise APIError(
                400,
                f"max_tokens={max_tokens} is too large: at most "
                f"{min(cfg.max_new_tokens_limit, room)} for this prompt ({prompt_tokens} "
                f"prompt tokens, context {context}, server limit {cfg.max_new_tokens_limit})",
                param="max_tokens",
            )
    else:
        max_tokens = min(state.generator.default_max_new_tokens, room, cfg.max_new_tokens_limit)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4:
        raise APIError(400, "at most 4 stop sequences", param="stop")
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=req.temperature if req.temperature is not None else 0.0,
        top_p=req.top_p if req.top_p is not None else 1.0,
        top_k=req.top_k or 0,
        repetition_penalty=req.repetition_penalty or 1.0,
        seed=req.seed,
        stop=stop,
    )
    return params


# --- running a generation -----------------------------------------------------------------


async def acquire(state: ServiceState) -> Slot:
    try:
        slot = await state.scheduler.acquire()
    except Overloaded as exc:
        state.metrics.rejected.inc()
        raise APIError(
            429,
            str(exc),
            type="rate_limit_error",
            code="server_busy",
            headers={"Retry-After": str(exc.retry_after_s)},
        ) from None
    state.refresh_gauges()
    return slot


async def pieces(state: ServiceState, job: Job, queue: asyncio.Queue) -> AsyncIterator[str]:
    """Reply text pieces from the batching loop; leaving early cancels the job (the loop
    stops it at the next chunk or step and then gives its slot back)."""
    finished = False
    try:
        state.batching.submit(job)
        while True:
            item = await queue.get()
            if item is END:
                finished = True
                break
            if isinstance(item, BaseException):
                finished = True  # the loop ended the job (and freed its slot) on an error
                raise item
            yield item
    finally:
        if not finished:  # client gone (or consumer stopped)
            job.abandon()
            state.metrics.cancelled.labels("client_disconnected").inc()
        state.metrics.tokens.inc(len(job.result.token_ids))
        state.versions.count_tokens(state.version, len(job.result.token_ids))
        state.metrics.prompt_tokens.inc(len(job.prompt_ids))
        state.refresh_gauges()


def new_job(
    state: ServiceState,
    prompt_ids: list[int],
    params: SamplingParams,
    slot: Slot,
    arrived: float,
    shape: Plan | None = None,
) -> tuple[Job, asyncio.Queue]:
    """A job whose pieces arrive on the returned queue (put there from the loop's thread)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def emit(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # loop closed at shutdown
            pass

    def release() -> None:
        slot.release()
        try:
            loop.call_soon_threadsafe(state.refresh_gauges)
        except RuntimeError:
            pass

    constraint = shape.constraint if shape is not None else None
    return Job(prompt_ids, params, emit, release, arrived=arrived, constraint=constraint), queue


def usage(result: GenerationResult, prompt_tokens: int) -> dict[str, Any]:
    n = len(result.token_ids)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": n,
        "total_tokens": prompt_tokens + n,
        "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
        # speculative decoding, per request (OpenAI's names for predicted outputs' tokens)
        "completion_tokens_details": {
            "accepted_prediction_tokens": result.accepted_tokens,
            "rejected_prediction_tokens": result.proposed_tokens - result.accepted_tokens,
        },
    }


def finish_reason(result: GenerationResult, called: bool = False) -> str:
    if called and result.finish_reason == "stop":
        return "tool_calls"
    return "stop" if result.finish_reason == "stop" else "length"


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


# --- routes -------------------------------------------------------------------------------


def routed(state: ServiceState, req: _Sampling, request: Request) -> ServiceState:
    """The state as the version ``req.model`` routes to sees it (``server/versions.py``:
    a version's name, else the weighted split, sticky per ``X-Session-Id`` or ``user``)."""
    key = session_key(request.headers, req.user)
    return state.versions.routed(state, req.model, key, request.scope)


@router.get("/models")
async def list_models(state: State) -> dict:
    """The service's alias (routed by the split) first, then each serving version."""
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": state.created, "owned_by": "moe2edge"}
            for name in state.versions.known()
        ],
    }


@router.post("/chat/completions")
async def chat_completions(req: ChatCompletionRequest, state: State, request: Request):
    state = routed(state, req, request)
    prompt_ids = chat_prompt(state, req.messages)
    params = sampling_params(
        state, req, len(prompt_ids), req.max_completion_tokens or req.max_tokens
    )
    shape = await run_in_threadpool(  # compiling a grammar may take milliseconds
        plan, state, req.tools, req.tool_choice, req.parallel_tool_calls, req.response_format
    )
    return await _complete(state, req, prompt_ids, params, request, chat=True, shape=shape)


@router.post("/completions")
async def completions(req: CompletionRequest, state: State, request: Request):
    state = routed(state, req, request)
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if len(prompts) != 1:
        raise APIError(
            400, "send one prompt per request (a list of one string at most)", param="prompt"
        )
    if req.echo:
        raise APIError(400, "echo is not supported", param="echo")
    prompt_ids = encode(state, prompts[0], template=False)
    params = sampling_params(state, req, len(prompt_ids), req.max_tokens)
    return await _complete(state, req, prompt_ids, params, request, chat=False)


async def _hang_up(request: Request, job: Job) -> None:
    """Cancel ``job`` when the client of a non-streaming request goes away."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.05)
    job.abandon()
    state = get_state(request)
    state.metrics.cancelled.labels("client_disconnected").inc()


async def _complete(
    state: ServiceState,
    req: _Sampling,
    prompt_ids: list[int],
    params: SamplingParams,
    request: Request,
    chat: bool,
    shape: Plan | None = None,
):
    shape = shape or Plan()
    arrived = time.perf_counter()
    slot = await acquire(state)
    job, queue = new_job(state, prompt_ids, params, slot, arrived, shape)
    result = job.result
    created = int(time.time())
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    kind = "chat.completion" if chat else "text_completion"
    base = {"id": rid, "created": created, "model": state.model_id}
    if not req.stream:
        watcher = asyncio.create_task(_hang_up(request, job))
        try:
            text = "".join([p async for p in pieces(state, job, queue)])
        finally:
            watcher.cancel()
            job.abandon()  # (nothing left to stop once it ended)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason(result)}
        if chat:
            choice["message"], called = shape.message(text)
            choice["finish_reason"] = finish_reason(result, called)
        else:
            choice.update(text=text, logprobs=None)
        return JSONResponse(
            {**base, "object": kind, "choices": [choice], "usage": usage(result, len(prompt_ids))}
        )

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(
        delta: str | dict | None = None, reason: str | None = None, role: bool = False
    ) -> str:
        if chat:
            d: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if isinstance(delta, dict):
                d.update(delta)
            elif delta is not None:
                d["content"] = delta
            ch = {"index": 0, "delta": d, "finish_reason": reason}
            obj = {**base, "object": "chat.completion.chunk", "choices": [ch]}
        else:
            ch = {"index": 0, "text": delta or "", "finish_reason": reason, "logprobs": None}
            obj = {**base, "object": "text_completion", "choices": [ch]}
        if include_usage:
            obj["usage"] = None
        return sse(obj)

    async def body() -> AsyncIterator[str]:
        try:
            if chat:
                yield chunk(role=True)
            async for piece in pieces(state, job, queue):
                if not chat:
                    yield chunk(piece)
                    continue
                for delta in shape.stream(piece):
                    yield chunk(delta)
            if chat:
                for delta in shape.stream(None):
                    yield chunk(delta)
            yield chunk(reason=finish_reason(result, shape.streamed_calls > 0))
            if include_usage:
                yield sse(
                    {
                        **base,
                        "object": "chat.completion.chunk" if chat else kind,
                        "choices": [],
                        "usage": usage(result, len(prompt_ids)),
                    }
                )
        except Exception as exc:  # headers are gone: report in the stream, then end it
            yield sse({"error": {"message": str(exc), "type": "server_error"}})
        yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return GenerationStream(body(), job.abandon, media_type="text/event-stream", headers=headers)


class GenerationStream(StreamingResponse):
    """An SSE response that stops its generation and frees its slot however it ends
    (finished, client gone, or never started)."""

    def __init__(self, content: AsyncIterator[str], on_close, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
