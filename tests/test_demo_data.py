from moe2edge.distill.demo_data import (
    INTENTS,
    ROOMS,
    generate_dataset,
    jsgf_grammar,
    number_to_words,
)
from moe2edge.distill.formats import extract_action


def test_generation_is_seeded_and_deterministic():
    assert generate_dataset(seed=3, train_size=50, eval_size=10) == generate_dataset(
        seed=3, train_size=50, eval_size=10
    )
    assert generate_dataset(seed=3, train_size=50)[0] != generate_dataset(seed=4, train_size=50)[0]


def test_eval_split_holds_only_unseen_combinations():
    train, evaluation = generate_dataset(seed=0, train_size=3000, eval_size=200)
    seen = {(r["intent"], r["room"]) for r in train}
    assert evaluation and all((r["intent"], r["room"]) not in seen for r in evaluation)
    # yet every room and every intent occurs in training, so composition is learnable
    assert {r["room"] for r in train} == set(ROOMS)
    assert {r["intent"] for r in train} == {i.name for i in INTENTS}


def test_reply_starts_with_its_action_and_utterances_are_spoken_words():
    train, _ = generate_dataset(seed=0, train_size=300)
    for row in train:
        assert row["reply"].startswith(row["action"])
        assert extract_action(row["reply"]) == row["action"]
        assert row["utterance"] == row["utterance"].lower()
        assert all(ch.isalpha() or ch == " " for ch in row["utterance"]), row["utterance"]


def test_paraphrases_give_several_replies_per_action():
    train, _ = generate_dataset(seed=0, train_size=3000)
    replies = {}
    for row in train:
        replies.setdefault(row["action"], set()).add(row["reply"])
    assert max(len(v) for v in replies.values()) >= 2


def test_number_words_and_grammar():
    assert number_to_words(21) == "twenty one"
    assert number_to_words(100) == "one hundred"
    assert number_to_words(40) == "forty"
    grammar = jsgf_grammar()
    assert grammar.startswith("#JSGF V1.0;")
    assert "public <command>" in grammar and "living room" in grammar and "twenty one" in grammar
    assert extract_action("no action here") is None
