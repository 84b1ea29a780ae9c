"""Conversations: incremental prefill, the shared system prefix, partial transcripts, cancel,
several turns, on both graph flavours."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from moe2edge.runtime import Generator, SamplingParams
from moe2edge.runtime.session import Conversation, PrefixStore, shared_prefixes
from tests._runtime_common import fast_bundles

SYSTEM = "you are the assistant of a smart home; answer briefly"
GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module", params=["optimum", "fast"])
def gen(request, tiny_run):
    if request.param == "optimum":
        return Generator.from_bundle(tiny_run["bundle"], threads=1)
    return Generator.from_bundle(
        fast_bundles(tiny_run["root"], tiny_run["tokenizer"])["fp32"], threads=1
    )


def one_shot(gen: Generator, ids: list[int], steps: int = 8) -> tuple[np.ndarray, list[int]]:
    """Logits after ``ids`` and the greedy continuation, from a fresh cache in one prefill."""
    cache = gen.engine.new_cache()
    logits = first = gen.engine.forward(ids, cache)
    out = []
    for _ in range(steps):
        out.append(int(logits.argmax()))
        logits = gen.engine.forward([out[-1]], cache)
    return first, out


def test_incremental_append_equals_one_shot_prefill(gen):
    conv = Conversation(gen, system=SYSTEM, prefixes=PrefixStore())
    chunks = ["<user>", " turn on", " the", " kitchen lights", " <assistant>"]
    stats = [conv.append(c) for c in chunks]
    assert all(s.tokens > 0 and s.ms > 0 for s in stats)
    assert sum(s.tokens for s in stats) == conv.length - len(conv.prefix_tokens)
    logits, greedy = one_shot(gen, conv.tokens)
    assert np.abs(conv._logits - logits).max() <= 1e-4
    reply = conv.reply(GREEDY)
    assert reply.token_ids == greedy
    assert reply.prompt_tokens == 0 and reply.ttft_ms > 0 and reply.decode_ms > 0


def test_cached_system_prefix_equals_recomputing_it(gen):
    store = PrefixStore()
    first = Conversation(gen, system=SYSTEM, prefixes=store)
    second = Conversation(gen, system=SYSTEM, prefixes=store)
    assert (store.misses, store.hits) == (1, 1)
    a = first.say("turn on the kitchen lights", GREEDY)
    b = second.say("turn on the kitchen lights", GREEDY)
    # recompute everything in one prefill, no store involved
    ids = second.tokens[: len(second.tokens) - len(b.token_ids)]
    _, greedy = one_shot(gen, ids)
    assert a.token_ids == b.token_ids == greedy
    # the stored prefix was not disturbed by either conversation writing after it
    third = Conversation(gen, system=SYSTEM, prefixes=store)
    assert third.say("turn on the kitchen lights", GREEDY).token_ids == greedy
    assert shared_prefixes(gen.engine) is shared_prefixes(gen.engine)


def test_partial_transcripts_rewind_and_match_the_final_prompt(gen):
    conv = Conversation(gen, system=SYSTEM, prefixes=PrefixStore())
    conv.user_turn("turn", final=False)
    conv.user_turn("turn on the kitten", final=False)
    revised = conv.user_turn("turn on the kitchen", final=False)  # the recogniser changed a word
    assert revised.rewound >= 1 and revised.tokens >= 1
    last = conv.user_turn("turn on the kitchen lights", final=True)
    assert last.tokens < 8  # only the new words and the template's tail ran at the end
    expected = conv.prefix_tokens + gen.encode(
        gen.prompt_template.format(prompt="turn on the kitchen lights")
    )
    assert conv.tokens == expected
    _, greedy = one_shot(gen, expected)
    assert conv.reply(GREEDY).token_ids == greedy


def test_second_turn_continues_the_conversation(gen):
    conv = Conversation(gen, system=SYSTEM, prefixes=PrefixStore())
    first = conv.say("turn on the kitchen lights", GREEDY)
    assert conv.tokens[-len(first.token_ids) :] == first.token_ids
    turn = conv.user_turn("and the office")
    # the first reply's last token (never run by its decode loop) runs with the new turn
    assert turn.tokens == 1 + len(gen.encode(gen.prompt_template.format(prompt="and the office")))
    second = conv.reply(GREEDY)
    assert second.prompt_tokens == 0  # everything was already prefilled
    history = conv.tokens[: len(conv.tokens) - len(second.token_ids)]
    _, greedy = one_shot(gen, history)
    assert second.token_ids == greedy


def test_cancel_stops_a_reply_between_steps(gen):
    conv = Conversation(gen, system=SYSTEM, prefixes=PrefixStore())
    conv.user_turn("turn on the kitchen lights")
    seen = []

    def on_text(piece: str) -> None:
        seen.append(piece)
        if len(seen) == 2:
            threading.Thread(target=conv.cancel).start()

    result = conv.reply(SamplingParams(max_new_tokens=60, ignore_eos=True), on_text=on_text)
    assert result.finish_reason == "cancelled"
    assert 2 <= len(result.token_ids) < 60
    # the conversation is still usable after a cancelled reply
    assert len(conv.say("hello", GREEDY).token_ids) == 8


def test_rewind_and_errors(gen):
    conv = Conversation(gen, system=SYSTEM, prefixes=PrefixStore())
    with pytest.raises(ValueError, match="rewind"):
        conv.rewind(0)  # not into the shared system prefix
    conv.append(" turn on the lights")
    n = conv.length
    conv.append(" please")
    conv.rewind(n)
    _, greedy = one_shot(gen, conv.tokens)
    assert conv.reply(GREEDY).token_ids == greedy
    empty = Conversation(gen, prefixes=PrefixStore())
    if gen.bos_token_id is None:
        with pytest.raises(ValueError, match="empty"):
            empty.reply(GREEDY)
