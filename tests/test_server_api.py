"""The text API on a real uvicorn server on 127.0.0.1: the official openai client, auth,
limits, overload (only 200s and 429s), a disconnect that frees its slot at once, the CLI."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from moe2edge.runtime import Generator, SamplingParams
from moe2edge.runtime.errors import RuntimeUserError
from moe2edge.runtime.server import ServerConfig, create_app, load_server_config
from tests.conftest import PYTHON, ROOT, subprocess_env
from tests.server_helpers import ServerThread, bad_numbers, free_port, numeric_fields

TOKEN = "test-token-123"


@pytest.fixture(scope="module")
def generator(tiny_run) -> Generator:
    return Generator.from_bundle(tiny_run["bundle"], threads=1)


def text_server(generator, **overrides):
    hook = overrides.pop("_hook", None)
    config = ServerConfig(voice_enabled=False, **overrides)
    return ServerThread(create_app(config, generator=generator, step_hook=hook))


def test_openai_client_streaming_and_not(generator) -> None:
    prompt = "turn on the kitchen lights"
    expected = generator.generate(prompt).text  # greedy: the server must say exactly this
    with text_server(generator, token=TOKEN) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=TOKEN, max_retries=0)
        models = client.models.list()
        assert [m.id for m in models.data] == [generator.engine.bundle_dir.resolve().name]

        chat = client.chat.completions.create(
            model=models.data[0].id, messages=[{"role": "user", "content": prompt}]
        )
        assert chat.choices[0].message.content == expected
        assert chat.choices[0].finish_reason in ("stop", "length")
        assert chat.usage.prompt_tokens == len(generator.encode_prompt(prompt))
        assert chat.usage.completion_tokens >= 1

        stream = client.chat.completions.create(
            model="any",
            messages=[{"role": "user", "content": prompt}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == expected
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
        assert any(c.choices and c.choices[0].finish_reason for c in chunks)

        raw = generator.tokenizer.decode(generator.encode_prompt(prompt), skip_special_tokens=False)
        comp = client.completions.create(model="any", prompt=raw, max_tokens=5)
        assert comp.choices[0].text and comp.usage.completion_tokens <= 5
        streamed = "".join(
            c.choices[0].text
            for c in client.completions.create(model="any", prompt=raw, max_tokens=5, stream=True)
        )
        assert streamed == comp.choices[0].text

        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_auth_limits_and_bad_requests_are_4xx(generator) -> None:
    with text_server(generator, token=TOKEN, max_body_bytes=4096) as srv:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            r = c.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
            )
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert "Bearer" in r.json()["error"]["message"]
            assert c.get("/metrics").status_code == 401
            health = c.get("/health").json()  # open, for load balancers and watchdogs
            assert health["status"] == "ok" and health["slots"] == 2

            def post(body, **kw):
                return c.post("/v1/chat/completions", headers=auth, **({"json": body} | kw))

            r = post({"messages": [{"role": "user", "content": "word " * 3000}]})
            assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]
            r = post({"messages": [{"role": "user", "content": "lights " * 400}]})
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
            r = post({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000})
            assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
            r = c.post(
                "/v1/chat/completions",
                headers=auth | {"content-type": "application/json"},
                content=b"{not json",
            )
            assert r.status_code == 400
            assert post({"messages": []}).status_code == 400
            assert post({"messages": [{"role": "user", "content": "x"}], "n": 2}).status_code == 400
            r = post({"messages": [{"role": "assistant", "content": "x"}]})
            assert r.status_code == 400 and "role 'user'" in r.json()["error"]["message"]
            r = post({"messages": [{"role": "user", "content": "x"}], "temperature": -1})
            assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
            r = c.post("/v1/completions", headers=auth, json={"prompt": ["a", "b"]})
            assert r.status_code == 400
            metrics = c.get("/metrics", headers=auth)
            assert metrics.status_code == 200
            assert (
                'status="400"' in metrics.text
                and "moe2edge_voice_response_latency_seconds" in metrics.text
            )
            # successes are counted by the request-counting middleware, errors by the handlers
            ok = 'moe2edge_http_requests_total{route="/health",status="200"} 1.0'
            assert ok in metrics.text, metrics.text


# every number a request may carry: (just below its range, just above it, a valid value)
REQUEST_NUMBERS = {
    "max_tokens": (0, 2**20 + 1, 3),
    "max_completion_tokens": (0, 2**20 + 1, 3),
    "temperature": (-0.5, 2.5, 0.7),
    "top_p": (0, 1.5, 0.9),
    "top_k": (-1, 2**20 + 1, 5),
    "repetition_penalty": (0, 10.5, 1.1),
    "seed": (-1, 2**64, 7),  # a negative seed was a 500
    "n": (0, 129, 1),
}
BAD_LITERALS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


@pytest.fixture(scope="module")
def plain_server(generator):
    with text_server(generator) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        yield client


def raw_post(client, path: str, body: dict) -> httpx.Response:
    """``body`` as Python's JSON writes it: NaN and Infinity as the bare literals."""
    content = json.dumps(body).encode()
    return client.post(path, content=content, headers={"content-type": "application/json"})


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity", "below", "above"])
@pytest.mark.parametrize("field", sorted(REQUEST_NUMBERS))
def test_request_numbers_out_of_range_or_not_finite_are_400(plain_server, field, bad) -> None:
    below, above, _ = REQUEST_NUMBERS[field]
    value = {"below": below, "above": above}.get(bad, BAD_LITERALS.get(bad))
    body = {"messages": [{"role": "user", "content": "hi"}], field: value}
    if bad in BAD_LITERALS:
        assert bad in json.dumps(body)  # the literal really goes over the wire
    r = raw_post(plain_server, "/v1/chat/completions", body)
    assert r.status_code == 400, (field, bad, r.status_code, r.text)
    assert field in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("field", sorted(REQUEST_NUMBERS))
def test_request_numbers_in_range_are_served(plain_server, field) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    r = raw_post(plain_server, "/v1/chat/completions", body | {field: REQUEST_NUMBERS[field][2]})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 3


def test_completions_and_stop_refuse_non_finite_numbers(plain_server) -> None:
    for body in (
        {"prompt": "hi", "temperature": math.nan},
        {"prompt": "hi", "max_tokens": math.inf},
        {"messages": [{"role": "user", "content": "hi"}], "stop": math.nan},
        {"messages": [{"role": "user", "content": "hi"}], "stop": ["ok", -math.inf]},
    ):
        path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        r = raw_post(plain_server, path, body)
        assert r.status_code == 400, (body, r.text)
        assert "invalid request" in r.json()["error"]["message"]
    assert raw_post(plain_server, "/v1/completions", {"prompt": "hi", "max_tokens": 2}).is_success


CONFIG_NUMBERS = numeric_fields(ServerConfig.model_fields)


@pytest.mark.parametrize("name", sorted(CONFIG_NUMBERS))
def test_config_numbers_have_ranges_and_refuse_nan_and_infinity(name, tmp_path) -> None:
    info = ServerConfig.model_fields[name]
    for label, value in bad_numbers(info, CONFIG_NUMBERS[name]):
        raw = {"NaN": "nan", "Infinity": "inf", "-Infinity": "-inf"}.get(label, str(value))
        with pytest.raises(RuntimeUserError, match=f"bad value for {name}"):
            load_server_config(None, [f"{name}={raw}"])
        yaml_value = {"NaN": ".nan", "Infinity": ".inf", "-Infinity": "-.inf"}.get(label, raw)
        (tmp_path / "c.yaml").write_text(f"{name}: {yaml_value}\n")
        with pytest.raises(RuntimeUserError, match=f"bad value for {name}.*c.yaml"):
            load_server_config(tmp_path / "c.yaml")
    valid = info.default if info.default is not None else 1
    assert getattr(load_server_config(None, [f"{name}={valid}"]), name) == valid


async def _stream_status(url: str, max_tokens: int) -> tuple[int, str | None, int]:
    body = {
        "messages": [{"role": "user", "content": "turn on the lights"}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    async with httpx.AsyncClient(timeout=60) as c:
        async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            n = 0
            async for line in r.aiter_lines():
                n += line.startswith("data: ")
            return r.status_code, r.headers.get("retry-after"), n


def test_overload_gives_only_200_and_429(generator) -> None:
    """10 clients at once against 1 slot + 2 queue places, each decode step paced at 3 ms."""
    with text_server(generator, slots=1, queue=2, _hook=lambda: time.sleep(0.003)) as srv:

        async def burst():
            return await asyncio.gather(*[_stream_status(srv.url, 40) for _ in range(10)])

        results = asyncio.run(burst())
        statuses = sorted(s for s, _, _ in results)
        assert set(statuses) <= {200, 429}, statuses
        assert statuses.count(200) >= 3 and statuses.count(429) >= 1, statuses
        for status, retry_after, n in results:
            if status == 429:
                assert retry_after is not None and int(retry_after) >= 1
            else:
                assert n >= 3  # role chunk, content, finish (+ [DONE])
        health = httpx.get(srv.url + "/health").json()
        assert health["active"] == 0 and health["queued"] == 0 and health["rejected"] >= 1


def test_client_disconnect_mid_stream_frees_the_slot_at_once(generator) -> None:
    """One slot, no queue, 30 ms per decode step: a 100-token reply would hold it for 3 s."""
    with text_server(generator, slots=1, queue=0, _hook=lambda: time.sleep(0.03)) as srv:
        body = {
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 100,
            "stream": True,
            "temperature": 1.0,
            "seed": 1,
        }
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                while not next(lines).startswith('data: {"id"'):
                    pass
                busy = c.post("/v1/chat/completions", json=body | {"stream": False})
                assert busy.status_code == 429  # the slot is really held
            closed = time.perf_counter()  # leaving the block closes the connection
            while c.get("/health").json()["active"] != 0:
                assert time.perf_counter() - closed < 1.0, "slot still held 1 s after disconnect"
                time.sleep(0.01)
            freed_ms = 1000 * (time.perf_counter() - closed)
            r = c.post("/v1/chat/completions", json=body | {"stream": False, "max_tokens": 3})
            assert r.status_code == 200
            metrics = c.get("/metrics").text
        assert 'moe2edge_cancelled_generations_total{reason="client_disconnected"} 1.0' in metrics
        print(f"slot freed {freed_ms:.0f} ms after the client disconnected")


def test_hooks_limit_concurrency_and_pace_steps(generator) -> None:
    class Governor:  # duck-typed like moe2edge.jetson.governor.PowerGovernor
        def __init__(self):
            self.calls, self.active_seen = 0, set()

        def before_decode_step(self, active=None):
            self.calls += 1
            self.active_seen.add(active)

        def allowed_concurrency(self):
            return 1

    gov = Governor()
    config = ServerConfig(voice_enabled=False, slots=3)
    app = create_app(
        config, generator=generator, step_hook=gov.before_decode_step, concurrency_limiter=gov
    )
    with ServerThread(app) as srv:
        assert httpx.get(srv.url + "/health").json()["capacity"] == 1
        r = httpx.post(
            srv.url + "/v1/chat/completions",
            timeout=30,
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6},
        )
        assert r.status_code == 200
    assert gov.calls >= 1 and gov.active_seen == {1}


def test_serve_cli_binds_loopback_with_token(tiny_run) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "moe2edge.cli",
            "serve",
            str(tiny_run["bundle"]),
            "--port",
            str(port),
            "--token",
            TOKEN,
            "--no-voice",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.HTTPError:
                assert time.time() < deadline, "serve did not come up"
                time.sleep(0.2)
        assert r.json()["voice"] is False
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
        models = httpx.get(
            f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert models.status_code == 200 and json.loads(models.text)["data"]
        if shutil.which("ss"):  # listening on loopback only
            out = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
            assert f"127.0.0.1:{port}" in out and f"0.0.0.0:{port}" not in out
    finally:
        proc.terminate()
        proc.wait(15)
    bad = subprocess.run(
        [PYTHON, "-m", "moe2edge.cli", "serve", str(tiny_run["bundle"]), "slots=zero"],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "bad value for slots" in bad.stderr


# --- continuous batching ------------------------------------------------------------------


@pytest.fixture(scope="module")
def fast_generator(tiny_run) -> Generator:
    from tests._runtime_common import fast_bundles

    bundle = fast_bundles(tiny_run["root"], tiny_run["tokenizer"])["fp32"]
    return Generator.from_bundle(bundle, threads=1)


BATCH_PROMPTS = [
    "turn on the kitchen lights",
    "hello",
    "dim the office lights to forty percent and close the blinds in the bedroom please",
    "what is the temperature",
    "lock the front door",
    "play some music in the living room",
]


def test_batched_service_gives_the_tokens_of_one_request_at_a_time(fast_generator) -> None:
    """Six requests of different lengths, started 20 ms apart, through 3 rows: they join and
    leave the running batch mid-run, rows are reused, and long prompts prefill 4 tokens per
    step between the others' decode steps; each reply is what the request gets alone."""
    gen = fast_generator
    lengths = [12, 5, 9, 12, 3, 8]
    params = [SamplingParams(max_new_tokens=n) for n in lengths]
    expected = [gen.generate(p, s) for p, s in zip(BATCH_PROMPTS, params, strict=True)]
    app = create_app(
        ServerConfig(voice_enabled=False, slots=3, queue=8, prefill_chunk=4),
        generator=gen,
        step_hook=lambda: time.sleep(0.01),  # replies of 50-120 ms: the first three overlap
    )
    with ServerThread(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)

        def ask(i: int) -> tuple[str, list[str]]:
            time.sleep(0.02 * i)
            body = dict(model="m", max_tokens=lengths[i])
            messages = [{"role": "user", "content": BATCH_PROMPTS[i]}]
            if i % 2:
                reply = client.chat.completions.create(messages=messages, **body)
                return reply.choices[0].message.content, []
            chunks = client.chat.completions.create(messages=messages, stream=True, **body)
            parts = [c.choices[0].delta.content or "" for c in chunks if c.choices]
            return "".join(parts), parts

        with ThreadPoolExecutor(len(BATCH_PROMPTS)) as pool:
            replies = list(pool.map(ask, range(len(BATCH_PROMPTS))))
        loop = app.state.service.batching
        health = httpx.get(srv.url + "/health").json()
    for (text, _), want in zip(replies, expected, strict=True):
        assert text == want.text
    assert loop.most_rows == 3, "the requests never shared a decode step"
    assert health["active"] == 0 and loop.batch.in_use == 0


def _connect_send_disconnect(port: int, body: dict, read: int) -> None:
    """A raw HTTP client: send the request, read ``read`` bytes (0: none), hang up."""
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
        f"application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + payload)
        if read:
            sock.recv(read)


def test_no_more_than_slots_generations_under_connect_send_disconnect(fast_generator) -> None:
    """Clients that send a long prompt and hang up at once, after the first bytes, or read
    everything, over and over: the generations in the batching loop (prefill included)
    never outnumber the slots, and every one ends."""
    slots = 2
    app = create_app(
        ServerConfig(voice_enabled=False, slots=slots, queue=3, prefill_chunk=2),
        generator=fast_generator,
        step_hook=lambda: time.sleep(0.003),
    )
    state = app.state.service
    seen = {"jobs": 0, "active": 0, "low": 0}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen["jobs"] = max(seen["jobs"], state.batching.unfinished)
            seen["active"] = max(seen["active"], state.scheduler.active)
            seen["low"] = min(seen["low"], state.scheduler.active)
            time.sleep(0.0005)

    prompt = " ".join(["turn on the kitchen lights"] * 8)  # ~50 tokens: 25 prefill chunks
    with ServerThread(app) as srv:
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()

        def client(i: int) -> None:
            for n in range(6):
                body = {
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": 40,
                    "stream": (i + n) % 3 != 0,
                }
                _connect_send_disconnect(srv.port, body, read=(0, 64, 1 << 16)[(i * n) % 3])

        with ThreadPoolExecutor(6) as pool:
            list(pool.map(client, range(6)))
        deadline = time.time() + 10
        while state.batching.unfinished or state.scheduler.active:
            assert time.time() < deadline, "generations still running 10 s after the last client"
            time.sleep(0.01)
        stop.set()
        watcher.join()
        metrics = httpx.get(srv.url + "/metrics").text
    assert seen["jobs"] <= slots and seen["active"] <= slots and seen["low"] >= 0, seen
    assert seen["jobs"] >= 1
    assert 'moe2edge_cancelled_generations_total{reason="client_disconnected"}' in metrics


def test_slot_count_never_goes_negative_under_concurrent_release(caplog) -> None:
    """16 threads release the same slots at once (thread switches every microsecond): each
    slot is given back once, hands over to exactly one waiter, and the count ends at 0."""
    import sys

    from moe2edge.runtime.server.scheduler import Scheduler

    async def main() -> None:
        scheduler = Scheduler(slots=2, queue=4)
        first, second = await scheduler.acquire(), await scheduler.acquire()
        waiters = [asyncio.ensure_future(scheduler.acquire()) for _ in range(2)]
        await asyncio.sleep(0)
        assert scheduler.queued == 2

        def release_from_threads(slot) -> None:
            barrier = threading.Barrier(16)

            def go() -> None:
                barrier.wait()
                slot.release()

            threads = [threading.Thread(target=go) for _ in range(16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            await asyncio.to_thread(release_from_threads, first)
            await asyncio.sleep(0.05)  # the loop runs the handed-over releases
            assert sum(w.done() for w in waiters) == 1 and scheduler.active == 2
            await asyncio.to_thread(release_from_threads, second)
            await asyncio.sleep(0.05)
            assert all(w.done() for w in waiters) and scheduler.active == 2
            for waiter in waiters:
                await asyncio.to_thread(release_from_threads, waiter.result())
            await asyncio.sleep(0.05)
        finally:
            sys.setswitchinterval(interval)
        assert scheduler.active == 0 and scheduler.queued == 0

    with caplog.at_level("ERROR"):
        asyncio.run(main())
    assert not [r for r in caplog.records if "not held" in r.getMessage()]


def _sample(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_expose_latency_histograms_occupancy_and_speculation(fast_generator) -> None:
    app = create_app(ServerConfig(voice_enabled=False, slots=3), generator=fast_generator)
    with ServerThread(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        before = httpx.get(srv.url + "/metrics").text
        assert _sample(before, "moe2edge_time_to_first_token_seconds_count") == 0

        def ask(prompt: str) -> int:
            reply = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": prompt}], max_tokens=6
            )
            return reply.usage.completion_tokens

        with ThreadPoolExecutor(3) as pool:
            tokens = sum(pool.map(ask, BATCH_PROMPTS[:3]))
        app.state.service.metrics.count_speculation(proposed=5, accepted=3)
        metrics = httpx.get(srv.url + "/metrics").text
    assert _sample(metrics, "moe2edge_time_to_first_token_seconds_count") == 3
    assert _sample(metrics, "moe2edge_queue_wait_seconds_count") == 3
    assert _sample(metrics, "moe2edge_request_seconds_count") == 3
    assert _sample(metrics, "moe2edge_inter_token_latency_seconds_count") == tokens - 3
    assert _sample(metrics, "moe2edge_request_seconds_sum") > 0
    assert 'moe2edge_inter_token_latency_seconds_bucket{le="0.005"}' in metrics
    assert _sample(metrics, "moe2edge_batch_rows") == 3
    assert _sample(metrics, "moe2edge_batch_rows_in_use") == 0
    assert _sample(metrics, "moe2edge_batch_occupancy_rows_count") >= 1
    assert _sample(metrics, "moe2edge_spec_proposed_tokens_total") == 5
    assert _sample(metrics, "moe2edge_spec_accepted_tokens_total") == 3
    with pytest.raises(ValueError, match="accepted"):
        app.state.service.metrics.count_speculation(proposed=1, accepted=2)


def test_a_non_streaming_client_that_hangs_up_frees_its_slot(generator) -> None:
    """One slot, 30 ms per decode step: the 100-token reply would hold it for 3 s."""
    with text_server(generator, slots=1, queue=0, _hook=lambda: time.sleep(0.03)) as srv:
        body = {
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 100,
            "temperature": 1.0,
            "seed": 1,
        }
        payload = json.dumps(body).encode()
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            f"application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode()
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
                sock.sendall(head + payload)
                started = time.perf_counter()
                while c.get("/health").json()["active"] == 0:  # the request got its slot
                    assert time.perf_counter() - started < 5
                    time.sleep(0.005)
                time.sleep(0.1)  # mid-reply
            closed = time.perf_counter()
            while c.get("/health").json()["active"] != 0:
                assert time.perf_counter() - closed < 1.0, "slot still held 1 s after hang-up"
                time.sleep(0.01)
            metrics = c.get("/metrics").text
        assert 'moe2edge_cancelled_generations_total{reason="client_disconnected"} 1.0' in metrics
