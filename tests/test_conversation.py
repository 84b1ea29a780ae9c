"""One conversation mechanism: a reply stream left early, copy on write of shared KV
storage, the chat rendering the HTTP API and voice share, and a voice session that
remembers its last turns (real VoiceSession, real bundle, real generation)."""

from __future__ import annotations

import numpy as np
import pytest

from moe2edge.runtime import GenerationResult, Generator, SamplingParams
from moe2edge.runtime.session import Conversation, PrefixStore, render_chat
from moe2edge.runtime.voice.pipeline import VoiceSession
from moe2edge.runtime.voice.settings import VoiceSettings
from moe2edge.runtime.voice.tts import Synthesizer
from tests._runtime_common import fast_bundles

GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)
LONG = SamplingParams(max_new_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def gen(tiny_run) -> Generator:
    return Generator.from_bundle(tiny_run["bundle"], threads=1)


@pytest.fixture(scope="module")
def fast_gen(tiny_run) -> Generator:
    """A shared-buffer (in-place KV) bundle: the flavour whose caches share storage."""
    bundle = fast_bundles(tiny_run["root"], tiny_run["tokenizer"])["fp32"]
    return Generator.from_bundle(bundle, threads=1)


def greedy_after(gen: Generator, ids: list[int], params: SamplingParams = GREEDY) -> list[int]:
    """The greedy reply to ``ids`` prefilled at once into a fresh cache."""
    result = GenerationResult()
    for _ in gen.stream(list(ids), params, result=result):
        pass
    return result.token_ids


# --- a stream the caller leaves early -------------------------------------------------


@pytest.mark.parametrize("flavour", ["optimum", "fast"])
def test_breaking_out_of_a_stream_leaves_a_consistent_conversation(gen, fast_gen, flavour):
    g = gen if flavour == "optimum" else fast_gen
    conv = Conversation(g, prefixes=PrefixStore())
    conv.user_turn("turn on the kitchen lights")
    prompt = conv.tokens
    result, pieces = GenerationResult(), []
    for piece in conv.stream(LONG, result):
        pieces.append(piece)
        if len(pieces) == 2:
            break
    assert len(pieces) == 2 and "".join(pieces) == result.text
    assert result.finish_reason == "cancelled" and 2 <= len(result.token_ids) < 40
    # the conversation holds the prompt and exactly the tokens chosen (the last one pending)
    assert conv.tokens == prompt + result.token_ids
    assert conv.length == conv.cache.length + 1 == len(conv.cache.tokens) + 1
    assert result.token_ids == greedy_after(g, prompt, LONG)[: len(result.token_ids)]
    # the conversation goes on, and says what a fresh one with the same history says
    conv.user_turn("and the office")
    history = conv.tokens
    assert history[: len(prompt) + len(result.token_ids)] == prompt + result.token_ids
    second = conv.reply(GREEDY)
    fresh = Conversation(g, prefixes=PrefixStore())
    fresh.sync(history)
    assert second.token_ids == fresh.reply(GREEDY).token_ids == greedy_after(g, history)


def test_a_stream_left_open_is_ended_by_the_next_call(gen):
    conv = Conversation(gen, prefixes=PrefixStore())
    conv.user_turn("turn on the kitchen lights")
    prompt = conv.tokens
    result = GenerationResult()
    stream = conv.stream(LONG, result)  # the caller keeps the generator and stops reading
    next(stream), next(stream)
    conv.user_turn("and the office")  # closes the stream first: its bookkeeping runs
    assert result.finish_reason == "cancelled"
    assert list(stream) == []
    chosen = prompt + result.token_ids
    history = conv.tokens
    assert history[: len(chosen)] == chosen
    assert conv.reply(GREEDY).token_ids == greedy_after(gen, history)


# --- copy on write of shared storage --------------------------------------------------


def test_a_cache_that_moved_off_shared_storage_no_longer_claims_it(fast_gen):
    engine = fast_gen.engine
    ids = fast_gen.encode_prompt("turn on the kitchen lights")
    original = engine.new_cache()
    engine.forward(ids, original)
    shared = original.storage
    copy = original.copy()
    assert set(shared.sharers) == {original, copy}
    engine.forward([5], original)  # in place: the copy holds nothing past the prefix
    engine.forward([6], copy)  # the original holds that position: the copy takes its own
    assert original.storage is shared and copy.storage is not shared
    assert copy not in shared.sharers and set(shared.sharers) == {original}
    engine.forward([7, 8], copy)  # the copy now reaches further than the original
    engine.forward([9], original)  # alone on its storage: written in place, nothing copied
    assert original.storage is shared
    # neither was corrupted by the other's writes
    for cache, nxt in ((original, 10), (copy, 11)):
        expected = engine.forward(cache.tokens + [nxt], engine.new_cache())
        assert np.abs(engine.forward([nxt], cache) - expected).max() <= 1e-4
    assert original.tokens == ids + [5, 9, 10] and copy.tokens == ids + [6, 7, 8, 11]


# --- the chat format ------------------------------------------------------------------


def test_chat_rendering_equals_the_text_template(gen):
    """Messages encoded one by one give the ids the whole rendered text encodes to (the
    HTTP API's prompts before it ran on Conversation)."""
    messages = [
        ("system", "you are a home assistant"),
        ("user", "turn on the kitchen lights"),
        ("assistant", "[lights.on room=kitchen] the kitchen lights are on."),
        ("user", "and dim the office lights to forty percent"),
    ]
    end = gen.tokenizer.id_to_token(gen.eos_token_ids[0])
    text = (
        gen.prompt_template.format(prompt=f"{messages[0][1]}\n{messages[1][1]}")
        + f" {messages[2][1]}{end}"
        + gen.prompt_template.format(prompt=messages[3][1])
    )
    ids = render_chat(gen, messages)
    assert ids == gen.encode_prompt(text, template=False)
    assert ids[: len(render_chat(gen, messages[:3]))] == render_chat(gen, messages[:3])
    with pytest.raises(ValueError, match="role"):
        render_chat(gen, [("tool", "x")])


# --- a voice session that remembers ---------------------------------------------------


class ScriptedRecognizer:
    """Hears the next of ``utterances``: one word more with every frame."""

    def __init__(self, utterances: list[str]) -> None:
        self.utterances, self.words, self.heard = list(utterances), [], 0

    def start_utterance(self) -> None:
        self.words, self.heard = self.utterances.pop(0).split(), 0

    def feed(self, audio) -> str | None:
        if self.heard == len(self.words):
            return None
        self.heard += 1
        return " ".join(self.words[: self.heard])

    def finish(self) -> str:
        return " ".join(self.words)


class Blip(Synthesizer):
    def synthesize(self, text: str) -> np.ndarray:
        return np.full(160, 0.1, dtype=np.float32)  # 10 ms per phrase


UTTERANCES = [
    "turn on the kitchen lights",
    "dim the office lights",
    "lock the garage door",
    "what is the temperature",
    "switch off the fan",
]


def test_a_voice_session_keeps_its_last_turns(gen):
    events: list[dict] = []
    settings = VoiceSettings(
        turn_detection=False, speculate=False, max_new_tokens=8, history_turns=2
    )
    session = VoiceSession(
        gen, ScriptedRecognizer(UTTERANCES), Blip(), events.append, settings=settings
    ).start()
    turns: list[tuple[str, str]] = []  # (user, reply) as the session said them
    prompts, kv, timings = [], [], []
    try:
        for utterance in UTTERANCES:
            if len(turns) == 4:
                session.update(history_turns=0)  # from now on, every utterance afresh
            for _ in range(8):
                session.push_audio(bytes(640))
            session.commit()
            assert session.wait_idle(30)
            reply = session.reply
            assert reply is not None and reply.status in ("completed", "incomplete")
            assert reply.result.text, "the tiny model said nothing: pick other utterances"
            prompts.append(reply.prompt_ids)
            kv.append(reply.conversation.tokens)
            timings.append([e for e in events if e["type"] == "turn.timings"][-1])
            turns.append((utterance, reply.result.text))
    finally:
        session.close()

    def chat(history: list[tuple[str, str]], user: str | None) -> list[int]:
        messages = [m for u, r in history for m in (("user", u), ("assistant", r))]
        return render_chat(gen, messages + ([("user", user)] if user is not None else []))

    decode = gen.tokenizer.decode
    assert prompts[0] == gen.encode_prompt(UTTERANCES[0])
    # turn 2's prompt, and its KV cache, hold turn 1's words and reply in the chat format
    assert prompts[1] == chat(turns[:1], UTTERANCES[1])
    assert kv[1][: len(prompts[1])] == prompts[1]
    assert UTTERANCES[0] in decode(prompts[1]) and turns[0][1].strip() in decode(prompts[1])
    # the history was in the cache before the turn ended (prefilled while it was spoken)
    assert timings[1]["prefilled_tokens"] > len(chat(turns[:1], None))
    # the bound: turn 4 remembers turns 2 and 3, not turn 1
    assert prompts[2] == chat(turns[:2], UTTERANCES[2])
    assert prompts[3] == chat(turns[1:3], UTTERANCES[3])
    assert UTTERANCES[0] not in decode(prompts[3])
    # history_turns=0: the old behaviour, every utterance on its own
    assert prompts[4] == gen.encode_prompt(UTTERANCES[4])
    # every reply is what the bundle says to that prompt from a fresh cache
    for prompt, (_, text) in zip(prompts, turns, strict=True):
        assert text == "".join(gen.stream(prompt, SamplingParams(max_new_tokens=8)))
