"""Constrained decoding (runtime/constrained.py) and OpenAI tools / response_format on a real
uvicorn server with the official openai client: tool_choice auto/required/named/none,
streamed tool_call deltas, json_object and json_schema (client.chat.completions.parse),
with batching (slots>1) and ngram speculation on, and bad schemas answered 400."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from moe2edge.distill.demo_domain import demo_tools, tool_call_action
from moe2edge.runtime import Generator, SamplingParams
from moe2edge.runtime.constrained import json_schema_grammar, lark_grammar
from moe2edge.runtime.server import ServerConfig, create_app
from moe2edge.runtime.server.tools import (
    Tool,
    ToolStream,
    parse_reply,
    reply_grammar,
    validate_arguments,
)
from moe2edge.runtime.speculative import SpeculationConfig
from tests.server_helpers import ServerThread

pytest.importorskip("llguidance")

TOOLS = demo_tools()
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
SPECS = [Tool(n, s) for n, s in SCHEMAS.items()]
MESSAGES = [{"role": "user", "content": "dim the office lights to forty percent"}]


@pytest.fixture(scope="module")
def generator(tiny_run) -> Generator:
    return Generator.from_bundle(tiny_run["bundle"], threads=1)


def server(generator, **overrides):
    return ServerThread(create_app(ServerConfig(voice_enabled=False, **overrides), generator))


def check_calls(message) -> None:
    assert message.tool_calls, message
    for call in message.tool_calls:
        args = json.loads(call.function.arguments)
        assert validate_arguments(args, SCHEMAS[call.function.name]) is None
        assert tool_call_action(call.function.name, args) is not None


class Setting(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties false, as strict has

    room: Literal["kitchen", "office", "hallway"]
    level: int = Field(ge=0, le=10)
    on: bool


def test_grammar_parse_and_stream_roundtrip() -> None:
    text = "[lights.dim room=office value=40] [fan.on room=kitchen] ok, done."
    calls, rest = parse_reply(text, SPECS, "bracket")
    assert [(c.name, c.arguments) for c in calls] == [
        ("lights.dim", {"room": "office", "value": 40}),
        ("fan.on", {"room": "kitchen"}),
    ]
    assert rest == "ok, done."
    stream, events = ToolStream(SPECS, "bracket"), []
    for ch in text:  # one character at a time: a call comes out once its bracket closes
        events += stream.feed(ch)
    events += stream.close()
    assert [e[1].name for e in events if e[0] == "call"] == ["lights.dim", "fan.on"]
    assert "".join(e[1] for e in events if e[0] == "text") == "ok, done."
    assert ToolStream(SPECS, "bracket").feed("hello [x") == [("text", "hello [x")]
    # the grammar compiles; a json-format grammar too
    lark_grammar(reply_grammar(SPECS, "bracket", "required"))
    lark_grammar(reply_grammar(SPECS[:3], "json", "auto"))


def test_generator_constrained_plain_and_speculative(generator) -> None:
    grammar = lark_grammar(reply_grammar(SPECS, "bracket", "required"))
    params = SamplingParams(max_new_tokens=60)
    outs = []
    for spec in (None, SpeculationConfig(method="ngram")):
        gen = generator.with_speculation(spec)
        ids = gen.encode_prompt(MESSAGES[0]["content"])
        constraint = gen.grammars.constraint(grammar)
        text = "".join(gen.stream(ids, params, constraint=constraint))
        calls, _ = parse_reply(text, SPECS, "bracket")
        assert calls and all(
            validate_arguments(c.arguments, SCHEMAS[c.name]) is None for c in calls
        )
        outs.append(text)
    assert outs[0] == outs[1]  # greedy: speculation changes nothing, masked or not
    schema = Setting.model_json_schema()
    constraint = generator.grammars.constraint(json_schema_grammar(schema))
    text = "".join(generator.stream(generator.encode_prompt("hi"), params, constraint=constraint))
    Setting.model_validate_json(text)


@pytest.mark.parametrize("overrides", [{"slots": 3}, {"slots": 2, "speculative_decoding": "ngram"}])
def test_openai_tools_and_response_format(generator, overrides) -> None:
    with server(generator, **overrides) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)

        def ask(**kwargs):
            return client.chat.completions.create(
                model="m", messages=MESSAGES, max_tokens=60, tools=TOOLS, **kwargs
            )

        choices = ["required", {"type": "function", "function": {"name": "fan.speed"}}, "auto"]
        with ThreadPoolExecutor(3) as pool:  # at once: rows of one batch
            results = list(pool.map(lambda c: ask(tool_choice=c), choices))
        required, named, auto = (r.choices[0] for r in results)
        check_calls(required.message)
        assert required.finish_reason in ("tool_calls", "length")  # (a random model's tail)
        check_calls(named.message)
        assert {c.function.name for c in named.message.tool_calls} == {"fan.speed"}
        if auto.message.tool_calls:
            check_calls(auto.message)
        single = ask(tool_choice="required", parallel_tool_calls=False).choices[0].message
        check_calls(single)
        assert len(single.tool_calls) == 1
        none = ask(tool_choice="none").choices[0].message
        assert not none.tool_calls and none.content is not None

        stream = client.chat.completions.create(
            model="m", messages=MESSAGES, max_tokens=60, tools=TOOLS, tool_choice="required",
            stream=True,
        )  # fmt: skip
        deltas = [c.choices[0] for c in stream if c.choices]
        streamed = [tc for d in deltas for tc in (d.delta.tool_calls or [])]
        assert streamed and deltas[-1].finish_reason in ("tool_calls", "length")
        assert [tc.index for tc in streamed] == list(range(len(streamed)))
        for tc in streamed:
            args = json.loads(tc.function.arguments)
            assert validate_arguments(args, SCHEMAS[tc.function.name]) is None
            assert tc.id.startswith("call_") and tc.type == "function"

        parsed = client.chat.completions.parse(
            model="m", messages=MESSAGES, max_tokens=80, response_format=Setting
        )
        assert isinstance(parsed.choices[0].message.parsed, Setting)
        obj = client.chat.completions.create(
            model="m", messages=MESSAGES, max_tokens=80, response_format={"type": "json_object"}
        )
        if obj.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_bad_tools_and_schemas_are_400(generator) -> None:
    with server(generator) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)

        def bad(match: str, **kwargs) -> None:
            with pytest.raises(openai.BadRequestError, match=match):
                client.chat.completions.create(model="m", messages=MESSAGES, **kwargs)

        nested = {"type": "object", "properties": {"where": {"type": "object"}}}
        tool = {"type": "function", "function": {"name": "move", "parameters": nested}}
        bad("'where'", tools=[tool])  # the bracket format takes flat arguments
        bad("'nope'", tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
        bad("needs tools", tool_choice="required")
        bad("unique", tools=TOOLS[:1] * 2)
        bad("response_format", response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "foo"}}}}})  # fmt: skip
        bad("schema", response_format={"type": "json_schema", "json_schema": {"name": "x"}})
        bad("name", tools=[{"type": "function", "function": {"name": "has space"}}])


def test_greedy_fast_path_chooses_what_the_full_mask_would(generator) -> None:
    """Greedy decoding keeps the model's argmax when the grammar accepts it (one check, no
    vocabulary mask): over random logits it must pick exactly the masked argmax."""
    from moe2edge.runtime.generate import Decoding, GenerationResult

    grammar = json_schema_grammar(Setting.model_json_schema())
    fast = generator.grammars.constraint(grammar)
    reference = generator.grammars.constraint(grammar)
    decoding = Decoding(generator, SamplingParams(), GenerationResult(), 0, None, None, fast)
    rng = np.random.default_rng(0)
    vocab = generator.engine.vocab_size
    for _ in range(40):
        logits = rng.normal(size=vocab).astype(np.float32)
        if rng.random() < 0.5:  # often the model's top choice is what the grammar wants
            allowed = np.flatnonzero(reference.allowed())
            logits[rng.choice(allowed)] += 10
        chosen = decoding.choose(logits, [])
        assert chosen == int(np.argmax(reference.mask(logits)))
        if chosen in decoding.stop_ids:
            break
        assert fast.consume(chosen) and reference.consume(chosen)
