"""Batch > 1 in the engine (runtime/batch.py): rows of one shared buffer decode together and
give the tokens (and logits) of sequences run one at a time, whatever joins, waits or leaves."""

from __future__ import annotations

import numpy as np
import pytest

from moe2edge.runtime import ContextOverflowError, Generator
from moe2edge.runtime.batch import KVBatch, RowStorage
from tests._runtime_common import PROMPTS, fast_bundles

LONG = "set the living room lights to thirty percent and turn off the fan in the bedroom"


@pytest.fixture(scope="module")
def fast(tiny_run):
    return fast_bundles(tiny_run["root"], tiny_run["tokenizer"])


@pytest.fixture(scope="module", params=["fp32", "int4", "optimum"])
def gen(request, tiny_run, fast) -> Generator:
    bundle = tiny_run["bundle"] if request.param == "optimum" else fast[request.param]
    return Generator.from_bundle(bundle, threads=1)


def sequential(gen: Generator, ids: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and the logits each was chosen from, one sequence at batch 1."""
    cache = gen.engine.new_cache()
    logits, tokens, seen = gen.engine.forward(ids, cache), [], []
    for _ in range(steps):
        seen.append(logits)
        tokens.append(int(np.argmax(logits)))
        logits = gen.engine.forward([tokens[-1]], cache)
    return tokens, seen


class Row:
    """One sequence in a batch: its cache, its greedy tokens, the logits they came from."""

    def __init__(self, batch: KVBatch, gen: Generator, ids: list[int]):
        self.cache = batch.take()
        self.logits = gen.engine.forward(ids, self.cache)  # prefilled alone, in its row
        self.tokens: list[int] = []
        self.seen: list[np.ndarray] = []

    def choose(self) -> int:
        self.seen.append(self.logits)
        self.tokens.append(int(np.argmax(self.logits)))
        return self.tokens[-1]


def step(batch: KVBatch, rows: list[Row]) -> None:
    tokens = [r.choose() for r in rows]
    for row, logits in zip(rows, batch.forward([r.cache for r in rows], tokens), strict=True):
        row.logits = logits


def assert_same(gen: Generator, ids: list[int], row: Row) -> None:
    tokens, seen = sequential(gen, ids, len(row.tokens))
    assert row.tokens == tokens
    assert max(np.abs(a - b).max() for a, b in zip(row.seen, seen, strict=True)) <= 1e-5


def test_rows_of_different_lengths_decode_like_one_at_a_time(gen) -> None:
    prompts = [gen.encode_prompt(p) for p in [*PROMPTS, LONG]]
    assert len({len(p) for p in prompts}) == len(prompts)
    batch = KVBatch(gen.engine, 4)
    rows = [Row(batch, gen, ids) for ids in prompts]
    for _ in range(10):
        step(batch, rows)
    for ids, row in zip(prompts, rows, strict=True):
        assert_same(gen, ids, row)
    assert [r.cache.length for r in rows] == [len(p) + 10 for p in prompts]


def test_rows_join_wait_and_leave_mid_run_and_a_freed_row_is_reused(gen) -> None:
    ids = {name: gen.encode_prompt(p) for name, p in zip("abcd", [*PROMPTS, LONG], strict=True)}
    batch = KVBatch(gen.engine, 3)
    a = Row(batch, gen, ids["a"])
    for _ in range(3):
        step(batch, [a])
    b = Row(batch, gen, ids["b"])  # joins while a is mid-reply
    c = Row(batch, gen, ids["c"])
    for _ in range(2):
        step(batch, [a, b, c])
    step(batch, [a, c])  # b waits a step (its row lies between a's and c's)
    step(batch, [b])
    if batch.batched:
        a_row = a.cache.storage.row
        b_keys = [k[b.cache.storage.row].copy() for k in batch.keys]
    a_tokens, a_seen, a_ids = a.tokens, a.seen, ids["a"]
    batch.free(a.cache)  # a leaves; d takes its row
    assert batch.free_rows == 1
    d = Row(batch, gen, ids["d"])
    if batch.batched:
        assert d.cache.storage.row == a_row
        for before, k in zip(b_keys, batch.keys, strict=True):  # the other rows were not moved
            assert np.array_equal(before, k[b.cache.storage.row])
    for _ in range(4):
        step(batch, [b, c, d])
    with pytest.raises(RuntimeError, match="rows"):
        batch.take()
    gone = Row.__new__(Row)
    gone.tokens, gone.seen = a_tokens, a_seen
    assert_same(gen, a_ids, gone)
    for name, row in zip("bcd", [b, c, d], strict=True):
        assert_same(gen, ids[name], row)


def test_copies_of_a_row_write_on_their_own_and_survive_its_reuse(gen) -> None:
    prompt = gen.encode_prompt(PROMPTS[0])
    expected, _ = sequential(gen, prompt, 4)
    batch = KVBatch(gen.engine, 2)
    row = Row(batch, gen, prompt)
    step(batch, [row])
    step(batch, [row])
    snapshot = row.cache.copy()  # copies share the row until one writes where another has
    branch = row.cache.copy()
    step(batch, [row])  # writes after the copies' positions: still in place, batched
    after_t2 = gen.engine.forward([row.tokens[2]], branch)  # the row holds that position
    np.testing.assert_allclose(after_t2, row.logits, atol=1e-5)
    if batch.batched:  # copy on write: the branch moved out of the row
        assert branch.storage is not row.cache.storage
    step(batch, [row])
    assert row.tokens == expected
    batch.free(row.cache)  # the snapshot still reads the row: it gets storage of its own
    other = Row(batch, gen, gen.encode_prompt(LONG))  # lands in the freed row
    step(batch, [other])
    logits = gen.engine.forward([expected[2]], snapshot)  # still the old sequence's keys
    assert int(np.argmax(logits)) == expected[3]
    if batch.batched:
        assert isinstance(other.cache.storage, RowStorage)
        assert not isinstance(snapshot.storage, RowStorage)
    assert row.cache.length == 0  # a freed cache holds nothing


def test_a_full_row_is_refused_before_anything_runs(fast) -> None:
    gen = Generator.from_bundle(fast["fp32"], threads=1, max_length=24)
    batch = KVBatch(gen.engine, 2)
    full, short = batch.take(), batch.take()
    gen.engine.forward(list(range(3, 27)), full)
    gen.engine.forward([3, 4], short)
    with pytest.raises(ContextOverflowError, match="full"):
        batch.forward([short, full], [5, 6])
    assert short.length == 2
    logits = batch.forward([short], [5])  # the full row next to it is not written
    assert logits.shape == (1, gen.engine.vocab_size) and full.length == 24


def test_one_cache_takes_one_token_per_step(fast) -> None:
    gen = Generator.from_bundle(fast["fp32"], threads=1)
    batch = KVBatch(gen.engine, 2)
    cache = batch.take()
    gen.engine.forward([3, 4], cache)
    with pytest.raises(ValueError, match="one token per step"):
        batch.forward([cache, cache], [5, 6])
    with pytest.raises(ValueError, match="tokens"):
        batch.forward([cache], [5, 6])
