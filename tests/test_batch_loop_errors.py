"""The batching loop (runtime/server/batching.py) keeps one row's failure to that row: a
sampler, grammar or speculator error in one generation ends it with the error, and the
others in the same decode step go on to the text they give alone; a service whose start
fails part-way stops the loops it had started."""

from __future__ import annotations

import threading
import time

import pytest

from moe2edge.runtime import Generator
from moe2edge.runtime.generate import Decoding
from moe2edge.runtime.sampling import SamplingParams
from moe2edge.runtime.server.batching import END, BatchLoop, Job
from tests._runtime_common import PROMPTS, fast_bundles

BAD_SEED = 13  # the generation whose sampler fails at its third token


class Sink:
    """What a job emits: text pieces, errors, and whether END came."""

    def __init__(self) -> None:
        self.text, self.errors, self.ended = "", [], threading.Event()

    def __call__(self, item) -> None:
        if item is END:
            self.ended.set()
        elif isinstance(item, BaseException):
            self.errors.append(item)
        else:
            self.text += item


@pytest.fixture(scope="module")
def gen(tiny_run) -> Generator:
    bundles = fast_bundles(tiny_run["root"], tiny_run["tokenizer"])
    return Generator.from_bundle(bundles["fp32"], threads=1)


def test_one_rows_sampler_error_ends_that_row_alone(gen, monkeypatch) -> None:
    real = Decoding.choose

    def choose(self, logits, tokens):
        if self.params.seed == BAD_SEED and len(self.result.token_ids) >= 2:
            raise RuntimeError("sampler exploded")
        return real(self, logits, tokens)

    monkeypatch.setattr(Decoding, "choose", choose)
    params = SamplingParams(max_new_tokens=12)
    alone = gen.generate(PROMPTS[0], params).text
    loop = BatchLoop(gen, rows=2)
    released: list[str] = []
    try:
        good, bad = Sink(), Sink()
        jobs = [
            Job(gen.encode_prompt(PROMPTS[1]), SamplingParams(max_new_tokens=12, seed=BAD_SEED),
                bad, lambda: released.append("bad")),
            Job(gen.encode_prompt(PROMPTS[0]), params, good, lambda: released.append("good")),
        ]  # fmt: skip
        loop.call(lambda: [loop.submit(j) for j in jobs])  # both admitted at the next step
        assert good.ended.wait(30) and bad.ended.wait(30)
        assert loop.most_rows == 2  # they did share decode steps
        assert [str(e) for e in bad.errors] == ["sampler exploded"]
        assert good.errors == [] and good.text == alone
        assert sorted(released) == ["bad", "good"] and loop.running == 0
        again = Sink()  # the loop goes on serving
        loop.submit(Job(gen.encode_prompt(PROMPTS[0]), params, again, lambda: None))
        assert again.ended.wait(30) and again.text == alone and again.errors == []
    finally:
        loop.close()


def test_a_service_that_fails_to_start_stops_its_engine_loops(gen, tmp_path) -> None:
    """The voice's grammar is refused after the versions' loops have started: create_app
    raises, and no loop thread is left running."""
    from moe2edge.runtime.server.app import create_app
    from moe2edge.runtime.server.config import ServerConfig

    def loops() -> int:
        return sum(t.name == "batching" and t.is_alive() for t in threading.enumerate())

    bad = tmp_path / "commands.jsgf"
    bad.write_text("this is not JSGF\n")
    before = loops()
    with pytest.raises(Exception, match="(?i)grammar|jsgf"):
        create_app(ServerConfig(grammar=str(bad)), generator=gen)
    deadline = time.monotonic() + 10
    while loops() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert loops() == before
