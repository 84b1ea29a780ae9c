"""The built-in demo domain: a seeded smart-home / robot voice-assistant data set.

DEMO ONLY. No weights or data can be downloaded on our build machines, so the demo
pipeline trains on this synthetic domain (vocabulary and reply forms: ``demo_domain``):
user utterance -> assistant reply, where the reply starts with the canonical action(s) in
brackets (scored by exact match of the sequence, see ``formats.extract_actions``) followed by
one spoken confirmation drawn from a skewed distribution over paraphrases (so the teacher's
distribution over replies is informative). Three kinds of rows (``kind``):

- ``single``: one command;
- ``compound``: two commands joined by "and", two actions in order, one reply covering both;
- ``multi_turn``: a command after 1 to ``history_turns`` finished turns: half are follow-ups
  ("turn it off", "make it warmer") about the device and room the last turn named
  (``followup``), half a new, unrelated command, single or compound (a voice session keeps
  its history, so most commands after the first come after a turn). Turns before the last
  earlier one are unrelated single or compound commands: a session's history holds commands
  that have nothing to do with the next one, and a student that has seen only one earlier
  turn and only single commands after it carries a room or device over from them. The row
  carries the whole chat as ``messages`` and, as every row does, ``prompt``/``reply``: the
  prompt is the chat template's rendering of the earlier turns and the new utterance
  (``formats.format_context``), so the row trains as a prompt/reply row with the loss on the
  last assistant turn (earlier turns are learnt by their own rows).

Utterances write numbers in digits or in words (``spoken``: the words-only form a speech
recognizer returns; the JSGF grammar has words only). Held-out split: whole (intent, room)
combinations and compound pairings never seen in training, so the evaluation measures
composition, not recall. Eval rows are tagged ``kind`` and ``long`` (a long spoken reply).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from moe2edge.distill.demo_domain import (  # noqa: F401  (re-exported for callers)
    COLOURS,
    INTENTS,
    OPENERS,
    ROOMS,
    Intent,
    action_string,
    clause,
    number_to_words,
    parse_action,
    reply_forms,
    spoken_reply,
    zipf_weights,
)
from moe2edge.distill.formats import extract_actions, format_context, format_prompt
from moe2edge.fileio import atomic_write

KINDS = ("single", "compound", "multi_turn")
MIX = (0.5, 0.3, 0.2)  # share of each kind, in both splits
# multi-turn rows whose second turn is a new command, not a follow-up: without them a
# student reads every command after a turn as a follow-up about the earlier device
NEW_COMMAND_SHARE = 0.5
# the most earlier turns a multi-turn row carries: a chat after two is ~98 of the demo
# student's 128 positions (a voice session drops its oldest turns to keep max_new_tokens free)
HISTORY_TURNS = 2
LONG_WORDS = 12  # a spoken reply of at least this many words is tagged long


def _pick(rng: random.Random, count: int) -> int:
    return rng.choices(range(count), weights=zipf_weights(count))[0]


def _say(value: int | str | None, digits: bool) -> tuple[str, str]:
    """(as typed, as spoken) forms of a value in an utterance."""
    if value is None:
        return "", ""
    if isinstance(value, str):
        return value, value
    return (str(value) if digits else number_to_words(value)), number_to_words(value)


def without_room(template: str) -> str | None:
    """A template's form with its room left out (the second half of "... and dim the
    lights"); None where dropping the room would not leave a sentence."""
    short = template.replace(" in the {room}", "").replace("the {room} ", "the ")
    short = short.replace(" to the {room}", "")
    bad = "{room}" in short or short.endswith(" the") or "the {value}" in short
    return None if bad else short


class Turn:
    """One command of a row: its action, utterance (typed and spoken) and reply clause."""

    def __init__(self, rng, intent: Intent, room: str, value=None, template: str | None = None):
        self.intent, self.room = intent, room
        self.value = value if value is not None or not intent.values else rng.choice(intent.values)
        template = template if template is not None else rng.choice(intent.templates)
        typed, spoken = _say(self.value, digits=rng.random() < 0.5)
        self.utterance = template.format(room=room, value=typed)
        self.spoken = template.format(room=room, value=spoken)
        self.action = action_string(intent, room, self.value)
        self.clause = clause(intent, _pick(rng, len(intent.replies)), room, self.value)


def _row(rng: random.Random, kind: str, turns: list[Turn], context: list[dict] | None = None):
    """A data set row for ``turns`` (the commands of the last user message)."""
    speech = spoken_reply(OPENERS[_pick(rng, len(OPENERS))], [t.clause for t in turns])
    actions = [t.action for t in turns]
    reply = " ".join(actions) + " " + speech
    utterance = " and ".join(t.utterance for t in turns)
    spoken = " and ".join(t.spoken for t in turns)
    row = {
        "prompt": format_prompt(utterance),
        "utterance": utterance,
        "spoken": spoken,
        "reply": reply,
        "action": " ".join(actions),
        "actions": actions,
        "intent": turns[0].intent.name,
        "intents": [t.intent.name for t in turns],
        "room": turns[0].room,
        "rooms": [t.room for t in turns],
        "kind": kind,
        "long": len(speech.split()) >= LONG_WORDS,
    }
    if context:
        history = [
            (m["content"], r["content"]) for m, r in zip(context[::2], context[1::2], strict=True)
        ]
        row["prompt"] = format_context(history, utterance)
        row["messages"] = context + [
            {"role": "user", "content": utterance},
            {"role": "assistant", "content": reply},
        ]
        row["context_actions"] = [a for r in context[1::2] for a in extract_actions(r["content"])]
    return row


def _compound_turns(rng, first: Intent, room_a: str, second: Intent, room_b: str) -> list[Turn]:
    """The two commands of a compound one; the second drops its room ("... and dim the
    lights") more often than not when it is the first one's."""
    a = Turn(rng, first, room_a)
    template = rng.choice(second.templates)
    short = without_room(template)
    if room_b == room_a and short is not None and rng.random() < 0.6:
        template = short
    return [a, Turn(rng, second, room_b, template=template)]


def _followup(rng, first: Intent, second: Intent, room: str) -> tuple[Turn, Turn] | None:
    """The turns of a follow-up: ``first`` in ``room``, then a follow-up for ``second`` (same
    device); None when ``second`` has no follow-up that fits."""
    a = Turn(rng, first, room)
    options = [(t, None) for t in second.followups]
    if first is second and a.value is not None:
        index = second.values.index(a.value)
        for template, step in second.relative:
            if 0 <= index + step < len(second.values):
                options.append((template, second.values[index + step]))
    if not options:
        return None
    template, value = rng.choice(options)
    return a, Turn(rng, second, room, value=value, template=template)


def _after_turns(rng, earlier: list[dict], a: Turn, last: list[Turn], followup: bool) -> dict:
    """A multi-turn row: the command ``last`` (one, or two joined by "and") after the
    finished turns ``earlier`` (rows), then a finished turn of ``a``."""
    context = [*earlier, _row(rng, "single", [a])]
    messages = [
        {"role": role, "content": row[key]}
        for row in context
        for role, key in (("user", "utterance"), ("assistant", "reply"))
    ]
    return _row(rng, "multi_turn", last, messages) | {"followup": followup}


def held_out_combinations(seed: int, rooms_per_intent: int = 2) -> set[tuple[str, str]]:
    """(intent, room) pairs reserved for evaluation: each intent loses a few rooms."""
    rng = random.Random(seed)
    held = set()
    for intent in INTENTS:
        for room in rng.sample(ROOMS, rooms_per_intent):
            held.add((intent.name, room))
    return held


def compound_pairings() -> list[tuple[Intent, Intent]]:
    """Ordered pairs of intents that make a compound command (two different devices)."""
    return [(a, b) for a in INTENTS for b in INTENTS if a.device != b.device]


def held_out_pairings(seed: int, share: float = 0.2) -> set[tuple[str, str]]:
    """Compound (first intent, second intent) pairings reserved for evaluation."""
    pairs = compound_pairings()
    chosen = random.Random(seed + 1).sample(pairs, round(share * len(pairs)))
    return {(a.name, b.name) for a, b in chosen}


def _kind(rng: random.Random) -> str:
    return rng.choices(KINDS, weights=MIX)[0]


def generate_dataset(
    seed: int = 0,
    train_size: int = 6000,
    eval_size: int = 200,
    rooms_per_intent: int = 2,
    new_command_share: float = NEW_COMMAND_SHARE,
    history_turns: int = HISTORY_TURNS,
    compound_after_turn: bool = True,
) -> tuple[list[dict], list[dict]]:
    """Return (train, eval) lists of rows; eval uses only held-out combinations/pairings.
    ``new_command_share``: of the multi-turn rows, those whose last turn is a new command.
    ``history_turns``: the most earlier turns of a multi-turn row; the earlier turns use
    training combinations only. ``compound_after_turn``: a new command after a turn is a
    compound one as often as a command on its own is (``MIX``), else always single.
    ``history_turns=1, compound_after_turn=False`` draws the data set of earlier versions,
    row for row."""
    if history_turns < 1:
        raise ValueError(f"history_turns must be at least 1, got {history_turns}")
    rng = random.Random(seed)
    held = held_out_combinations(seed, rooms_per_intent)
    held_pairs = held_out_pairings(seed)
    seen_rooms = {i.name: [r for r in ROOMS if (i.name, r) not in held] for i in INTENTS}
    held_rooms = {i.name: [r for r in ROOMS if (i.name, r) in held] for i in INTENTS}
    pairs = compound_pairings()
    train_pairs = [(a, b) for a, b in pairs if (a.name, b.name) not in held_pairs]
    eval_pairs = [(a, b) for a, b in pairs if (a.name, b.name) in held_pairs]
    mates = {i.name: [j for j in INTENTS if j.device == i.device] for i in INTENTS}
    followers = [i for i in INTENTS if i.followups or i.relative]

    def make(kind: str, rooms: dict[str, list[str]], compound: list) -> dict:
        while True:
            if kind == "single":
                intent = rng.choice(INTENTS)
                return _row(rng, "single", [Turn(rng, intent, rng.choice(rooms[intent.name]))])
            if kind == "compound":
                return _row(rng, "compound", compound_turns(rooms, compound))
            if (
                new_command_share and rng.random() < new_command_share
            ):  # a new, unrelated command after a turn
                first, second = rng.choice(INTENTS), rng.choice(INTENTS)
                a = Turn(rng, first, rng.choice(seen_rooms[first.name]))
                if compound_after_turn and rng.random() < MIX[1] / (MIX[0] + MIX[1]):
                    last = compound_turns(rooms, compound)
                else:
                    last = [Turn(rng, second, rng.choice(rooms[second.name]))]
                return _after_turns(rng, earlier_turns(), a, last, followup=False)
            second = rng.choice(followers)
            room = rng.choice(rooms[second.name])
            # another intent of the device in a training combination ("turn it off" after
            # "turn on the fan"), or the same intent for a relative step ("make it warmer")
            firsts = [
                i for i in mates[second.name] if i is not second and room in seen_rooms[i.name]
            ]
            firsts = firsts + [second] if second.relative or not firsts else firsts
            turns = _followup(rng, rng.choice(firsts), second, room)
            if turns is not None:
                return _after_turns(rng, earlier_turns(), turns[0], turns[1:], followup=True)

    def compound_turns(rooms: dict[str, list[str]], compound: list) -> list[Turn]:
        a, b = rng.choice(compound)
        room_a = rng.choice(rooms[a.name])
        same = room_a in rooms[b.name] and rng.random() < 0.5
        return _compound_turns(rng, a, room_a, b, room_a if same else rng.choice(rooms[b.name]))

    def earlier_turns() -> list[dict]:
        """The unrelated turns before a multi-turn row's last earlier one (0 to
        ``history_turns - 1``; none drawn, and no random number, when that is 0)."""
        count = rng.randrange(history_turns) if history_turns > 1 else 0
        return [
            make(rng.choices(KINDS[:2], MIX[:2])[0], seen_rooms, train_pairs) for _ in range(count)
        ]

    train = [make(_kind(rng), seen_rooms, train_pairs) for _ in range(train_size)]
    pattern = [k for k, share in zip(KINDS, MIX, strict=True) for _ in range(round(share * 10))]
    evaluation = [make(pattern[n % len(pattern)], held_rooms, eval_pairs) for n in range(eval_size)]
    return train, evaluation


def room_rows(seed: int, rooms: list[str], size: int) -> list[dict]:
    """``size`` single-command rows of every intent in ``rooms`` only: a new domain for
    fine-tuning a student trained on the other rooms (``split_by_room``)."""
    unknown = [r for r in rooms if r not in ROOMS]
    if unknown:
        raise ValueError(f"unknown rooms {unknown}; the demo rooms are {ROOMS}")
    rng = random.Random(seed)
    pairs = [(i, r) for i in INTENTS for r in rooms]
    return [_row(rng, "single", [Turn(rng, *rng.choice(pairs))]) for _ in range(size)]


def split_by_room(rows: list[dict], rooms: list[str]) -> tuple[list[dict], list[dict]]:
    """(rows in none of ``rooms``, rows in ``rooms``)."""
    inside = [r for r in rows if r.get("room") in rooms]
    return [r for r in rows if r.get("room") not in rooms], inside


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    """Rows as JSONL, atomically (read them back with ``moe2edge.rows.read_rows``)."""
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def _alternatives(forms: list[str]) -> str:
    return " | ".join(f"( {f} )" for f in dict.fromkeys(forms))


def jsgf_grammar(name: str = "moe2edge_commands") -> str:
    """The command grammar in JSGF, for a grammar-constrained speech recognizer: single and
    compound commands and follow-ups, numbers in words only."""
    numbers = sorted({v for i in INTENTS for v in i.values if isinstance(v, int)})

    def rule(template: str, intent: Intent) -> str:
        slot = "<colour>" if intent.values and isinstance(intent.values[0], str) else "<number>"
        return template.replace("{room}", "<room>").replace("{value}", slot)

    singles = [rule(t, i) for i in INTENTS for t in i.templates]
    shorts = [rule(s, i) for i in INTENTS for t in i.templates if (s := without_room(t))]
    follow = sorted({rule(t, i) for i in INTENTS for t in i.followups})
    follow += sorted({t for i in INTENTS for t, _ in i.relative})
    lines = [
        "#JSGF V1.0;",
        f"grammar {name};",
        "<room> = " + " | ".join(ROOMS) + ";",
        "<number> = " + " | ".join(number_to_words(n) for n in numbers) + ";",
        "<colour> = " + " | ".join(COLOURS) + ";",
        "<single> = " + _alternatives(singles) + ";",
        "<second> = <single> | " + _alternatives(shorts) + ";",
        "<followup> = " + _alternatives(follow) + ";",
        "public <command> = ( <single> [ and <second> ] ) | <followup>;",
    ]
    return "\n".join(lines) + "\n"


def corrupt_labels(rows: list[dict], share: float, seed: int) -> list[dict]:
    """``rows`` with ``share`` of their replies mislabelled, as logged or hand-labelled data is:
    one action of the row gets another value (or, without values, another room) and the
    spoken part is rewritten to match it, so the wrong label is a well-formed reply. The
    utterance and prompt stay as they were. Returns new rows (tagged ``label_noise``)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"label noise share must be in [0, 1], got {share}")
    rng = random.Random(seed)
    out = []
    for row in rows:
        if rng.random() >= share:
            out.append(row)
            continue
        parsed = [parse_action(a) for a in row["actions"]]
        which = rng.randrange(len(parsed))
        intent, room, value = parsed[which]
        if intent.values:
            value = rng.choice([v for v in intent.values if v != value])
        else:
            room = rng.choice([r for r in ROOMS if r != room])
        parsed[which] = (intent, room, value)
        actions = [action_string(i, r, v) for i, r, v in parsed]
        clauses = [clause(i, _pick(rng, len(i.replies)), r, v) for i, r, v in parsed]
        reply = " ".join(actions) + " " + spoken_reply(rng.choice(OPENERS), clauses)
        new = {**row, "reply": reply, "action": " ".join(actions), "actions": actions}
        new["label_noise"] = True
        if "messages" in row:
            new["messages"] = row["messages"][:-1] + [{"role": "assistant", "content": reply}]
        out.append(new)
    return out


def write_demo_data(
    out_dir: str | Path,
    seed: int = 0,
    train_size: int = 6000,
    eval_size: int = 200,
    new_command_share: float = NEW_COMMAND_SHARE,
    history_turns: int = HISTORY_TURNS,
    compound_after_turn: bool = True,
) -> dict[str, Path]:
    out_dir = Path(out_dir)
    train, evaluation = generate_dataset(
        seed,
        train_size,
        eval_size,
        new_command_share=new_command_share,
        history_turns=history_turns,
        compound_after_turn=compound_after_turn,
    )
    paths = {
        "train": out_dir / "train.jsonl",
        "eval": out_dir / "eval.jsonl",
        "grammar": out_dir / "commands.jsgf",
    }
    write_jsonl(train, paths["train"])
    write_jsonl(evaluation, paths["eval"])
    atomic_write(paths["grammar"], jsgf_grammar())
    return paths
