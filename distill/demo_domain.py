"""The demo domain's vocabulary: rooms, intents, utterance and reply templates, reply weights.

DEMO ONLY (see ``demo_data`` for the generated data set). An action is
``[intent room=<room_id> value=<v>]``; a spoken reply is ``"<opener>, <clause>."`` for one
action and ``"<opener>, <clause 1> and <clause 2>."`` for a compound command. Openers and each
intent's clauses carry Zipf-like weights (the first form is the most common), so the
distribution over paraphrases is skewed and a teacher's soft targets say more than one-hot
labels. ``reply_forms`` lists every spoken reply the domain allows for a sequence of actions:
the reply-wellformedness metric (``evaluate.reply_wellformed``) checks a reply against it.
Stdlib only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from itertools import product

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
    "guest room",
    "laundry room",
    "study",
    "attic",
]

ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
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
    """0..999 in words, the way a speech recognizer writes them ("one hundred eighty")."""
    if n >= 100:
        hundreds, rest = divmod(n, 100)
        return f"{ONES[hundreds]} hundred" + ("" if rest == 0 else " " + number_to_words(rest))
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens * 10] + ("" if ones == 0 else " " + ONES[ones])


@dataclass(frozen=True)
class Intent:
    """One command type: its action name, utterance templates and reply clauses.

    Templates take ``{room}`` and ``{value}``; ``followups`` are utterances that refer back to
    the device of the previous turn ("turn it off"); ``relative`` are follow-ups that move the
    previous turn's value by a step ("make it warmer": +1 step).
    """

    name: str  # e.g. "lights.on"
    templates: tuple[str, ...]
    replies: tuple[str, ...]  # clauses, most common first; "{room}", "{value}"
    values: tuple[int | str, ...] = ()  # allowed values, if the intent takes one
    unit: str = ""
    followups: tuple[str, ...] = ()
    relative: tuple[tuple[str, int], ...] = ()

    @property
    def device(self) -> str:
        return self.name.split(".")[0]


def _i(name, templates, replies, values=(), unit="", followups=(), relative=()) -> Intent:
    return Intent(
        name,
        tuple(templates),
        tuple(replies),
        tuple(values),
        unit,
        tuple(followups),
        tuple(relative),
    )


PERCENT = tuple(range(10, 101, 10))
COLOURS = ("red", "blue", "green", "purple", "orange", "yellow", "pink", "white")

# fmt: off
INTENTS: tuple[Intent, ...] = (
    _i("lights.on",
       ["turn on the {room} lights", "switch on the lights in the {room}",
        "please turn the {room} lights on", "lights on in the {room}",
        "can you turn on the lights in the {room}"],
       ["the {room} lights are on", "{room} lights on", "turning on the {room} lights",
        "i have switched on the lights in the {room} for you"],
       followups=["turn them on", "switch them back on", "now turn them on"]),
    _i("lights.off",
       ["turn off the {room} lights", "switch off the lights in the {room}",
        "please turn the {room} lights off", "lights off in the {room}",
        "can you turn off the lights in the {room}"],
       ["the {room} lights are off", "{room} lights off", "turning off the {room} lights",
        "i have switched off all the lights in the {room}"],
       followups=["turn them off", "switch them off", "now turn them off again"]),
    _i("lights.dim",
       ["dim the {room} lights to {value} percent", "set the {room} lights to {value} percent",
        "make the lights in the {room} {value} percent"],
       ["{room} lights at {value} percent", "dimming the {room} lights to {value}",
        "{room} lights to {value} percent",
        "the lights in the {room} are now set to {value} percent brightness"],
       PERCENT, "percent",
       followups=["dim them to {value} percent", "set them to {value} percent"],
       relative=[("make them brighter", 2), ("make them a bit darker", -2)]),
    _i("lights.colour",
       ["make the {room} lights {value}", "change the {room} lights to {value}",
        "set the lights in the {room} to {value}"],
       ["{room} lights are {value}", "changing the {room} lights to {value}",
        "the lights in the {room} will glow {value} from now on"],
       COLOURS, followups=["make them {value}", "change them to {value}"]),
    _i("fan.on",
       ["turn on the {room} fan", "switch on the fan in the {room}", "start the {room} fan"],
       ["the {room} fan is on", "{room} fan running", "starting the {room} fan",
        "the fan in the {room} is now running at its last speed"],
       followups=["turn it on", "start it again"]),
    _i("fan.off",
       ["turn off the {room} fan", "switch off the fan in the {room}", "stop the {room} fan"],
       ["the {room} fan is off", "{room} fan stopped", "stopping the {room} fan",
        "i have turned the fan in the {room} off for you"],
       followups=["turn it off", "stop it", "switch it off"]),
    _i("fan.speed",
       ["set the {room} fan to speed {value}", "put the fan in the {room} on speed {value}"],
       ["{room} fan at speed {value}", "{room} fan speed {value}",
        "the fan in the {room} is now spinning at speed {value}"],
       (1, 2, 3, 4, 5), followups=["set it to speed {value}", "put it on speed {value}"],
       relative=[("make it faster", 1), ("slow it down", -1)]),
    _i("heater.on",
       ["turn on the {room} heater", "switch on the heater in the {room}", "warm up the {room}"],
       ["the {room} heater is on", "heating the {room}", "{room} heater on",
        "the heater in the {room} is on and warming the room up"],
       followups=["turn it on", "switch it on"]),
    _i("heater.off",
       ["turn off the {room} heater", "switch off the heater in the {room}"],
       ["the {room} heater is off", "{room} heater off",
        "i have switched the heater in the {room} off"],
       followups=["turn it off", "switch it off"]),
    _i("thermostat.set",
       ["set the {room} thermostat to {value} degrees",
        "set the temperature in the {room} to {value}", "make the {room} {value} degrees"],
       ["{room} thermostat set to {value} degrees", "the {room} will be {value} degrees",
        "{room} at {value} degrees",
        "the thermostat in the {room} is now set to {value} degrees"],
       tuple(range(16, 29)), "degrees", followups=["set it to {value} degrees"],
       relative=[("make it warmer", 1), ("make it cooler", -1), ("a bit warmer please", 1)]),
    _i("thermostat.query",
       ["what is the temperature in the {room}", "how warm is the {room}",
        "tell me the {room} temperature"],
       ["checking the {room} temperature", "let me check the {room} thermostat",
        "one moment while i read the thermostat in the {room}"]),
    _i("speaker.volume",
       ["set the {room} speaker volume to {value}", "turn the {room} speaker to {value}",
        "change the volume in the {room} to {value}"],
       ["{room} speaker volume {value}", "{room} volume at {value}",
        "the speaker in the {room} is now playing at volume {value}"],
       tuple(range(0, 101, 10)), followups=["set it to {value}", "change it to {value}"],
       relative=[("turn it up", 1), ("turn it down", -1)]),
    _i("speaker.off",
       ["turn off the {room} speaker", "stop the music in the {room}", "mute the {room} speaker"],
       ["the {room} speaker is off", "{room} music stopped",
        "i have stopped the music on the {room} speaker"],
       followups=["turn it off", "mute it"]),
    _i("door.lock",
       ["lock the {room} door", "please lock the door to the {room}"],
       ["the {room} door is locked", "{room} door locked",
        "the door to the {room} is locked and secure"],
       followups=["lock it", "lock it again"]),
    _i("door.unlock",
       ["unlock the {room} door", "please unlock the door to the {room}"],
       ["the {room} door is unlocked", "{room} door unlocked",
        "the door to the {room} is unlocked now"],
       followups=["unlock it"]),
    _i("blinds.open",
       ["open the {room} blinds", "raise the blinds in the {room}"],
       ["the {room} blinds are open", "opening the {room} blinds", "{room} blinds up",
        "the blinds in the {room} are all the way open"],
       followups=["open them", "raise them"]),
    _i("blinds.close",
       ["close the {room} blinds", "lower the blinds in the {room}"],
       ["the {room} blinds are closed", "closing the {room} blinds", "{room} blinds down"],
       followups=["close them", "lower them"]),
    _i("blinds.position",
       ["set the {room} blinds to {value} percent", "open the blinds in the {room} {value} percent"],
       ["{room} blinds at {value} percent", "moving the {room} blinds to {value} percent",
        "the blinds in the {room} are now {value} percent open"],
       PERCENT, "percent", followups=["set them to {value} percent"],
       relative=[("open them a bit more", 2), ("close them a little", -2)]),
    _i("curtains.open",
       ["open the {room} curtains", "draw back the curtains in the {room}"],
       ["the {room} curtains are open", "opening the {room} curtains",
        "the curtains in the {room} are drawn back"],
       followups=["open them"]),
    _i("curtains.close",
       ["close the {room} curtains", "draw the curtains in the {room}"],
       ["the {room} curtains are closed", "closing the {room} curtains",
        "the curtains in the {room} are drawn"],
       followups=["close them"]),
    _i("tv.on",
       ["turn on the {room} tv", "switch on the television in the {room}"],
       ["the {room} tv is on", "{room} tv on", "turning on the television in the {room}"],
       followups=["turn it on"]),
    _i("tv.off",
       ["turn off the {room} tv", "switch off the television in the {room}"],
       ["the {room} tv is off", "{room} tv off",
        "i have switched off the television in the {room}"],
       followups=["turn it off", "switch it off"]),
    _i("tv.channel",
       ["put the {room} tv on channel {value}", "change the channel in the {room} to {value}"],
       ["{room} tv on channel {value}", "switching the {room} tv to channel {value}",
        "the television in the {room} is now showing channel {value}"],
       tuple(range(1, 41)), followups=["put it on channel {value}"],
       relative=[("next channel", 1), ("go back a channel", -1)]),
    _i("tv.volume",
       ["set the {room} tv volume to {value}", "turn the tv in the {room} to volume {value}"],
       ["{room} tv volume {value}", "{room} tv at volume {value}",
        "the television in the {room} is now at volume {value}"],
       tuple(range(0, 101, 5)), followups=["set the volume to {value}"],
       relative=[("louder please", 2), ("a bit quieter", -2)]),
    _i("oven.preheat",
       ["warm the oven in the {room} to {value} degrees",
        "heat the {room} oven to {value} degrees"],
       ["heating the {room} oven to {value} degrees", "{room} oven heating to {value}",
        "the oven in the {room} will be at {value} degrees in a few minutes"],
       tuple(range(150, 251, 10)), "degrees", followups=["set it to {value} degrees"],
       relative=[("make it hotter", 2)]),
    _i("oven.off",
       ["turn off the {room} oven", "switch off the oven in the {room}"],
       ["the {room} oven is off", "{room} oven off"],
       followups=["turn it off"]),
    _i("kettle.on",
       ["turn on the {room} kettle", "boil the kettle in the {room}", "put the {room} kettle on"],
       ["the {room} kettle is on", "boiling the {room} kettle",
        "the kettle in the {room} will be boiled in a couple of minutes"]),
    _i("vacuum.start",
       ["vacuum the {room}", "start the vacuum in the {room}", "clean the {room} floor"],
       ["vacuuming the {room}", "the vacuum is cleaning the {room}",
        "the robot vacuum is on its way to clean the {room}"],
       followups=["start it again"]),
    _i("vacuum.stop",
       ["stop the vacuum in the {room}", "stop vacuuming the {room}"],
       ["the vacuum in the {room} stopped", "stopping the vacuum in the {room}"],
       followups=["stop it"]),
    _i("timer.set",
       ["set a timer for {value} minutes in the {room}",
        "start a {value} minute timer in the {room}"],
       ["{room} timer set for {value} minutes", "{value} minute timer in the {room}",
        "i will let you know in the {room} when {value} minutes are up"],
       tuple(range(1, 31)) + (45, 60), "minutes", followups=["make it {value} minutes"],
       relative=[("add a minute", 1)]),
    _i("alarm.set",
       ["set an alarm in {value} minutes in the {room}",
        "wake me up in {value} minutes in the {room}"],
       ["{room} alarm in {value} minutes", "alarm set for {value} minutes in the {room}",
        "the alarm in the {room} will ring in {value} minutes"],
       (5, 10, 15, 20, 30, 45, 60), "minutes", followups=["change it to {value} minutes"]),
    _i("window.open",
       ["open the {room} window", "open the window in the {room}"],
       ["the {room} window is open", "opening the {room} window"],
       followups=["open it"]),
    _i("window.close",
       ["close the {room} window", "shut the window in the {room}"],
       ["the {room} window is closed", "closing the {room} window",
        "the window in the {room} is shut now"],
       followups=["close it", "shut it"]),
)
# fmt: on

BY_NAME = {intent.name: intent for intent in INTENTS}
OPENERS = ("ok", "done", "sure", "alright", "got it")


def zipf_weights(count: int, exponent: float = 1.3) -> tuple[float, ...]:
    """Zipf-like weights over ``count`` forms (rank 1 most likely), summing to 1."""
    raw = [1.0 / (rank**exponent) for rank in range(1, count + 1)]
    return tuple(w / sum(raw) for w in raw)


def room_id(room: str) -> str:
    return room.replace(" ", "_")


def action_string(intent: Intent, room: str, value: int | str | None) -> str:
    """The canonical action, e.g. ``[lights.dim room=dining_room value=30]``."""
    parts = [intent.name, f"room={room_id(room)}"]
    if value is not None:
        parts.append(f"value={value}")
    return "[" + " ".join(parts) + "]"


_ACTION_FIELDS = re.compile(r"\[([a-z_]+\.[a-z_]+) room=([a-z_]+)(?: value=([a-z0-9_]+))?\]")
_ROOM_BY_ID = {room_id(r): r for r in ROOMS}


def parse_action(action: str) -> tuple[Intent, str, int | str | None] | None:
    """(intent, room, value) of a canonical action string; None if it is not one."""
    match = _ACTION_FIELDS.fullmatch(action)
    if not match or match.group(1) not in BY_NAME or match.group(2) not in _ROOM_BY_ID:
        return None
    intent, raw = BY_NAME[match.group(1)], match.group(3)
    value = next((v for v in intent.values if str(v) == raw), None)
    if (raw is None) != (not intent.values) or (raw is not None and value is None):
        return None
    return intent, _ROOM_BY_ID[match.group(2)], value


def clause(intent: Intent, form: int, room: str, value: int | str | None) -> str:
    return intent.replies[form].format(room=room, value=value)


def spoken_reply(opener: str, clauses: list[str]) -> str:
    return f"{opener}, {' and '.join(clauses)}."


@cache
def _forms(actions: tuple[str, ...]) -> frozenset[str]:
    parsed = [parse_action(a) for a in actions]
    if not parsed or any(p is None for p in parsed):
        return frozenset()
    options = [[clause(i, f, r, v) for f in range(len(i.replies))] for i, r, v in parsed]
    return frozenset(spoken_reply(o, list(c)) for o in OPENERS for c in product(*options))


def reply_forms(actions: list[str]) -> frozenset[str]:
    """Every spoken reply the domain allows after ``actions`` (empty if any is not valid)."""
    return _forms(tuple(actions)) if 0 < len(actions) <= 3 else frozenset()


_ACTION_SPAN = re.compile(r"\[[^\]]*\]")


def is_wellformed(reply: str) -> bool:
    """Whether ``reply`` is its action(s), one space apart, then a spoken reply the domain
    allows for exactly those actions (their rooms and values): "sure, dimming the dimmm
    percent." after ``[lights.dim ...]`` is not."""
    actions = _ACTION_SPAN.findall(reply)
    head = " ".join(actions)
    text = reply.strip()
    if not actions or not text.startswith(head + " "):
        return False
    return text[len(head) + 1 :] in reply_forms(actions)


def demo_tools() -> list[dict]:
    """The domain's actions as OpenAI function tools, one per intent (named as the action:
    ``lights.dim``), arguments ``room`` (a room id) and ``value`` where the intent takes one
    (its allowed values). A client passes them as ``tools=``; a bracket-format bundle writes
    a call as the action string (``[lights.dim room=dining_room value=30]``)."""
    tools = []
    for intent in INTENTS:
        props: dict = {"room": {"type": "string", "enum": [room_id(r) for r in ROOMS]}}
        if intent.values:
            kind = "integer" if isinstance(intent.values[0], int) else "string"
            props["value"] = {"type": kind, "enum": list(intent.values)}
            if intent.unit:
                props["value"]["description"] = intent.unit
        device, verb = intent.name.split(".")
        tools.append(
            {
                "type": "function",
                "function": {
                    "name": intent.name,
                    "description": f"{verb} the {device} in a room",
                    "parameters": {
                        "type": "object",
                        "properties": props,
                        "required": list(props),
                        "additionalProperties": False,
                    },
                    "strict": True,
                },
            }
        )
    return tools


def tool_call_action(name: str, arguments: dict) -> str | None:
    """The canonical action string of a demo tool call (None: not a domain action)."""
    intent = BY_NAME.get(name)
    room = _ROOM_BY_ID.get(arguments.get("room", ""))
    if intent is None or room is None:
        return None
    value = arguments.get("value")
    action = action_string(intent, room, value)
    return action if parse_action(action) is not None else None
