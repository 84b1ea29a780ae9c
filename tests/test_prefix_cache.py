"""Prefix reuse across requests (runtime/prefix_cache.py): a chat's next turn continues from
the cache of the last one and prefills only its new tokens; the output is the same as
without reuse; the bytes held stay under the bound (LRU); threads share entries safely; the
HTTP API reports the reused tokens as ``usage.prompt_tokens_details.cached_tokens``."""

from __future__ import annotations

import threading

import numpy as np
import openai
import pytest

from moe2edge.runtime import GenerationResult, Generator, SamplingParams
from moe2edge.runtime.prefix_cache import PrefixCache, conversation_for, kv_bytes
from moe2edge.runtime.server import ServerConfig, create_app
from moe2edge.runtime.session import Conversation, render_chat
from moe2edge.runtime.speculative import SpeculationConfig
from tests._runtime_common import fast_bundles
from tests.server_helpers import ServerThread

USER_TURNS = [
    "turn on the kitchen lights",
    "and the fan in the office",
    "dim the office lights to forty percent",
    "what about the basement",
]
PARAMS = SamplingParams(max_new_tokens=10)


@pytest.fixture(scope="module", params=["concat", "fast"])
def gen(request, tiny_run) -> Generator:
    if request.param == "concat":
        return Generator.from_bundle(tiny_run["bundle"], threads=1)
    bundle = fast_bundles(tiny_run["root"], tiny_run["tokenizer"])["fp32"]
    return Generator.from_bundle(bundle, threads=1)


def fresh_reply(gen: Generator, prompt: list[int]) -> tuple[GenerationResult, np.ndarray]:
    conversation = Conversation(gen)
    conversation.sync(prompt)
    logits = conversation._logits.copy()
    return conversation.reply(PARAMS), logits


def chat_turns(gen: Generator, prefixes: PrefixCache | None, first: str = "", turns: int = 4):
    """A four-turn chat as an API client sends it (the whole history every turn): per turn,
    (prompt, reply, tokens reused, tokens prefilled, logits before the reply)."""
    messages, out = [], []
    for text in USER_TURNS[:turns]:
        messages.append(("user", f"{first} {text}".strip()))
        prompt = render_chat(gen, messages)
        conversation = conversation_for(gen, prefixes, prompt)
        reused = conversation.length
        conversation.sync(prompt)
        logits = conversation._logits.copy()
        reply = conversation.reply(PARAMS)
        out.append((prompt, reply, reused, conversation.prefill_tokens, logits))
        if prefixes is not None:
            prefixes.insert(conversation.cache)
        messages.append(("assistant", reply.text))
    return out


def test_reuse_gives_the_output_without_it_and_prefills_only_new_tokens(gen):
    prefixes = PrefixCache(64 << 20)
    turns = chat_turns(gen, prefixes)
    for n, (prompt, reply, reused, prefilled, logits) in enumerate(turns):
        want, want_logits = fresh_reply(gen, prompt)
        assert reply.token_ids == want.token_ids and reply.text == want.text
        np.testing.assert_allclose(logits, want_logits, atol=1e-4)
        assert reused + prefilled == len(prompt)
        if n:  # the last turn's prompt and reply came from the cache
            previous_prompt = turns[n - 1][0]
            assert reused >= len(previous_prompt)
            assert prefilled <= len(prompt) - len(previous_prompt)
    assert prefixes.hits >= len(USER_TURNS) - 1
    # an entry is dropped when the next one starts with it; a reply re-encoded from its text
    # may differ from the tokens generated, and then both stay (the older one is LRU)
    assert 1 <= len(prefixes) <= len(USER_TURNS)


def test_lookup_takes_the_longest_common_prefix(gen):
    prefixes = PrefixCache(64 << 20)
    a = gen.encode_prompt("turn on the kitchen lights")
    b = gen.encode_prompt("turn on the office fan")
    for ids in (a, b):
        cache = gen.engine.new_cache()
        gen.engine.forward(ids, cache)
        prefixes.insert(cache)
    assert len(prefixes) == 2
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    hit = prefixes.lookup(b[:shared] + [7, 7])
    assert hit is not None and hit.tokens == b[:shared]
    assert prefixes.lookup(a).tokens == a[:-1]  # the last token runs: its logits are needed
    assert prefixes.lookup([12345 % gen.engine.vocab_size, 3]) is None
    # a longer continuation replaces the entry it starts with
    cache = gen.engine.new_cache()
    gen.engine.forward(a + [5, 6], cache)
    prefixes.insert(cache)
    assert len(prefixes) == 2 and prefixes.lookup(a + [5, 6, 7]).tokens == a + [5, 6]
    # and an entry that a kept one already covers is not added
    prefixes.insert(hit)
    assert len(prefixes) == 2


def test_eviction_keeps_the_bytes_under_the_bound(gen):
    prompts = [[100 + i, *range(20, 32)] for i in range(5)]  # the same length, no shared prefix
    one = gen.engine.new_cache()
    gen.engine.forward(prompts[0], one)
    per_entry = kv_bytes([one])
    kv = gen.engine.kv
    positions = gen.engine.max_length if gen.engine.shared_buffer else len(prompts[0])
    layer_bytes = kv["num_kv_heads"] * positions * kv["head_dim"] * 4
    assert per_entry == 2 * kv["num_layers"] * layer_bytes  # keys and values of every layer
    prefixes = PrefixCache(int(2.5 * per_entry))
    for i, prompt in enumerate(prompts):
        cache = gen.engine.new_cache()
        gen.engine.forward(prompt, cache)
        prefixes.insert(cache)
        assert prefixes.bytes <= prefixes.max_bytes and len(prefixes) <= 2
        if i == 1:
            assert prefixes.lookup(prompts[0]).tokens == prompts[0][:-1]  # a use: now recent
    # 0 and 1 in; 0 used; 2 evicts 1 (the least recently used); 3 evicts 0; 4 evicts 2
    assert prefixes.evictions == 3 and [p in prefixes for p in prompts] == [0, 0, 0, 1, 1]
    too_small = PrefixCache(per_entry // 2)
    too_small.insert(one)
    assert len(too_small) == 0 and too_small.bytes == 0
    off = PrefixCache(0)
    off.insert(one)
    assert len(off) == 0


def test_threads_share_entries_safely(gen):
    """Four threads run chats that share their opening (one entry, many copies writing past
    it at once); every reply is the one a fresh conversation gives."""
    prefixes = PrefixCache(64 << 20)
    openings = ["hello there", "hello there, please"]
    expected = {o: [r.token_ids for _, r, *_ in chat_turns(gen, None, o, 3)] for o in openings}
    errors, done = [], []

    def worker(opening: str) -> None:
        try:
            for _ in range(6):
                got = [r.token_ids for _, r, *_ in chat_turns(gen, prefixes, opening, 3)]
                assert got == expected[opening]
                done.append(opening)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(openings[i % 2],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(done) == 24 and prefixes.hits > 24


def test_http_chat_reports_cached_tokens(tiny_run):
    """Turn 2 of a chat through the real server and the openai client: the same reply with
    and without reuse, and with reuse the history's tokens are reported as cached."""
    gen = Generator.from_bundle(tiny_run["bundle"], threads=1)
    ngram = gen.with_speculation(SpeculationConfig("ngram"))
    replies = {}
    for label, generator, mb in [("reuse", gen, 64), ("none", gen, 0), ("spec", ngram, 64)]:
        config = ServerConfig(voice_enabled=False, prefix_cache_mb=mb)
        with ServerThread(create_app(config, generator=generator)) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
            messages = [{"role": "user", "content": USER_TURNS[0]}]
            first = client.chat.completions.create(model="m", messages=messages, max_tokens=8)
            messages += [
                {"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": USER_TURNS[1]},
            ]
            second = client.chat.completions.create(
                model="m",
                messages=messages,
                max_tokens=8,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = list(second)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            replies[label] = (first, text, chunks[-1].usage)
    first, text, usage = replies["reuse"]
    plain_first, plain_text, plain_usage = replies["none"]
    assert first.choices[0].message.content == plain_first.choices[0].message.content
    assert text == plain_text
    assert usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens
    assert plain_usage.prompt_tokens_details.cached_tokens <= 1  # the shared BOS only
    assert first.usage.prompt_tokens_details.cached_tokens <= 1
    spec_first, spec_text, spec_usage = replies["spec"]
    assert spec_first.choices[0].message.content == first.choices[0].message.content
    assert spec_text == text
    assert (
        spec_usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens_details.cached_tokens
    )
