"""Scoring with a teacher behind an HTTP server: vLLM (OpenAI-compatible) or SGLang (native).

A 671B MoE teacher runs on a cluster; we ask it once per example for the top-k log-probs of
every prompt position and cache them (distill/cache/). The two request shapes:

vLLM ``POST /v1/completions``::

    {"model": M, "prompt": [ids...], "max_tokens": 1, "prompt_logprobs": k, "temperature": 1}
    -> choices[0].prompt_logprobs: [null, {"<id>": {"logprob", "rank", "decoded_token"}}, ...]

SGLang ``POST /generate``::

    {"input_ids": [ids...], "return_logprob": true, "logprob_start_len": 0,
     "top_logprobs_num": k, "sampling_params": {"max_new_tokens": 1, "temperature": 1}}
    -> meta_info.input_top_logprobs: [null, [[logprob, id, text|null], ...], ...]

In both, entry t (t >= 1) is the distribution of token t given tokens < t, so it becomes cache
row t - 1 ("row t predicts token t + 1"); entry 0 is null. vLLM adds the actual prompt token to
an entry when it is not in the top k (with its rank), so entries are cut back to the k best.
Schemas, versions and sources: docs/teacher-cache.md.

Requests run on a thread pool (``concurrency`` in flight) over one ``httpx.Client``; connection
errors, timeouts, 429 and 5xx are retried with exponential backoff; anything else (a k above
the server's cap, malformed JSON, a missing field) stops with a DistillError saying what to do.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from moe2edge.distill.errors import DistillError

log = logging.getLogger(__name__)

APIS = ("vllm", "sglang")
_CAP_HINT = {
    "vllm": "start vLLM with --max-logprobs >= {k} (its default is 20)",
    "sglang": "check the server's logprob limits (or a proxy in front of it)",
}


class ServedTeacher:
    """A Scorer (moe2edge.distill.cache.scorers) asking a served teacher for prompt top-k logprobs."""

    def __init__(
        self,
        url: str,
        api: str = "vllm",
        k: int = 32,
        *,
        model: str | None = None,
        concurrency: int = 4,
        timeout: float = 120.0,
        retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
    ):
        if api not in APIS:
            raise DistillError(f"unknown server API {api!r}; expected one of {APIS}")
        if concurrency < 1 or retries < 0 or k < 1:
            raise DistillError("concurrency and k must be >= 1 and retries >= 0")
        self.url = url.rstrip("/")
        self.api, self.k, self.retries = api, k, retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.concurrency = concurrency
        self.client = httpx.Client(
            base_url=self.url,
            timeout=timeout,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self._model = model
        self._stop = threading.Event()

    def __enter__(self) -> ServedTeacher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.client.close()

    @property
    def model(self) -> str:
        """The served model's name: given, or asked from the server once."""
        if self._model is None:
            if self.api == "vllm":
                models = _field(self._request("GET", "/v1/models"), "data", list, "/v1/models")
                if not models:
                    raise DistillError(f"the server at {self.url} lists no models at /v1/models")
                self._model = _field(models[0], "id", str, "/v1/models data[0]")
            else:
                data = self._request("GET", "/get_model_info")
                self._model = _field(data, "model_path", str, "/get_model_info")
        return self._model

    def identity(self) -> dict:
        """What identifies the teacher in a cache index (the URL is kept apart: hosts move)."""
        return {"kind": "served", "api": self.api, "model": self.model}

    def __call__(self, seqs: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Score ``seqs`` with ``concurrency`` requests in flight; stop all at the first error."""
        _ = self.model  # resolve once, before the threads start
        self._stop.clear()
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="teacher")
        try:
            futures = [pool.submit(self.score_one, s) for s in seqs]
            return [f.result() for f in futures]
        except BaseException:
            self._stop.set()  # wakes retry sleeps; queued requests are cancelled below
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def score_one(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [T-1, k], logprobs float32 [T-1, k]) for one token-id sequence."""
        if self.api == "vllm":
            body = {
                "model": self.model,
                "prompt": list(ids),
                "max_tokens": 1,
                "temperature": 1.0,
                "prompt_logprobs": self.k,
            }
            payload = self._request("POST", "/v1/completions", body)
            return parse_vllm(payload, len(ids), self.k, self.url)
        body = {
            "input_ids": list(ids),
            "return_logprob": True,
            "logprob_start_len": 0,
            "top_logprobs_num": self.k,
            "sampling_params": {"max_new_tokens": 1, "temperature": 1.0},
        }
        payload = self._request("POST", "/generate", body)
        return parse_sglang(payload, len(ids), self.k, self.url)

    def _request(self, method: str, path: str, body: dict | None = None):
        """JSON from the server, retrying transport errors, 429 and 5xx with backoff."""
        where = f"{self.url}{path}"
        last = ""
        for attempt in range(self.retries + 1):
            if self._stop.is_set():
                raise DistillError(f"request to {where} cancelled: another request failed")
            wait = min(self.backoff * 2**attempt, self.max_backoff)
            try:
                response = self.client.request(method, path, json=body)
            except httpx.TransportError as exc:  # refused, reset, timed out, protocol error
                last = f"{type(exc).__name__}: {exc}"
            else:
                status = response.status_code
                if status < 400:
                    return _decode_json(response, where)
                if status != 429 and status < 500:
                    raise self._client_error(response, where)
                last = f"HTTP {status}: {response.text[:200]}"
                retry_after = response.headers.get("retry-after", "")
                if retry_after.isdigit():
                    wait = min(float(retry_after), self.max_backoff)
            if attempt < self.retries:
                log.warning("teacher server %s: %s; retrying in %.2fs", where, last, wait)
                self._stop.wait(wait)
        raise DistillError(
            f"the teacher server at {where} did not answer after {self.retries + 1} attempts "
            f"(last error: {last}). Check that it is running and reachable from here (e.g. "
            f"`curl {self.url}/{'v1/models' if self.api == 'vllm' else 'get_model_info'}`), "
            "then run the same command again: shards already written are kept"
        )

    def _client_error(self, response: httpx.Response, where: str) -> DistillError:
        message = _error_message(response)
        capped = re.search(r"logprob", message, re.I) and re.search(
            r"max(imum)?[ _]?(allowed|logprobs)|greater than|exceed", message, re.I
        )
        if capped:
            cap = re.search(r"max allowed:?\s*(\d+)", message)
            hint = _CAP_HINT[self.api].format(k=self.k)
            return DistillError(
                f"the teacher server at {where} caps log-probs below k={self.k}"
                f"{f' (its cap is {cap.group(1)})' if cap else ''}: {message!r}. Either {hint}, "
                f"or build the cache with a smaller --k"
            )
        return DistillError(
            f"the teacher server at {where} rejected the request (HTTP {response.status_code}): "
            f"{message!r}. Check --api ({self.api}) and --model ({self._model})"
        )


def _error_message(response: httpx.Response) -> str:
    """The message of an error body: vLLM's {"error": {"message"}} or older flat {"message"}."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, dict) and "message" in inner:
            return str(inner["message"])
        for key in ("message", "detail", "error"):
            if key in body:
                return str(body[key])
    return response.text[:300]


def _decode_json(response: httpx.Response, where: str):
    try:
        return response.json()
    except ValueError as exc:
        raise DistillError(
            f"the teacher server at {where} returned malformed JSON (HTTP {response.status_code}, "
            f"{len(response.content)} bytes, starting {response.text[:80]!r}): {exc}. Is it a "
            "vLLM/SGLang server of the --api you named, and not a proxy error page?"
        ) from exc


def _field(obj, key, kind: type, where: str):
    """obj[key] checked to be a ``kind``; a DistillError naming the field otherwise."""
    try:
        value = obj[key]
    except (KeyError, IndexError, TypeError):
        raise DistillError(
            f"unexpected response schema from the teacher server: {where} has no "
            f"{key!r} field (got {str(obj)[:160]!r})"
        ) from None
    if not isinstance(value, kind):
        raise DistillError(
            f"unexpected response schema from the teacher server: {where}[{key!r}] is a "
            f"{type(value).__name__}, expected {kind.__name__}"
        )
    return value


def _number(value, where: str) -> float:
    if value is None:  # JSON encoders write -inf as null
        return -math.inf
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DistillError(f"unexpected response schema: {where} is {value!r}, not a number")
    return float(value)


def _rows(
    entries: list, n_tokens: int, k: int, url: str, api: str, field: str
) -> tuple[np.ndarray, np.ndarray]:
    """Turn per-position [(logprob, id, rank)] lists (entry 0 unused) into [T-1, k] arrays."""
    if len(entries) != n_tokens:
        raise DistillError(
            f"unexpected response schema: {field} has {len(entries)} entries for a prompt of "
            f"{n_tokens} tokens (expected one per prompt token)"
        )
    ids = np.zeros((max(n_tokens - 1, 0), k), dtype=np.int32)
    lps = np.zeros((max(n_tokens - 1, 0), k), dtype=np.float32)
    for t in range(1, n_tokens):
        position = entries[t]
        if len(position) < k:
            raise DistillError(
                f"the teacher server at {url} returned {len(position)} top log-probs at prompt "
                f"position {t} but k={k} was asked: it caps them. Either "
                f"{_CAP_HINT[api].format(k=k)}, or build the cache with --k {len(position)}"
            )
        best = sorted(position, key=lambda e: (e[2], -e[0]))[:k]
        for j, (lp, token, _) in enumerate(best):
            if not isinstance(token, int) or token < 0:
                raise DistillError(
                    f"unexpected response schema: token id {token!r} in {field}[{t}]"
                )
            ids[t - 1, j] = token
            lps[t - 1, j] = lp
    return ids, lps


def parse_vllm(payload, n_tokens: int, k: int, url: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows from a vLLM /v1/completions response with ``prompt_logprobs``."""
    choices = _field(payload, "choices", list, "the response")
    if not choices:
        raise DistillError("unexpected response schema: 'choices' is empty")
    if not isinstance(choices[0], dict) or choices[0].get("prompt_logprobs") is None:
        raise DistillError(
            "unexpected response schema: the response has no choices[0].prompt_logprobs; the "
            "server ignored 'prompt_logprobs' (is it vLLM's OpenAI-compatible server, and is "
            "--api right?)"
        )
    plp = _field(choices[0], "prompt_logprobs", list, "choices[0]")
    entries: list = [None]
    for t in range(1, len(plp)):
        position = plp[t]
        where = f"choices[0].prompt_logprobs[{t}]"
        if not isinstance(position, dict):
            raise DistillError(
                f"unexpected response schema: {where} is {str(position)[:60]}, expected a dict "
                "token id -> {logprob, rank}; an older vLLM with prefix caching returns nothing "
                "for cached prompt blocks: start it with --no-enable-prefix-caching"
            )
        row = []
        for key, item in position.items():
            if not isinstance(item, dict) or "logprob" not in item:
                raise DistillError(f"unexpected response schema: {where}[{key!r}] has no 'logprob'")
            try:
                token = int(key)
            except ValueError:
                raise DistillError(
                    f"unexpected response schema: key {key!r} in {where} is not a token id"
                ) from None
            rank = item.get("rank")
            row.append(
                (_number(item["logprob"], where), token, rank if isinstance(rank, int) else 1 << 62)
            )
        entries.append(row)
    return _rows(entries, n_tokens, k, url, "vllm", "choices[0].prompt_logprobs")


def parse_sglang(payload, n_tokens: int, k: int, url: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows from an SGLang /generate response with ``input_top_logprobs``."""
    if isinstance(payload, list):  # a batch answer: one element per input
        if not payload:
            raise DistillError("unexpected response schema: empty list from /generate")
        payload = payload[0]
    meta = _field(payload, "meta_info", dict, "the response")
    itl = _field(meta, "input_top_logprobs", list, "meta_info")
    entries: list = [None]
    for t in range(1, len(itl)):
        where = f"meta_info.input_top_logprobs[{t}]"
        position = itl[t]
        if not isinstance(position, list):
            raise DistillError(f"unexpected response schema: {where} is not a list")
        row = []
        for item in position:
            if not isinstance(item, list | tuple) or len(item) < 2:
                raise DistillError(
                    f"unexpected response schema: {where} holds {item!r}, expected "
                    "[logprob, token_id, text]"
                )
            row.append((_number(item[0], where), item[1], 0))
        entries.append(row)
    return _rows(entries, n_tokens, k, url, "sglang", "meta_info.input_top_logprobs")
