"""Speculative decoding (runtime/speculative.py): with a draft bundle and with prompt lookup,
greedy output is token for token that of plain decoding (real tiny bundles, both graph
flavours, many prompts); sampled output keeps the target's distribution (chi-square tests
that a wrong acceptance rule fails); caches, counters, adaptive draft length, configuration."""

from __future__ import annotations

import argparse
import json
import math
from statistics import NormalDist

import numpy as np
import pytest

from moe2edge.cli import main
from moe2edge.rows import read_rows
from moe2edge.runtime import (
    BundleError,
    GenerationResult,
    Generator,
    RuntimeUserError,
    SamplingParams,
    draft_length,
    speculative,
)
from moe2edge.runtime.engine import open_engine
from moe2edge.runtime.sampling import Sampler
from moe2edge.runtime.server.config import load_server_config
from moe2edge.runtime.session import Conversation
from moe2edge.runtime.speculative import (
    SpeculationConfig,
    accept_greedy,
    accept_sampled,
    check_draft,
    next_draft_length,
    propose_ngram,
)
from tests._runtime_common import fast_bundles
from tests._train_common import train_overrides

NGRAM = SpeculationConfig("ngram", max_draft_tokens=6)


# --- the statistic ------------------------------------------------------------------------


def chi_square(samples: list[tuple], probs: dict[tuple, float]) -> tuple[float, float]:
    """Pearson's statistic of ``samples`` against ``probs`` (cells expected < 5 pooled) and
    its critical value at alpha = 1e-3 (Wilson-Hilferty); inf if a sample has probability 0."""
    n = len(samples)
    counts: dict[tuple, int] = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    if any(probs.get(s, 0.0) <= 0 for s in counts):
        return math.inf, 0.0
    cells, pooled_expected, pooled_observed = [], 0.0, 0
    for cell, p in probs.items():
        if n * p >= 5:
            cells.append((counts.get(cell, 0), n * p))
        else:
            pooled_expected += n * p
            pooled_observed += counts.get(cell, 0)
    if pooled_expected > 0:
        cells.append((pooled_observed, pooled_expected))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    df = len(cells) - 1
    z = NormalDist().inv_cdf(1 - 1e-3)
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat, critical


# --- the acceptance rule on known distributions ---------------------------------------------

V = 5


def table_model(seed: int):
    """p(next | prefix) over V tokens: a fixed random distribution for every prefix."""
    rng, memo = np.random.default_rng(seed), {}

    def p(prefix: tuple) -> np.ndarray:
        if prefix not in memo:
            memo[prefix] = rng.dirichlet(np.ones(V) * 0.7)
        return memo[prefix]

    return p


def always_accept(draft, p, q, rng):  # wrong: the draft's distribution comes out
    return len(draft), int(rng.choice(p.shape[1], p=p[len(draft)]))


def resample_from_p(draft, p, q, rng):  # wrong: on rejection draws from p, not max(0, p - q)
    for i, token in enumerate(draft):
        q_token = 1.0 if q is None else q[i, token]
        if rng.random() * q_token >= p[i, token]:
            return i, int(rng.choice(p.shape[1], p=p[i]))
    return len(draft), int(rng.choice(p.shape[1], p=p[len(draft)]))


def spec_sequence(rule, p, q, rng, k: int, length: int, point_mass: bool) -> tuple:
    """``length`` tokens from the table models by speculative steps of ``k`` proposals."""
    seq: list[int] = []
    while len(seq) < length:
        draft, qs = [], []
        for _ in range(k):
            prefix = tuple(seq + draft)
            if point_mass:  # prompt lookup: a fixed guess per prefix
                draft.append((sum(prefix) * 3 + 1) % V)
            else:
                qs.append(q(prefix))
                draft.append(int(rng.choice(V, p=qs[-1])))
        ps = np.stack([p(tuple(seq + draft[:i])) for i in range(k + 1)])
        n, following = rule(draft, ps, None if point_mass else np.stack(qs), rng)
        seq += draft[:n] + [following]
    return tuple(seq[:length])


def exact(p, length: int) -> dict[tuple, float]:
    out = {(): 1.0}
    for _ in range(length):
        out = {s + (t,): w * p(s)[t] for s, w in out.items() for t in range(V)}
    return out


@pytest.mark.parametrize("point_mass", [False, True], ids=["draft-q", "point-mass"])
def test_rejection_sampling_keeps_the_target_distribution(point_mass):
    p, q = table_model(1), table_model(2)
    truth = exact(p, 3)

    def statistic(rule) -> tuple[float, float]:
        rng = np.random.default_rng(7)
        samples = [spec_sequence(rule, p, q, rng, 2, 3, point_mass) for _ in range(12000)]
        return chi_square(samples, truth)

    stat, critical = statistic(accept_sampled)
    assert stat < critical, (stat, critical)
    for wrong in (always_accept, resample_from_p):  # the same statistic catches wrong rules
        stat, critical = statistic(wrong)
        assert stat > 3 * critical, (wrong.__name__, stat, critical)


def test_accept_greedy_and_draft_length():
    assert accept_greedy([4, 5, 6], [4, 5, 9, 1]) == 2
    assert accept_greedy([], [3]) == 0
    assert accept_greedy([1, 2], [1, 2, 3]) == 2
    k, lengths = 4, []
    for proposed, accepted in [(4, 4), (6, 6), (8, 8), (8, 3), (7, 0), (6, 0)] + [(1, 0)] * 8:
        k = next_draft_length(k, proposed, accepted, 1, 8)
        lengths.append(k)
    assert lengths[:6] == [6, 8, 8, 7, 6, 5] and lengths[-1] == 1
    assert next_draft_length(3, 0, 0, 1, 8) == 3  # nothing proposed: unchanged


def test_propose_ngram():
    assert propose_ngram([1, 2, 3, 9, 1, 2], 3) == [3, 9, 1]  # after the earlier "1 2"
    assert propose_ngram([1, 2, 3, 9, 1, 2], 1) == [3]
    assert propose_ngram([5, 1, 7, 1], 4) == [7, 1]  # only the tokens there are
    assert propose_ngram([1, 2, 3, 4], 4) == []  # no earlier occurrence
    # the longest suffix wins over a more recent shorter one
    assert propose_ngram([7, 8, 1, 6, 9, 8, 2, 7, 8], 1, ngram_max=2) == [1]
    assert propose_ngram([3, 4, 3, 5, 3], 2) == [5, 3]  # the most recent occurrence
    assert propose_ngram([1], 3) == [] and propose_ngram([1, 1], 0) == []


# --- real bundles -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundles(tiny_run):
    fast = fast_bundles(tiny_run["root"], tiny_run["tokenizer"])
    return {"concat": tiny_run["bundle"], "fp32": fast["fp32"], "int4": fast["int4"]}


@pytest.fixture(scope="module")
def draft_bundle(tiny_run, tmp_path_factory):
    """``distill draft`` for the tiny student, exported against its bundle."""
    run = tmp_path_factory.mktemp("spec_draft")
    args = train_overrides(
        tiny_run, run, student_preset="draft", draft_for=tiny_run["student"], max_steps=12
    )
    assert main(["distill", "draft", *args]) == 0
    out = run / "bundle"
    export = ["export", "onnx", run / "draft", out, "--draft-for", tiny_run["bundle"]]
    assert main([str(a) for a in export]) == 0
    return out


@pytest.fixture(scope="module")
def prompts(tiny_run) -> list[list[int]]:
    gen = Generator.from_bundle(tiny_run["bundle"], threads=1)
    rows = read_rows(tiny_run["train"], limit=40)
    texts = [r["utterance"] for r in rows[:20]]
    texts += ["lights on lights on lights on lights", "the the the the", "turn off the turn off"]
    return [gen.encode_prompt(t) for t in texts] + [gen.encode_prompt(t, False) for t in texts[-3:]]


def engines(bundles, draft_bundle, target: str, proposer: str):
    plain = Generator.from_bundle(bundles[target], threads=1)
    if proposer == "ngram":
        return plain, plain.with_speculation(NGRAM)
    draft_dir = draft_bundle if proposer == "draft" else bundles[proposer]
    config = SpeculationConfig("draft", draft_dir, max_draft_tokens=5)
    return plain, plain.with_speculation(config, open_engine(draft_dir, threads=1))


def run(gen: Generator, ids: list[int], params: SamplingParams) -> GenerationResult:
    result, cache = GenerationResult(), gen.engine.new_cache()
    for _ in gen.stream(list(ids), params, cache=cache, result=result):
        pass
    chosen = result.token_ids + ([result.stop_token] if result.stop_token is not None else [])
    assert cache.tokens == list(ids) + chosen[:-1]  # every chosen token but the last, no more
    return result


CASES = [
    ("concat", "ngram"),
    ("concat", "draft"),
    ("fp32", "ngram"),
    ("fp32", "draft"),
    ("fp32", "int4"),  # the int4 bundle drafting for its fp32 twin: most drafts accepted
    ("int4", "ngram"),
    ("int4", "draft"),
    ("int4", "int4"),  # the target as its own draft: everything accepted
]


@pytest.mark.parametrize(("target", "proposer"), CASES)
def test_greedy_output_is_plain_decoding(bundles, draft_bundle, prompts, target, proposer):
    plain, spec = engines(bundles, draft_bundle, target, proposer)
    settings = [
        SamplingParams(max_new_tokens=40, ignore_eos=True),
        SamplingParams(max_new_tokens=24),  # end tokens stop it
        SamplingParams(max_new_tokens=30, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(max_new_tokens=30, stop=["on", "the"], ignore_eos=True),
    ]
    proposed = accepted = 0
    for ids in prompts:
        for params in settings:
            want, got = run(plain, ids, params), run(spec, ids, params)
            assert got.token_ids == want.token_ids, (target, proposer, ids)
            assert (got.text, got.finish_reason, got.stop_token) == (
                want.text,
                want.finish_reason,
                want.stop_token,
            )
            assert 0 <= got.accepted_tokens <= got.proposed_tokens
            proposed, accepted = proposed + got.proposed_tokens, accepted + got.accepted_tokens
    assert proposed > 0  # speculation ran
    if proposer == target:
        assert accepted >= 0.95 * proposed
    elif proposer == "int4":
        assert accepted >= 0.5 * proposed
    else:  # rejections rolled the cache back; and (but for the trained draft of an untrained
        assert accepted < proposed  # random target) proposals were accepted
        assert accepted > 0 or (proposer == "draft" and target != "concat")


def test_conversation_turns_and_limits(bundles, draft_bundle):
    """Several turns in one conversation (the draft's cache kept across them), a fork, a
    cancelled stream and a reply that fills the context: all as without speculation."""
    plain, spec = engines(bundles, draft_bundle, "fp32", "draft")
    turns = ["turn on the kitchen lights", "and the fan", "dim the office lights to forty percent"]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    a = Conversation(plain, system="You control a smart home.")
    b = Conversation(spec, system="You control a smart home.")
    for text in turns:
        ra, rb = a.say(text, params), b.say(text, params)
        assert rb.token_ids == ra.token_ids and b.tokens == a.tokens
    assert b._speculator.proposer.cache.length > 20  # the draft kept its cache
    fa, fb = a.fork(), b.fork()
    assert fb.say("and now?", params).token_ids == fa.say("and now?", params).token_ids
    # a reader that stops early leaves exactly the tokens chosen so far
    c = Conversation(spec)
    c.user_turn("turn on the kitchen lights")
    result = GenerationResult()
    stream = c.stream(SamplingParams(max_new_tokens=30, ignore_eos=True), result)
    next(stream)
    stream.close()
    assert result.finish_reason == "cancelled"
    assert c.cache.tokens + c._pending == c.tokens and c.cache.length == len(c.tokens) - 1
    # the context fills up: "length" at the same token
    small_plain = Generator.from_bundle(bundles["fp32"], threads=1, max_length=48)
    small_spec = small_plain.with_speculation(NGRAM)
    ids = small_plain.encode_prompt("lights on lights on lights on lights")
    long = SamplingParams(max_new_tokens=200, ignore_eos=True)
    want, got = run(small_plain, ids, long), run(small_spec, ids, long)
    assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason == "length"
    assert len(ids) + len(got.token_ids) == 49  # positions 48 and the last chosen token


def test_draft_length_adapts_within_bounds(bundles):
    gen = Generator.from_bundle(bundles["fp32"], threads=1)
    config = SpeculationConfig("draft", bundles["fp32"], max_draft_tokens=7, initial_draft_tokens=2)
    spec = gen.with_speculation(config, open_engine(bundles["fp32"], threads=1))
    speculator = spec.new_speculator(priced=False)  # the batching loop's schedule
    seen = []
    cache = gen.engine.new_cache()
    result = GenerationResult()
    ids = gen.encode_prompt("turn on the kitchen lights")
    logits = gen.engine.forward(ids, cache)
    decode = spec.decode(
        logits,
        cache,
        SamplingParams(max_new_tokens=60, ignore_eos=True),
        result,
        step_hook=lambda: seen.append(speculator.draft_length),
        speculator=speculator,
    )
    for _ in decode:
        pass
    assert seen[0] == 2 and max(seen) == 7 and all(1 <= k <= 7 for k in seen)
    assert result.acceptance_rate > 0.9  # its own draft
    assert len(seen) < 60 / 3  # several tokens per target run


@pytest.mark.parametrize("method", ["ngram", "draft"])
@pytest.mark.parametrize("verify_cost", [0.001, 1000.0])
def test_priced_speculation_is_greedy_equal_whatever_it_picks(
    bundles, method, verify_cost, monkeypatch
):
    """Verifies priced as free (long drafts) or as ruinous (plain steps, and the acceptance
    sampled: a shadow proposal for prompt lookup, a probe of k = 1 for a draft)."""
    plain = Generator.from_bundle(bundles["fp32"], threads=1)
    draft = open_engine(bundles["fp32"], threads=1) if method == "draft" else None
    config = SpeculationConfig(method, bundles["fp32"] if draft else None, max_draft_tokens=6)
    spec = plain.with_speculation(config, draft)
    for k in range(7):  # a measured table, so no exploration steps but the periodic ones
        for _ in range(3):
            spec.step_costs.observe(k, 1.0 if k == 0 else verify_cost)
    monkeypatch.setattr(spec.step_costs, "observe", lambda k, seconds: None)  # kept as set
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    for prompt in ("turn on the kitchen lights", "lights on lights on lights on lights"):
        want, got = GenerationResult(), GenerationResult()
        ids = plain.encode_prompt(prompt)
        for _ in plain.stream(ids, params, result=want):
            pass
        for _ in spec.stream(ids, params, result=got):
            pass
        assert got.token_ids == want.token_ids
        if verify_cost < 1:
            assert got.proposed_tokens >= 10 and got.accepted_tokens > 0
        else:  # plain steps but the draft's probes (k = 1 every PROBE_EVERY plain steps)
            # and one measurement every EXPLORE_EVERY steps; unpriced, the second prompt drew 21
            # proposals (ngram) and both 33 (draft)
            assert got.proposed_tokens <= 40 // draft_length.PROBE_EVERY + 6
            if method == "ngram":
                assert spec.step_costs.steps >= 30  # (its shadows run nothing)


# --- sampled output on a real bundle ---------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "proposer"), [("concat", "draft"), ("concat", "ngram"), ("fp32", "int4")]
)
def test_sampled_output_keeps_the_distribution(
    bundles, draft_bundle, target, proposer, monkeypatch
):
    """The first three sampled tokens after a fixed context (the prompt and the target's
    greedy reply, so prompt lookup finds what it would propose), over 1500 seeds."""
    plain, spec = engines(bundles, draft_bundle, target, proposer)
    engine = plain.engine
    prompt = plain.encode_prompt("turn on the kitchen lights")
    ids = prompt + run(plain, prompt, SamplingParams(max_new_tokens=20, ignore_eos=True)).token_ids
    params = dict(temperature=1.0, top_k=3, max_new_tokens=4, ignore_eos=True)
    sampler = Sampler(SamplingParams(**params))
    base = engine.new_cache()
    logits = engine.forward(ids, base)
    # the exact distribution of the first three tokens under plain sampling
    truth: dict[tuple, float] = {}
    p1 = sampler.probs(logits)
    for t1 in np.flatnonzero(p1):
        c1 = base.copy()
        p2 = sampler.probs(engine.forward([int(t1)], c1))
        for t2 in np.flatnonzero(p2):
            c2 = c1.copy()
            p3 = sampler.probs(engine.forward([int(t2)], c2))
            for t3 in np.flatnonzero(p3):
                truth[(int(t1), int(t2), int(t3))] = p1[t1] * p2[t2] * p3[t3]
    assert abs(sum(truth.values()) - 1) < 1e-6
    warm = spec.new_speculator()
    warm.proposer.propose(ids + [0], 1, sampler)  # the draft's prompt, prefilled once

    def statistic() -> tuple[float, float, float]:
        samples, proposed, accepted = [], 0, 0
        for seed in range(1500):
            result = GenerationResult()
            decode = spec.decode(
                logits.copy(),
                base.copy(),
                SamplingParams(**params, seed=seed),
                result,
                speculator=warm.copy(),
            )
            for _ in decode:
                pass
            samples.append(tuple(result.token_ids[:3]))
            proposed, accepted = (
                proposed + result.proposed_tokens,
                accepted + result.accepted_tokens,
            )
        return *chi_square(samples, truth), accepted / max(proposed, 1)

    stat, critical, rate = statistic()
    assert stat < critical, (stat, critical)
    assert 0.02 < rate < 0.98  # proposals were accepted and rejected
    if proposer == "int4":  # its drafts are nearly the target's: accepting all is close too
        return
    monkeypatch.setattr(speculative, "accept_sampled", always_accept)
    stat, critical, _ = statistic()
    assert stat > 3 * critical, (stat, critical)


# --- configuration -------------------------------------------------------------------------


def test_draft_must_share_the_vocabulary_and_tokenizer(bundles, draft_bundle, tmp_path, caplog):
    target = json.loads((bundles["fp32"] / "manifest.json").read_text())
    draft = json.loads((draft_bundle / "manifest.json").read_text())
    check_draft(target, draft, draft_bundle)  # made for the concat twin: works
    other = json.loads(json.dumps(draft))
    other["model"]["vocab_size"] += 1
    with pytest.raises(BundleError, match="vocabulary"):
        check_draft(target, other, "x")
    other = json.loads(json.dumps(draft))
    other["files"]["tokenizer.json"]["sha256"] = "0" * 64
    with pytest.raises(BundleError, match="tokenizer"):
        check_draft(target, other, "x")
    with pytest.raises(BundleError, match="draft bundle"):
        SpeculationConfig("draft").validate()
    with pytest.raises(BundleError, match="method"):
        SpeculationConfig("eagle").validate()
    with pytest.raises(BundleError, match="manifest.json"):
        Generator.from_bundle(bundles["fp32"], speculation=SpeculationConfig("draft", tmp_path))
    gen = Generator.from_bundle(
        bundles["fp32"], threads=1, speculation=SpeculationConfig("draft", draft_bundle)
    )
    assert gen.draft_engine.manifest["draft"]["target"]["name"] == bundles["concat"].name


def test_server_config_and_cli(bundles, draft_bundle, tmp_path):
    from moe2edge.runtime.serve_cli import register, server_config, speculation_config

    config = load_server_config(None, ["speculative_decoding=ngram", "max_draft_tokens=5"])
    spec = speculation_config(config)
    assert (spec.method, spec.max_draft_tokens, spec.initial_draft_tokens) == ("ngram", 5, 4)
    with pytest.raises(RuntimeUserError, match="draft_bundle"):
        load_server_config(None, ["speculative_decoding=draft"])
    with pytest.raises(RuntimeUserError, match="manifest.json"):
        load_server_config(None, [f"draft_bundle={tmp_path}"])
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(), "serve", "serve")
    args = parser.parse_args(["serve", str(bundles["fp32"]), "--draft", str(draft_bundle)])
    config = server_config(args)  # --draft alone: speculate with it
    assert (config.speculative_decoding, config.draft_bundle) == ("draft", str(draft_bundle))
    args = parser.parse_args(["serve", "b", "--draft", str(draft_bundle), "--speculate", "off"])
    assert server_config(args).speculative_decoding == "off"
    assert (
        server_config(
            parser.parse_args(["serve", "b", "--speculate", "ngram"])
        ).speculative_decoding
        == "ngram"
    )
    assert server_config(parser.parse_args(["serve", "b"])).speculative_decoding == "off"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "b", "--speculate", "eagle"])
    with pytest.raises(RuntimeUserError, match="draft_bundle"):
        server_config(parser.parse_args(["serve", "b", "--speculate", "draft"]))
