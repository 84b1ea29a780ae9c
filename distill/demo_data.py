"""The built-in demo domain: a seeded smart-home / robot voice-assistant data set.

DEMO ONLY. No weights or data can be downloaded on our build machines, so the demo
pipeline trains on this synthetic domain: user utterance -> assistant reply, where the
reply starts with a canonical action in brackets (scored by exact match, see
``formats.extract_action``) followed by a paraphrased confirmation (so the teacher's
distribution over replies is informative). The conversation markers are those of
``formats``, which the trained tokenizer knows as special tokens.

Held-out split: whole (intent, room) combinations never seen in training, so the
evaluation measures composition, not recall. Utterances are lowercase words without
punctuation (numbers spelled out), which is also what a speech recognizer returns; the
command grammar is exported as JSGF for the recognizer.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from moe2edge.distill.formats import format_prompt
from moe2edge.fileio import atomic_write

ROOMS = [
    "kitchen",
    "living room",
    "bedroom",
    "bathroom",
    "office",
    "garage",
    "hallway",
    "dining room",
    "basement",
    "nursery",
]

ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
TENS = {
    20: "twenty",
    30: "thirty",
    40: "forty",
    50: "fifty",
    60: "sixty",
    70: "seventy",
    80: "eighty",
    90: "ninety",
}


def number_to_words(n: int) -> str:
    if n < 20:
        return ONES[n]
    if n == 100:
        return "one hundred"
    tens, ones = divmod(n, 10)
    return TENS[tens * 10] + ("" if ones == 0 else " " + ONES[ones])


@dataclass(frozen=True)
class Intent:
    """One command type: its action, utterance templates and reply templates."""

    name: str  # e.g. "lights.on"
    templates: tuple[str, ...]  # {room} and {value} placeholders
    replies: tuple[str, ...]
    values: tuple[int, ...] = ()  # allowed numeric values, if the intent takes one
    unit: str = ""


INTENTS: tuple[Intent, ...] = (
    Intent(
        "lights.on",
        (
            "turn on the {room} lights",
            "switch on the lights in the {room}",
            "please turn the {room} lights on",
            "lights on in the {room}",
            "can you turn on the lights in the {room}",
        ),
        (
            "ok, the {room} lights are on.",
            "done, {room} lights on.",
            "sure, turning on the {room} lights.",
        ),
    ),
    Intent(
        "lights.off",
        (
            "turn off the {room} lights",
            "switch off the lights in the {room}",
            "please turn the {room} lights off",
            "lights off in the {room}",
            "can you turn off the lights in the {room}",
        ),
        (
            "ok, the {room} lights are off.",
            "done, {room} lights off.",
            "sure, turning off the {room} lights.",
        ),
    ),
    Intent(
        "lights.dim",
        (
            "dim the {room} lights to {value} percent",
            "set the {room} lights to {value} percent",
            "make the lights in the {room} {value} percent",
        ),
        (
            "ok, {room} lights at {value} percent.",
            "done, dimming the {room} lights to {value}.",
            "sure, {room} lights to {value} percent.",
        ),
        values=tuple(range(10, 101, 10)),
        unit="percent",
    ),
    Intent(
        "fan.on",
        ("turn on the {room} fan", "switch on the fan in the {room}", "start the {room} fan"),
        (
            "ok, the {room} fan is on.",
            "done, {room} fan running.",
            "sure, starting the {room} fan.",
        ),
    ),
    Intent(
        "fan.off",
        ("turn off the {room} fan", "switch off the fan in the {room}", "stop the {room} fan"),
        (
            "ok, the {room} fan is off.",
            "done, {room} fan stopped.",
            "sure, stopping the {room} fan.",
        ),
    ),
    Intent(
        "fan.speed",
        ("set the {room} fan to speed {value}", "put the fan in the {room} on speed {value}"),
        ("ok, {room} fan at speed {value}.", "done, {room} fan speed {value}."),
        values=(1, 2, 3),
    ),
    Intent(
        "heater.on",
        ("turn on the {room} heater", "switch on the heater in the {room}", "warm up the {room}"),
        ("ok, the {room} heater is on.", "done, heating the {room}.", "sure, {room} heater on."),
    ),
    Intent(
        "heater.off",
        ("turn off the {room} heater", "switch off the heater in the {room}"),
        ("ok, the {room} heater is off.", "done, {room} heater off."),
    ),
    Intent(
        "thermostat.set",
        (
            "set the {room} thermostat to {value} degrees",
            "set the temperature in the {room} to {value}",
            "make the {room} {value} degrees",
        ),
        (
            "ok, {room} thermostat set to {value} degrees.",
            "done, the {room} will be {value} degrees.",
            "sure, {room} at {value} degrees.",
        ),
        values=tuple(range(16, 29)),
        unit="degrees",
    ),
    Intent(
        "thermostat.query",
        (
            "what is the temperature in the {room}",
            "how warm is the {room}",
            "tell me the {room} temperature",
        ),
        ("checking the {room} temperature.", "let me check the {room} thermostat."),
    ),
    Intent(
        "speaker.volume",
        (
            "set the {room} speaker volume to {value}",
            "turn the {room} speaker to {value}",
            "change the volume in the {room} to {value}",
        ),
        ("ok, {room} speaker volume {value}.", "done, {room} volume at {value}."),
        values=tuple(range(0, 101, 10)),
    ),
    Intent(
        "speaker.off",
        ("turn off the {room} speaker", "stop the music in the {room}", "mute the {room} speaker"),
        ("ok, the {room} speaker is off.", "done, {room} music stopped."),
    ),
    Intent(
        "door.lock",
        ("lock the {room} door", "please lock the door to the {room}"),
        ("ok, the {room} door is locked.", "done, {room} door locked."),
    ),
    Intent(
        "door.unlock",
        ("unlock the {room} door", "please unlock the door to the {room}"),
        ("ok, the {room} door is unlocked.", "done, {room} door unlocked."),
    ),
)


def action_string(intent: Intent, room: str, value: int | None) -> str:
    room_id = room.replace(" ", "_")
    parts = [intent.name, f"room={room_id}"]
    if value is not None:
        parts.append(f"value={value}")
    return "[" + " ".join(parts) + "]"


def _make_example(rng: random.Random, intent: Intent, room: str) -> dict:
    value = rng.choice(intent.values) if intent.values else None
    words = number_to_words(value) if value is not None else ""
    utterance = rng.choice(intent.templates).format(room=room, value=words)
    reply_text = rng.choice(intent.replies).format(room=room, value=value)
    reply = f"{action_string(intent, room, value)} {reply_text}"
    return {
        "prompt": format_prompt(utterance),
        "utterance": utterance,
        "reply": reply,
        "action": action_string(intent, room, value),
        "intent": intent.name,
        "room": room,
    }


def held_out_combinations(seed: int, rooms_per_intent: int = 2) -> set[tuple[str, str]]:
    """(intent, room) pairs reserved for evaluation: each intent loses a few rooms."""
    rng = random.Random(seed)
    held = set()
    for intent in INTENTS:
        for room in rng.sample(ROOMS, rooms_per_intent):
            held.add((intent.name, room))
    return held


def generate_dataset(
    seed: int = 0, train_size: int = 6000, eval_size: int = 200, rooms_per_intent: int = 2
) -> tuple[list[dict], list[dict]]:
    """Return (train, eval) lists of examples; eval uses only held-out combinations."""
    rng = random.Random(seed)
    held = held_out_combinations(seed, rooms_per_intent)
    seen = [(i, r) for i in INTENTS for r in ROOMS if (i.name, r) not in held]
    unseen = [(i, r) for i in INTENTS for r in ROOMS if (i.name, r) in held]
    train = [_make_example(rng, *rng.choice(seen)) for _ in range(train_size)]
    evaluation = [_make_example(rng, *unseen[n % len(unseen)]) for n in range(eval_size)]
    return train, evaluation


def room_rows(seed: int, rooms: list[str], size: int) -> list[dict]:
    """``size`` examples of every intent in ``rooms`` only: a new domain for fine-tuning a
    student trained on the other rooms (``split_by_room``)."""
    unknown = [r for r in rooms if r not in ROOMS]
    if unknown:
        raise ValueError(f"unknown rooms {unknown}; the demo rooms are {ROOMS}")
    rng = random.Random(seed)
    pairs = [(i, r) for i in INTENTS for r in rooms]
    return [_make_example(rng, *rng.choice(pairs)) for _ in range(size)]


def split_by_room(rows: list[dict], rooms: list[str]) -> tuple[list[dict], list[dict]]:
    """(rows in none of ``rooms``, rows in ``rooms``)."""
    inside = [r for r in rows if r.get("room") in rooms]
    return [r for r in rows if r.get("room") not in rooms], inside


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    """Rows as JSONL, atomically (read them back with ``moe2edge.rows.read_rows``)."""
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def jsgf_grammar(name: str = "moe2edge_commands") -> str:
    """The command grammar in JSGF, for a grammar-constrained speech recognizer."""
    numbers = sorted({v for i in INTENTS for v in i.values})
    lines = [
        "#JSGF V1.0;",
        f"grammar {name};",
        "<room> = " + " | ".join(ROOMS) + ";",
        "<number> = " + " | ".join(number_to_words(n) for n in numbers) + ";",
    ]
    alternatives = []
    for intent in INTENTS:
        for template in intent.templates:
            alternatives.append(template.replace("{room}", "<room>").replace("{value}", "<number>"))
    lines.append("public <command> = " + " | ".join(f"( {a} )" for a in alternatives) + ";")
    return "\n".join(lines) + "\n"


def write_demo_data(
    out_dir: str | Path, seed: int = 0, train_size: int = 6000, eval_size: int = 200
) -> dict[str, Path]:
    out_dir = Path(out_dir)
    train, evaluation = generate_dataset(seed, train_size, eval_size)
    paths = {
        "train": out_dir / "train.jsonl",
        "eval": out_dir / "eval.jsonl",
        "grammar": out_dir / "commands.jsgf",
    }
    write_jsonl(train, paths["train"])
    write_jsonl(evaluation, paths["eval"])
    atomic_write(paths["grammar"], jsgf_grammar())
    return paths
