"""Training and serving see the same prompt ids: distill's encoder against the runtime's."""

from __future__ import annotations

from moe2edge.distill.data import encode_example, encode_prompt
from moe2edge.distill.tokenizer import load_tokenizer
from moe2edge.rows import read_rows
from moe2edge.runtime import Generator


def test_training_prompt_ids_equal_runtime_ids(tiny_run):
    tokenizer = load_tokenizer(tiny_run["tokenizer"])
    gen = Generator.from_bundle(tiny_run["bundle"])
    rows = read_rows(tiny_run["eval"])
    assert rows
    for row in rows:
        served = gen.encode_prompt(row["utterance"])  # what the service runs for the utterance
        assert encode_prompt(tokenizer, row["prompt"]) == served
        ids, labels = encode_example(tokenizer, row["prompt"], row["reply"], max_len=512)
        assert ids[: len(served)] == served  # the learnt reply follows exactly that prompt
        assert all(label == -100 for label in labels[: len(served)])
