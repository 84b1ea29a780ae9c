import re
from collections import Counter

import pytest

from moe2edge.distill.demo_data import (
    HISTORY_TURNS,
    INTENTS,
    MIX,
    ROOMS,
    corrupt_labels,
    generate_dataset,
    held_out_pairings,
    jsgf_grammar,
    number_to_words,
    write_jsonl,
)
from moe2edge.distill.demo_domain import OPENERS, is_wellformed, reply_forms, zipf_weights
from moe2edge.distill.evaluate import reply_wellformed, task_accuracy
from moe2edge.distill.formats import extract_action, extract_actions


@pytest.fixture(scope="module")
def data():
    return generate_dataset(seed=0, train_size=3000, eval_size=200)


def _targets(rows):
    return {(i, r) for row in rows for i, r in zip(row["intents"], row["rooms"], strict=True)}


def test_generation_is_seeded_and_deterministic():
    assert generate_dataset(seed=3, train_size=50, eval_size=10) == generate_dataset(
        seed=3, train_size=50, eval_size=10
    )
    assert generate_dataset(seed=3, train_size=50)[0] != generate_dataset(seed=4, train_size=50)[0]


def test_eval_split_holds_only_unseen_combinations_and_pairings(data):
    train, evaluation = data
    seen = _targets(train) | {
        (a.split()[0][1:], a.split()[1].removeprefix("room=").rstrip("]").replace("_", " "))
        for row in train
        for a in row.get("context_actions", [])
    }
    assert evaluation and not _targets(evaluation) & seen
    compound = lambda rows: {tuple(r["intents"]) for r in rows if r["kind"] == "compound"}  # noqa: E731
    assert compound(evaluation) and not compound(evaluation) & compound(train)
    assert compound(evaluation) <= held_out_pairings(0)
    # yet every room and every intent occurs in training, so composition is learnable
    assert {r["room"] for r in train} == set(ROOMS)
    assert {i for r in train for i in r["intents"]} == {i.name for i in INTENTS}


def test_kinds_come_in_the_expected_proportions(data):
    train, evaluation = data
    for rows in (train, evaluation):
        counts = Counter(r["kind"] for r in rows)
        for kind, share in zip(("single", "compound", "multi_turn"), MIX, strict=True):
            assert abs(counts[kind] / len(rows) - share) < 0.04, (kind, counts)
    assert all(len(r["actions"]) == 2 for r in train if r["kind"] == "compound")
    assert any(r["long"] for r in evaluation) and not all(r["long"] for r in evaluation)


def test_reply_starts_with_its_actions_and_gold_replies_are_wellformed(data):
    train, evaluation = data
    rows = train + evaluation
    for row in rows:
        assert row["reply"].startswith(row["action"])
        assert extract_actions(row["reply"]) == row["actions"] == extract_actions(row["action"])
        assert row["utterance"] == row["utterance"].lower()
    replies = [r["reply"] for r in rows]
    assert reply_wellformed(replies, rows) == 1.0 and task_accuracy(replies, rows) == 1.0


def test_garbled_or_mismatched_replies_are_not_wellformed():
    action = "[lights.dim room=dining_room value=30]"
    assert is_wellformed(f"{action} ok, dining room lights at 30 percent.")
    for spoken in (
        "sure, dimming the dimmmpercent.",
        "ok, dining room lights at 40 percent.",  # not the predicted value
        "ok, kitchen lights at 30 percent.",  # not the predicted room
        "ok, dining room lights at 30 percent",  # no full stop
        "ok, the dining room fan is off.",  # another intent's reply
    ):
        assert not is_wellformed(f"{action} {spoken}"), spoken
    assert not is_wellformed("ok, dining room lights at 30 percent.")  # no action
    assert not is_wellformed("[lights.dim room=moon value=30] ok, moon lights at 30 percent.")
    two = "[fan.off room=kitchen] [lights.dim room=kitchen value=20]"
    assert is_wellformed(f"{two} ok, the kitchen fan is off and kitchen lights at 20 percent.")
    assert not is_wellformed(f"{two} ok, the kitchen fan is off.")  # one action left out
    assert reply_wellformed([f"{action} sure, dimming the dimmmpercent."], [{}]) == 0.0


def test_task_accuracy_compares_the_whole_action_sequence():
    row = {"action": "[fan.off room=kitchen] [lights.off room=kitchen]"}
    assert task_accuracy(["[fan.off room=kitchen] [lights.off room=kitchen] ok."], [row]) == 1.0
    assert task_accuracy(["[fan.off room=kitchen] ok, the kitchen fan is off."], [row]) == 0.0
    assert task_accuracy(["[lights.off room=kitchen] [fan.off room=kitchen] ok."], [row]) == 0.0


def test_numbers_appear_as_digits_and_words_but_speech_is_words_only(data):
    train, _ = data
    with_value = [r for r in train if re.search(r"value=\d", r["action"])]
    digits = [r for r in with_value if re.search(r"\d", r["utterance"])]
    assert digits and len(digits) < len(with_value)  # some in words, some in digits
    for row in train:
        assert all(ch.isalpha() or ch == " " for ch in row["spoken"]), row["spoken"]


def test_reply_form_weights_are_not_uniform(data):
    train, _ = data
    weights = zipf_weights(4)
    assert abs(sum(weights) - 1) < 1e-9 and weights[0] > 2 * weights[-1]
    openers = Counter(r["reply"].removeprefix(r["action"] + " ").split(",")[0] for r in train)
    assert set(openers) == set(OPENERS)
    assert openers.most_common()[0][1] > 3 * openers.most_common()[-1][1]
    assert len(reply_forms(["[fan.off room=kitchen]"])) == len(OPENERS) * 4


def test_multi_turn_rows_carry_the_chat_and_train_on_the_last_reply(tmp_path, data):
    from moe2edge.distill.data import IGNORE_INDEX, encode_chat, encode_row
    from moe2edge.distill.pipeline import make_tokenizer
    from moe2edge.distill.tokenizer import load_tokenizer
    from moe2edge.rows import row_form

    train, _ = data
    write_jsonl(train[:400], tmp_path / "train.jsonl")
    tokenizer = load_tokenizer(make_tokenizer(tmp_path / "train.jsonl", tmp_path / "tok", 320))
    multi = [r for r in train if r["kind"] == "multi_turn"][:20]
    for row in multi:
        assert row_form(row) == "prompt+reply" and row_form({"messages": row["messages"]})
        turns = len(row["messages"]) // 2
        assert 2 <= turns <= HISTORY_TURNS + 1
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"] * turns
        assert row["messages"][-1]["content"] == row["reply"]
        assert row["messages"][-2]["content"] == row["utterance"]
        ids, labels = encode_row(tokenizer, row, 512)
        chat_ids, chat_labels = encode_chat(tokenizer, row["messages"], 512)
        assert ids == chat_ids  # the prompt is the chat template's rendering
        last = [i for i, x in enumerate(labels) if x != IGNORE_INDEX]
        assert labels[last[0] :] == chat_labels[last[0] :]  # the last reply is learnt
        assert tokenizer.decode(ids[last[0] :], skip_special_tokens=True).strip() == row["reply"]


def test_multi_turn_rows_draw_up_to_history_turns_earlier_turns(data):
    """Every depth from 1 to ``history_turns`` occurs in both splits; the turns before the
    last earlier one are unrelated single or compound commands; the new command after them
    is single or compound too (a follow-up is single). history_turns=1 with
    compound_after_turn=False draws one earlier turn and a single command only (the data set
    of earlier versions); 0 turns is refused."""
    assert HISTORY_TURNS >= 2
    for rows in data:
        multi = [r for r in rows if r["kind"] == "multi_turn"]
        depths = Counter(len(r["messages"]) // 2 - 1 for r in multi)
        assert set(depths) == set(range(1, HISTORY_TURNS + 1)), depths
        assert {len(r["actions"]) for r in multi if not r["followup"]} == {1, 2}
        assert {len(r["actions"]) for r in multi if r["followup"]} == {1}
    deep = [r for r in data[0] if r["kind"] == "multi_turn" and len(r["messages"]) > 4]
    earliest = {len(extract_actions(r["messages"][1]["content"])) for r in deep}
    assert earliest == {1, 2}  # single and compound commands
    for turns in (1, 3):
        train, evaluation = generate_dataset(
            seed=0, train_size=600, eval_size=40, history_turns=turns
        )
        depths = {len(r["messages"]) // 2 - 1 for r in train + evaluation if "messages" in r}
        assert depths == set(range(1, turns + 1))
    old = generate_dataset(seed=0, train_size=600, history_turns=1, compound_after_turn=False)
    assert {len(r["messages"]) for r in old[0] if "messages" in r} == {4}
    assert {len(r["actions"]) for r in old[0] if r["kind"] == "multi_turn"} == {1}
    with pytest.raises(ValueError, match="history_turns"):
        generate_dataset(seed=0, train_size=10, history_turns=0)


def test_number_words_and_grammar():
    assert number_to_words(21) == "twenty one"
    assert number_to_words(100) == "one hundred"
    assert number_to_words(180) == "one hundred eighty"
    assert number_to_words(40) == "forty"
    grammar = jsgf_grammar()
    assert grammar.startswith("#JSGF V1.0;")
    assert "public <command>" in grammar and "living room" in grammar and "twenty one" in grammar
    assert not re.search(r"\d", grammar.split("\n", 2)[2])  # no digits past the name
    assert extract_action("no action here") is None


def test_grammar_loads_in_pocketsphinx():
    pytest.importorskip("pocketsphinx")
    from moe2edge.runtime.voice.asr import PocketsphinxRecognizer

    PocketsphinxRecognizer(grammar=jsgf_grammar())


def test_label_noise_mislabels_a_share_of_rows_with_wellformed_wrong_replies(data):
    train, _ = data
    noisy = corrupt_labels(train, 0.3, seed=1)
    assert noisy == corrupt_labels(train, 0.3, seed=1)
    changed = [(a, b) for a, b in zip(train, noisy, strict=True) if b.get("label_noise")]
    assert abs(len(changed) / len(train) - 0.3) < 0.03
    for clean, wrong in changed:
        assert wrong["prompt"] == clean["prompt"] and wrong["utterance"] == clean["utterance"]
        assert extract_actions(wrong["reply"]) != extract_actions(clean["reply"])
        assert extract_actions(wrong["reply"]) == wrong["actions"]
        assert len(wrong["actions"]) == len(clean["actions"])
        assert is_wellformed(wrong["reply"])
        if "messages" in clean:
            assert wrong["messages"][:-1] == clean["messages"][:-1]
            assert wrong["messages"][-1]["content"] == wrong["reply"]
    untouched = [b for b in noisy if not b.get("label_noise")]
    assert all(row in train for row in untouched[:50])
    assert corrupt_labels(train, 0.0, seed=1) == train
    with pytest.raises(ValueError, match="label noise share"):
        corrupt_labels(train, 1.5, seed=1)
