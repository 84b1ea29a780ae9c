"""Training and serving see the same prompt ids: distill's encoder against the runtime's."""

from __future__ import annotations

from moe2edge.distill.data import encode_example, encode_prompt
from moe2edge.distill.tokenizer import load_tokenizer
from moe2edge.rows import read_rows
from moe2edge.runtime import Generator
from moe2edge.runtime.session import render_chat


def test_training_prompt_ids_equal_runtime_ids(tiny_run):
    tokenizer = load_tokenizer(tiny_run["tokenizer"])
    gen = Generator.from_bundle(tiny_run["bundle"])
    rows = read_rows(tiny_run["eval"]) + read_rows(tiny_run["train"], 40)
    assert any("messages" in r for r in rows)
    for row in rows:
        if "messages" in row:  # a multi-turn row: the service renders the chat so far
            chat = [(m["role"], m["content"]) for m in row["messages"][:-1]]
            served = render_chat(gen, chat)
        else:
            served = gen.encode_prompt(row["utterance"])  # what the service runs for it
        assert encode_prompt(tokenizer, row["prompt"]) == served
        ids, labels = encode_example(tokenizer, row["prompt"], row["reply"], max_len=512)
        assert ids[: len(served)] == served  # the learnt reply follows exactly that prompt
        assert all(label == -100 for label in labels[: len(served)])
