"""Fuzzing the running service from outside: schemathesis over its own /openapi.json (every
operation, positive and negative data) and hypothesis-made voice WebSocket sessions.

A server error is a 5xx answer, an ``error`` event of type ``server_error``, or a traceback
in the server's log; an abnormal close is the server ending a WebSocket with anything but
the closes the protocol names (1000 normal, 1008 policy, 1013 busy) or dropping it."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import requests
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

log = logging.getLogger("reliability.fuzz")
_QUIET = dict(
    database=None,
    deadline=None,
    phases=[Phase.generate],
    verbosity=Verbosity.quiet,
    suppress_health_check=list(HealthCheck),
)


def _draw(strategy: st.SearchStrategy, n: int, seed: int) -> list[Any]:
    """``n`` examples of ``strategy`` (hypothesis' generation only: no shrinking, no replay)."""
    out: list[Any] = []

    @settings(max_examples=n, **_QUIET)
    @given(strategy)
    def collect(value) -> None:
        out.append(value)

    random.seed(seed)
    try:
        collect()
    except Unsatisfiable:  # nothing to vary (negative data for an operation without inputs)
        pass
    return out


# --- HTTP -------------------------------------------------------------------------------------


def http_fuzz(base_url: str, cases: int, seed: int = 0, workers: int = 2) -> dict:
    """``cases`` schemathesis cases over every operation of ``base_url``'s /openapi.json, half
    fitting the schema and half not, each sent to the server; counts the 5xx answers."""
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    drawn: list = []
    rounds = 0
    while len(drawn) < cases and rounds < 50:  # operations without inputs run out first
        per = max(1, (cases - len(drawn)) // (2 * len(operations)) + 1)
        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                strategy = op.as_strategy(mode)
                drawn += [(op.label, mode.value, c) for c in _draw(strategy, per, seed + rounds)]
        rounds += 1
    random.Random(seed).shuffle(drawn)
    drawn = drawn[:cases]
    statuses: Counter = Counter()
    failures: list[dict] = []
    local = __import__("threading").local()

    def send(item) -> tuple[str, str, int, Any]:
        label, mode, case = item
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        try:
            status = case.call(base_url=base_url, session=session, timeout=30).status_code
        except requests.RequestException as exc:
            return label, mode, 599, f"{type(exc).__name__}: {exc}"  # dropped: counted as 5xx
        return label, mode, status, case

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for label, mode, status, case in pool.map(send, drawn):
            statuses[status] += 1
            if status >= 500 and len(failures) < 10:
                failures.append(
                    {"operation": label, "mode": mode, "status": status, "case": _shown(case)}
                )
    return {
        "cases": len(drawn),
        "operations": [op.label for op in operations],
        "server_errors": sum(n for s, n in statuses.items() if s >= 500),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "seconds": round(time.perf_counter() - started, 1),
        "examples": failures,
    }


def _shown(case: Any) -> str:
    if isinstance(case, str):
        return case
    try:
        return case.as_curl_command()[:500]
    except Exception:  # noqa: BLE001 (only for the report)
        return repr(case)[:500]


# --- WebSocket --------------------------------------------------------------------------------

NORMAL_CLOSES = {1000, 1008, 1013}
_numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 16000, 24000, 8000, 1e308, -1e308, 10**30]),
)
_scalars = st.one_of(st.none(), st.booleans(), _numbers, st.text(max_size=40))
_json = st.recursive(
    _scalars,
    lambda c: st.one_of(
        st.lists(c, max_size=4), st.dictionaries(st.text(max_size=12), c, max_size=4)
    ),
    max_leaves=12,
)
_settings = st.sampled_from(
    ["end_silence_ms", "vad_threshold", "min_speech_ms", "preroll_ms", "barge_in", "speculate",
     "max_new_tokens", "temperature", "audio_chunk_ms", "history_turns", "endpointing",
     "turn_detection", "first_phrase_words", "max_frame_ms", "bogus"]
)  # fmt: skip
_session = st.fixed_dictionaries(
    {},
    optional={
        "turn_detection": st.one_of(
            st.none(),
            _json,
            st.fixed_dictionaries(
                {"type": st.sampled_from(["server_vad", "semantic_vad", "x", None, 3])},
                optional={
                    "silence_duration_ms": _numbers,
                    "threshold": _numbers,
                    "prefix_padding_ms": _numbers,
                },
            ),
        ),
        "input_audio_sample_rate": st.one_of(_numbers, st.text(max_size=6)),
        "input_audio_format": st.one_of(
            st.sampled_from(["pcm16", "audio/pcm", "g711_ulaw", ""]),
            st.fixed_dictionaries({"type": st.just("audio/pcm"), "rate": _numbers}),
            _json,
        ),
        "audio": _json,
        "max_response_output_tokens": st.one_of(_numbers, st.just("inf"), st.text(max_size=5)),
        "temperature": st.one_of(_numbers, _json),
        "moe2edge": st.one_of(st.dictionaries(_settings, _scalars, max_size=4), _json),
    },
)
_event_types = st.sampled_from(
    ["session.update", "input_audio_buffer.append", "input_audio_buffer.commit",
     "input_audio_buffer.clear", "response.cancel", "response.create", "", "x" * 200]
)  # fmt: skip


def _event(kind: str, body: dict) -> str:
    return json.dumps({"type": kind, **body}, allow_nan=True)


def _messages(speech: list[bytes]) -> st.SearchStrategy:
    """One client message: (kind, payload) where kind is "text", "bytes" or "speech"."""
    event_id = st.one_of(st.none(), st.text(max_size=8), _numbers, _json)
    text = st.one_of(
        st.builds(lambda s, i: _event("session.update", {"session": s, "event_id": i}),
                  _session, event_id),
        st.builds(lambda a: _event("input_audio_buffer.append", {"audio": a}),
                  st.one_of(st.binary(max_size=2000).map(lambda b: base64.b64encode(b).decode()),
                            st.text(max_size=50), _json)),
        st.builds(lambda k, e: _event(k, {"event_id": e}), _event_types, event_id),
        st.builds(lambda k, extra: json.dumps({"type": k, **extra}, allow_nan=True),
                  _event_types, st.dictionaries(st.text(max_size=8), _json, max_size=3)),
        _json.map(lambda v: json.dumps(v, allow_nan=True)),  # not an event object
        st.text(max_size=200),  # not JSON
        st.integers(1, 6000).map(lambda n: "[" * n + "]" * n),  # deep nesting
        st.integers(4000, 20000).map(lambda n: '{"type": "session.update", "x": ' + "9" * n + "}"),
        st.just("x" * 70_000),  # over max_ws_message_bytes
    )  # fmt: skip
    binary = st.one_of(
        st.binary(max_size=4000),  # garbage, odd lengths included
        st.integers(1, 25).map(lambda n: bytes(640) * n),  # silence
        st.just(bytes(70_000)),
        st.just(np.full(320, 32767, "<i2").tobytes()),  # full-scale
    )
    texts, binaries = text.map(lambda t: ("text", t)), binary.map(lambda b: ("bytes", b))
    spoken = st.sampled_from(range(len(speech))).map(lambda i: ("speech", i))
    # about 1 message in 12 is speech (it costs the server a transcript and a reply)
    return st.one_of(*[texts] * 8, *[binaries] * 3, spoken)


def ws_sequences(n: int, speech: list[bytes], seed: int = 0) -> list[dict]:
    """``n`` sessions: messages, then a graceful close, an abrupt one (TCP dropped), or a
    close straight after sending without waiting for answers."""
    plan = st.fixed_dictionaries(
        {
            "messages": st.lists(_messages(speech), min_size=0, max_size=10),
            "end": st.sampled_from(["close", "close", "abort", "close_now"]),
        }
    )
    return _draw(plan, n, seed)


async def _open(url: str, headers: dict, out: dict):
    """A session (its ``session.created`` read), waiting while all voice sessions are in use
    (a closed session is given back a moment after its client leaves)."""
    from websockets.asyncio.client import connect

    for _ in range(300):
        ws = await connect(url, additional_headers=headers, max_size=None, open_timeout=60,
                           close_timeout=5)  # fmt: skip
        first = json.loads(await asyncio.wait_for(ws.recv(), 60))
        if first.get("type") == "session.created":
            return ws
        await ws.close()
        if first.get("error", {}).get("code") != "server_busy":
            out["abnormal"] += 1
            out["note"] = f"first event {first}"
            return None
        out["busy"] += 1
        await asyncio.sleep(0.1)
    out["note"] = "voice sessions busy for 30 s"
    out["abnormal"] += 1
    return None


async def _run_connection(url: str, plan: list[dict], speech: list[bytes], headers: dict) -> dict:
    """One WebSocket carrying the sequences of ``plan`` one after another, each ended by a
    probe that the server must answer (an unknown event: an error event naming it); the last
    sequence's ``end`` says how the connection ends."""
    from websockets.exceptions import ConnectionClosed

    out = {"server_errors": 0, "abnormal": 0, "errors": Counter(), "note": None, "busy": 0}
    ws, aborted = None, False
    try:
        ws = await _open(url, headers, out)
        if ws is None:
            return out
        for n, seq in enumerate(plan):
            for kind, payload in seq["messages"]:
                if kind == "speech":
                    pcm = speech[payload]
                    for i in range(0, len(pcm), 640 * 5):
                        await ws.send(pcm[i : i + 640 * 5])
                else:
                    await ws.send(payload)
            last = n == len(plan) - 1
            if last and seq["end"] == "close_now":  # leave without waiting for the answers
                break
            probe = f"probe-{n}"
            await ws.send(json.dumps({"type": "moe2edge.probe", "event_id": probe}))
            deadline = time.monotonic() + 60
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    out["abnormal"] += 1
                    out["note"] = "no answer to the probe in 60 s"
                    return out
                event = json.loads(await asyncio.wait_for(ws.recv(), left))
                if event.get("type") == "error":
                    err = event.get("error", {})
                    out["errors"][err.get("code")] += 1
                    out["server_errors"] += err.get("type") == "server_error"
                    if err.get("event_id") == probe:
                        break
            if last and seq["end"] == "abort":  # the TCP connection dropped, no close frame
                aborted = True
                ws.transport.abort()
                return out
        await ws.close()
    except ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd else None
        if not aborted and code not in NORMAL_CLOSES:
            out["abnormal"] += 1
            out["note"] = (
                f"closed {code} {exc.rcvd.reason if exc.rcvd else 'without a close frame'}"
            )
    except (OSError, TimeoutError) as exc:
        out["abnormal"] += 1
        out["note"] = f"{type(exc).__name__}: {exc}"
    return out


def ws_fuzz(ws_url: str, sequences: int, speech: list[bytes], seed: int = 0,
            concurrency: int = 3, headers: dict | None = None,
            per_connection: int = 4) -> dict:  # fmt: skip
    """Run ``sequences`` hypothesis-made sequences, 1 to ``per_connection`` a connection,
    ``concurrency`` connections at a time."""
    plans = ws_sequences(sequences, speech, seed)
    rng = random.Random(seed)
    groups, i = [], 0
    while i < len(plans):  # 1-4 sequences a connection
        k = rng.randint(1, per_connection)
        groups.append(plans[i : i + k])
        i += k
    totals = {"server_errors": 0, "abnormal": 0, "busy": 0}
    codes: Counter = Counter()
    notes: list[str] = []

    async def main() -> None:
        gate = asyncio.Semaphore(concurrency)

        async def one(group: list[dict]) -> None:
            async with gate:
                r = await _run_connection(ws_url, group, speech, headers or {})
            for key in ("server_errors", "abnormal", "busy"):
                totals[key] += r[key if key != "abnormal" else "abnormal"]
            codes.update(r["errors"])
            if r["note"] and len(notes) < 10:
                notes.append(r["note"])

        await asyncio.gather(*(one(g) for g in groups))

    started = time.perf_counter()
    asyncio.run(main())
    return {
        "sequences": len(plans),
        "connections": len(groups),
        "busy_retries": totals["busy"],
        "messages": sum(len(p["messages"]) for p in plans),
        "abnormal_closes": totals["abnormal"],
        "server_errors": totals["server_errors"],
        "error_codes": dict(codes.most_common()),
        "seconds": round(time.perf_counter() - started, 1),
        "notes": notes,
    }
