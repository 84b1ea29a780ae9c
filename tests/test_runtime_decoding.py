"""Decoding: sampling semantics (against transformers' logits processors), seeds, stop strings
and tokens, limits, context overflow, and streaming detokenization of multi-token characters."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moe2edge.runtime import ContextOverflowError, GenerationResult, Generator, SamplingParams
from moe2edge.runtime.detokenize import StreamDecoder
from moe2edge.runtime.generate import StopMatcher
from moe2edge.runtime.sampling import Sampler, apply_repetition_penalty, filtered_probs
from tests._runtime_common import fast_bundles

ASCII_TEXT = ["turn on the kitchen lights", "set the thermostat to twenty degrees"] * 20
UNICODE = "café naïve 🙂 über 日本 ok 👍🏽!"


def byte_level_tokenizer() -> Tokenizer:
    """Byte-level BPE trained on ASCII only: every non-ASCII character spans several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(ASCII_TEXT, trainer)
    return tok


def metaspace_tokenizer() -> Tokenizer:
    """SentencePiece-style: ``▁`` marks spaces, characters outside the vocabulary fall back
    to byte tokens, and a decode drops the leading space (like Llama 2's tokenizer)."""
    pieces = ["<unk>", *(f"<0x{b:02X}>" for b in range(256)), "▁", *"abcdefghijklmnopqrstuvwxyz!"]
    vocab = {p: i for i, p in enumerate(pieces)}
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return tok


@pytest.mark.parametrize("make", [byte_level_tokenizer, metaspace_tokenizer])
def test_stream_decoder_never_splits_a_character(make):
    tok = make()
    ids = tok.encode(UNICODE).ids
    assert tok.decode(ids) == UNICODE
    assert len(ids) > len(UNICODE.split()) * 2  # characters really span several tokens
    decoder = StreamDecoder(tok, strip_leading_space=False)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == UNICODE
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p == "") >= 5  # bytes were held back until complete


def test_stream_decoder_strips_only_the_replys_leading_space():
    tok = byte_level_tokenizer()
    ids = tok.encode("  turn on  the lights").ids
    decoder = StreamDecoder(tok)
    text = "".join(decoder.push(i) for i in ids) + decoder.flush()
    assert text == "turn on  the lights" == decoder.text


def test_stop_matcher_holds_back_a_stop_string_spanning_pieces():
    m = StopMatcher(["</s>", "User:"])
    out = [m.push(p) for p in ["Hello", " Us", "e", "r", ": hi"]]
    assert out == [("Hello", False), (" ", False), ("", False), ("", False), ("", True)]
    m = StopMatcher(["User:"])
    assert m.push("Use") == ("", False) and m.push("ful") == ("Useful", False)
    assert m.flush() == ""


def test_sampling_matches_transformers_processors():
    import torch
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng(3)
    logits = rng.normal(size=50).astype(np.float32) * 3
    previous = [1, 4, 4, 9, 30]
    ours = apply_repetition_penalty(logits, previous, 1.3)
    ids = torch.tensor([previous])
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(ids, torch.tensor(logits)[None])[0].numpy()
    assert np.allclose(ours, theirs, atol=1e-5)
    scores = torch.tensor(logits, dtype=torch.float64)[None]
    for proc in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(10), TopPLogitsWarper(0.8)):
        scores = proc(None, scores)
    want = torch.softmax(scores, -1)[0].numpy()
    got = filtered_probs(logits, 0.7, 10, 0.8)
    assert np.allclose(got, want, atol=1e-9)
    assert (got > 0).sum() < 10


def test_seeded_sampling_is_reproducible_and_greedy_is_argmax():
    logits = np.random.default_rng(0).normal(size=200).astype(np.float32)

    def draw(seed: int) -> int:
        return Sampler(SamplingParams(temperature=1.0, seed=seed))(logits, [])

    a = Sampler(SamplingParams(temperature=1.2, top_p=0.95, seed=7))
    b = Sampler(SamplingParams(temperature=1.2, top_p=0.95, seed=7))
    assert [a(logits, []) for _ in range(30)] == [b(logits, []) for _ in range(30)]
    assert len({draw(s) for s in range(20)}) > 3
    assert Sampler(SamplingParams())(logits, []) == int(logits.argmax())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0).validate()


@pytest.fixture(scope="module")
def gen(tiny_run):
    bundles = fast_bundles(tiny_run["root"], tiny_run["tokenizer"])
    return Generator.from_bundle(bundles["fp32"], threads=1)


def test_seeded_generation_reproduces(gen):

    def params(seed: int) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=12, temperature=1.0, top_k=50, seed=seed, ignore_eos=True
        )

    a, b = gen.generate("hello", params(5)), gen.generate("hello", params(5))
    assert a.token_ids == b.token_ids and a.text == b.text
    others = {tuple(gen.generate("hello", params(s)).token_ids) for s in range(6, 10)}
    assert len(others | {tuple(a.token_ids)}) > 1


def test_streamed_text_equals_the_decoded_reply(gen):
    """Sampling from a random model over a byte-level vocabulary hits multi-byte pieces."""
    for seed in range(4):
        params = SamplingParams(max_new_tokens=24, temperature=2.0, seed=seed, ignore_eos=True)
        result = gen.generate("hello", params)
        pieces = []
        # the same sampled tokens, streamed piece by piece
        decoder = StreamDecoder(gen.tokenizer)
        for t in result.token_ids:
            pieces.append(decoder.push(t))
        pieces.append(decoder.flush())
        full = gen.tokenizer.decode(result.token_ids, skip_special_tokens=True).lstrip(" ")
        assert "".join(pieces) == full == result.text


def test_stop_string_spanning_tokens_and_stop_tokens(gen):
    greedy = SamplingParams(max_new_tokens=12, ignore_eos=True)
    full = gen.generate("turn on the kitchen lights", greedy)
    pieces = [gen.tokenizer.decode([t]) for t in full.token_ids]
    # a stop string made of the end of token 3 and the start of token 4
    stop = pieces[2][-2:] + pieces[3][:2]
    assert len(stop) >= 2
    cut = full.text.find(stop)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, stop=[stop])
    stopped = gen.generate("turn on the kitchen lights", params)
    assert stopped.finish_reason == "stop" and stopped.text == full.text[:cut]
    assert stop not in stopped.text
    # a stop token: the fifth greedy token ends the reply before it
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, stop_token_ids=[full.token_ids[4]])
    first = full.token_ids.index(full.token_ids[4])
    by_token = gen.generate("turn on the kitchen lights", params)
    assert by_token.finish_reason == "stop" and by_token.stop_token == full.token_ids[4]
    assert by_token.token_ids == full.token_ids[:first]
    limited = gen.generate(
        "turn on the kitchen lights", SamplingParams(max_new_tokens=3, ignore_eos=True)
    )
    assert limited.finish_reason == "length" and limited.token_ids == full.token_ids[:3]


def test_context_overflow_and_a_full_context(tiny_run):
    bundles = fast_bundles(tiny_run["root"], tiny_run["tokenizer"])
    gen = Generator.from_bundle(bundles["fp32"], threads=1, max_length=20)
    cache = gen.engine.new_cache()
    with pytest.raises(ContextOverflowError, match="only 19 fit"):
        list(gen.stream(list(range(5, 30)), cache=cache))
    assert cache.length == 0
    params = SamplingParams(max_new_tokens=50, ignore_eos=True)
    result = GenerationResult()
    list(gen.stream(list(range(5, 20)), params, cache=cache, result=result))
    assert result.finish_reason == "length" and len(result.token_ids) == 6
    assert cache.length == 20
