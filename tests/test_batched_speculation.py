"""Speculative decoding and prefix reuse inside continuous batching (server/batching.py),
through the real HTTP server: greedy replies with speculation (prompt lookup, a draft model)
equal plain decoding for concurrent requests; the choice of rows that verify follows the
tokens per run; a chat's next turn reuses the last one's KV and replies as without it."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from moe2edge.runtime import Generator, SamplingParams
from moe2edge.runtime.server import ServerConfig, create_app
from moe2edge.runtime.server.batching import BatchLoop
from moe2edge.runtime.speculative import SpeculationConfig
from tests._runtime_common import fast_bundles
from tests.server_helpers import ServerThread

CHAT = ["turn on the kitchen lights", "and the fan in the office", "what about the basement"]
ASKS = [
    "turn on the kitchen lights",
    "hello",
    "dim the office lights to forty percent and close the blinds in the bedroom please",
    "what is the temperature",
    "lock the front door",
]
MAX_TOKENS = [20, 12, 24, 16, 20]


@pytest.fixture(scope="module")
def fast(tiny_run):
    return fast_bundles(tiny_run["root"], tiny_run["tokenizer"])


@pytest.fixture(scope="module")
def plain(fast) -> Generator:
    return Generator.from_bundle(fast["fp32"], threads=1)


def _ask_all(url: str) -> list[dict]:
    """The ``ASKS`` at once (streaming and not, alternately): text and usage of each."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)

    def ask(i: int) -> dict:
        body = dict(
            model="m", messages=[{"role": "user", "content": ASKS[i]}], max_tokens=MAX_TOKENS[i]
        )
        if i % 2:
            reply = client.chat.completions.create(**body)
            return {"text": reply.choices[0].message.content, "usage": reply.usage}
        chunks = list(
            client.chat.completions.create(
                stream=True, stream_options={"include_usage": True}, **body
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return {"text": text, "usage": chunks[-1].usage}

    with ThreadPoolExecutor(len(ASKS)) as pool:
        return list(pool.map(ask, range(len(ASKS))))


def _counter(metrics: str, name: str) -> float:
    return float(re.search(rf"^{name}_total (\S+)$", metrics, re.M).group(1))


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_speculative_batched_replies_equal_plain_decoding(plain, fast, method) -> None:
    """Five concurrent greedy requests through 3 rows with speculative decoding (prompt
    lookup; or the INT4 twin as the FP32 bundle's draft): every reply is the one plain
    decoding gives, rows verified drafts together (several rows, several tokens each in one
    step), and per-request acceptance adds up to the /metrics counters."""
    expected = [
        plain.generate(p, SamplingParams(max_new_tokens=n)).text
        for p, n in zip(ASKS, MAX_TOKENS, strict=True)
    ]
    speculation = SpeculationConfig(method, fast["int4"] if method == "draft" else None)
    draft = Generator.from_bundle(fast["fp32"], threads=1, speculation=speculation)
    app = create_app(ServerConfig(voice_enabled=False, slots=3, queue=8), generator=draft)
    with ServerThread(app) as srv:
        replies = _ask_all(srv.url)
        metrics = httpx.get(srv.url + "/metrics").text
    loop = app.state.service.batching
    assert [r["text"] for r in replies] == expected
    assert loop.most_rows >= 2 and loop.verified > 0, (
        "the rows never shared a step, or never verified"
    )
    accepted = sum(r["usage"].completion_tokens_details.accepted_prediction_tokens for r in replies)
    rejected = sum(r["usage"].completion_tokens_details.rejected_prediction_tokens for r in replies)
    assert accepted > 0
    assert _counter(metrics, "moe2edge_spec_accepted_tokens") == accepted
    assert _counter(metrics, "moe2edge_spec_proposed_tokens") == accepted + rejected


def test_sampled_speculation_in_the_batch_follows_the_seed(fast) -> None:
    """Sampled requests with prompt lookup: a seed gives the same reply twice alone, and
    sampled rows run among others to their end (the distribution is tested in
    test_speculative.py; which steps verify decides how the seed's draws are used, so a
    seeded reply among others may differ from the one alone)."""
    gen = Generator.from_bundle(fast["fp32"], threads=1, speculation=SpeculationConfig("ngram"))
    app = create_app(ServerConfig(voice_enabled=False, slots=3), generator=gen)
    body = dict(model="m", max_tokens=20, temperature=0.9, seed=7, extra_body={"top_k": 40})
    with ServerThread(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)

        def ask(text: str):
            messages = [{"role": "user", "content": text}]
            return client.chat.completions.create(messages=messages, **body)

        first, again = ask(ASKS[0]), ask(ASKS[0])
        with ThreadPoolExecutor(3) as pool:
            together = list(pool.map(ask, ASKS[:3]))
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.usage.completion_tokens_details.accepted_prediction_tokens >= 0
    for reply in together:
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.completion_tokens >= 1


@pytest.mark.parametrize("method", ["off", "ngram"])
def test_next_chat_turn_reuses_the_cache_and_replies_the_same(plain, fast, method) -> None:
    """A three-turn chat through the batched server, with and without the prefix cache:
    the same replies; with it, turns 2 and 3 report their history as cached tokens."""
    gen = plain.with_speculation(SpeculationConfig(method))
    runs = {}
    for mb in (64, 0):
        app = create_app(ServerConfig(voice_enabled=False, prefix_cache_mb=mb), generator=gen)
        with ServerThread(app) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
            messages, turns = [], []
            for text in CHAT:
                messages.append({"role": "user", "content": text})
                reply = client.chat.completions.create(model="m", messages=messages, max_tokens=8)
                content = reply.choices[0].message.content
                turns.append((content, reply.usage))
                messages.append({"role": "assistant", "content": content})
        runs[mb] = turns
        if mb:
            assert app.state.service.prefix_cache.hits >= 2
    assert [t for t, _ in runs[64]] == [t for t, _ in runs[0]]
    cached = [u.prompt_tokens_details.cached_tokens for _, u in runs[64]]
    assert cached[0] == 0 and all(u.prompt_tokens_details.cached_tokens == 0 for _, u in runs[0])
    for (_, usage), (_, previous) in zip(runs[64][1:], runs[64], strict=False):
        assert previous.prompt_tokens <= usage.prompt_tokens_details.cached_tokens
        assert usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens


class _Row:
    """What ``BatchLoop._speculating`` reads of a job."""

    def __init__(self, expected: float, room: int = 8, speculates: bool = True):
        self.expected_accepted, self.speculator = expected, object() if speculates else None
        self.cache = None
        self.decoding = type("D", (), {"draft_limit": lambda _self, _cache: room})()


def test_rows_verify_alone_only_when_it_gives_more_tokens_per_run() -> None:
    pick = BatchLoop._speculating
    alone = _Row(0.2)
    assert pick([alone]) == [alone]  # one row: a verify costs no more than its decode step
    good, poor = _Row(5.0), _Row(0.5)
    assert pick([poor, good, _Row(0.5)]) == [good]  # (3 + 5) / 2 runs beats 3 in 1 run
    assert pick([good, poor]) == [good, poor]  # the batched run would serve one row only
    assert pick([poor, _Row(0.5)]) == []  # 2 tokens per run beat (2 + 1) / 2
    rows = [_Row(3.0) for _ in range(3)]
    assert pick(rows) == rows  # (3 + 9) / 3 runs: 4 per run, over 3 batched
    assert pick([_Row(9.0, room=0), _Row(9.0, speculates=False)]) == []
