"""Speculative decoding and prefix reuse, measured: the ``speculative`` and ``prefix_reuse``
keys of bench/runtime.py (also runnable alone).

- ``speculative``: per precision (a student's fp32 and int4 bundles), greedy decode tok/s of
  plain decoding, prompt lookup (``ngram``) and the draft bundle (``--draft``, when given),
  on smart-home prompts in the bundle's chat format; the methods take turns on every prompt
  (rotated order), in one process per precision; acceptance = accepted / proposed tokens;
  ``greedy_equal``: every method's tokens equal plain decoding's.
- ``prefix_reuse``: TTFT of the next chat turn after a history of ``--history-tokens``
  tokens: from a fresh conversation (the whole prompt prefilled) vs from the prefix cache
  holding the history (``runtime.prefix_cache``: what the HTTP API does); medians.

    python bench/speculative.py --fp32 runs/demo/bundles/fast-fp32 \\
        --int4 runs/demo/bundles/fast-int4 --draft runs/demo/bundles/draft
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

UTTERANCES = [
    "turn on the kitchen lights",
    "switch off the fan in the office",
    "dim the living room lights to forty percent",
    "set the bedroom thermostat to twenty one degrees",
    "turn on the garage lights and lock the front door",
    "make the basement lights orange",
    "what is the temperature in the nursery",
    "open the blinds in the study and turn off the attic fan",
]
REPLY = "done, the lights are on."


def speculative_child(spec: dict) -> dict:
    """One bundle: plain / ngram / draft on every prompt, in rotated order."""
    from moe2edge.runtime import Generator, SamplingParams
    from moe2edge.runtime.engine import open_engine
    from moe2edge.runtime.speculative import SpeculationConfig

    plain = Generator.from_bundle(spec["bundle"], threads=spec["threads"])
    methods = {"plain": plain, "ngram": plain.with_speculation(SpeculationConfig("ngram"))}
    if spec.get("draft"):
        draft = open_engine(spec["draft"], threads=spec["threads"])
        config = SpeculationConfig("draft", spec["draft"], max_draft_tokens=spec["max_draft"])
        methods["draft"] = plain.with_speculation(config, draft)
    params = SamplingParams(max_new_tokens=spec["new_tokens"], ignore_eos=spec["ignore_eos"])
    names = list(methods)
    totals = {n: {"tokens": 0, "s": 0.0, "proposed": 0, "accepted": 0} for n in names}
    equal = True
    for gen in methods.values():  # warm-up: first-run allocations, not measured
        gen.generate(UTTERANCES[0], params)
    for round_ in range(spec["repeats"]):
        for i, prompt in enumerate(spec["prompts"]):
            shift = (round_ + i) % len(names)
            tokens = {}
            for name in names[shift:] + names[:shift]:
                result = methods[name].generate(prompt, params)
                tokens[name] = result.token_ids
                t = totals[name]
                t["tokens"] += len(result.token_ids) - 1
                t["s"] += result.decode_ms / 1000
                t["proposed"] += result.proposed_tokens
                t["accepted"] += result.accepted_tokens
            equal &= all(v == tokens["plain"] for v in tokens.values())
    return {
        "decode_tok_s": {n: round(t["tokens"] / t["s"], 2) for n, t in totals.items()},
        "acceptance": {
            n: round(t["accepted"] / t["proposed"], 3) for n, t in totals.items() if t["proposed"]
        },
        "greedy_equal": equal,
    }


def prefix_reuse_child(spec: dict) -> dict:
    """TTFT of the turn after a history of ``history_tokens``, without and with reuse."""
    from moe2edge.runtime import Generator, SamplingParams
    from moe2edge.runtime.prefix_cache import PrefixCache, conversation_for
    from moe2edge.runtime.session import Conversation, render_chat

    gen = Generator.from_bundle(spec["bundle"], threads=spec["threads"])
    history: list[tuple[str, str]] = []
    while len(render_chat(gen, history)) < spec["history_tokens"]:
        history += [("user", UTTERANCES[len(history) // 2 % len(UTTERANCES)]), ("assistant", REPLY)]
    turn = render_chat(gen, [*history, ("user", "and the hallway lights too")])
    one = SamplingParams(max_new_tokens=1)

    def ttft(conversation_of) -> float:
        t0 = time.perf_counter()
        conversation = conversation_of()
        conversation.sync(turn)
        conversation.reply(one)
        return (time.perf_counter() - t0) * 1000

    def cached() -> PrefixCache:
        prefixes = PrefixCache(1 << 30)
        earlier = Conversation(gen)
        earlier.sync(render_chat(gen, history))  # what turn N-1 left in the cache
        prefixes.insert(earlier.cache)
        return prefixes

    without, with_ = [], []
    for _ in range(spec["repeats"]):
        prefixes = cached()
        without.append(ttft(lambda: Conversation(gen)))
        with_.append(ttft(lambda p=prefixes: conversation_for(gen, p, turn)))
    ms_without, ms_with = statistics.median(without), statistics.median(with_)
    return {
        "history_tokens": len(render_chat(gen, history)),
        "prompt_tokens": len(turn),
        "ttft_ms_without": round(ms_without, 2),
        "ttft_ms_with": round(ms_with, 2),
        "ratio": round(ms_with / ms_without, 3),
    }


CHILDREN = {"speculative": speculative_child, "prefix_reuse": prefix_reuse_child}


def in_child(kind: str, spec: dict) -> dict:
    """``kind`` measured in a fresh process (its own ORT sessions, nothing else loaded)."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, json.dumps(spec)],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(
    bundles: dict[str, str | Path],
    draft: str | Path | None,
    threads: int,
    repeats: int = 2,
    new_tokens: int = 64,
    history_tokens: int = 256,
    ignore_eos: bool = False,
    max_draft: int = 8,
) -> dict:
    """Both sections for ``bundles`` (precision -> bundle directory)."""
    common = {"threads": threads, "repeats": repeats}
    spec = {}
    for precision, bundle in bundles.items():
        spec[precision] = in_child(
            "speculative",
            {
                **common,
                "bundle": str(bundle),
                "draft": str(draft) if draft else None,
                "prompts": UTTERANCES,
                "new_tokens": new_tokens,
                "ignore_eos": ignore_eos,
                "max_draft": max_draft,
            },
        )
    first = next(iter(bundles.values()))
    reuse = in_child(
        "prefix_reuse",
        {
            **common,
            "repeats": max(repeats, 3),
            "bundle": str(first),
            "history_tokens": history_tokens,
        },
    )
    return {
        "speculative": {
            "acceptance": {p: s["acceptance"] for p, s in spec.items()},
            "decode_tok_s": {p: s["decode_tok_s"] for p, s in spec.items()},
            "greedy_equal": {p: s["greedy_equal"] for p, s in spec.items()},
            "speedup_vs_plain": {
                p: {
                    m: round(v / s["decode_tok_s"]["plain"], 3)
                    for m, v in s["decode_tok_s"].items()
                    if m != "plain"
                }
                for p, s in spec.items()
            },
            "bundles": {p: str(b) for p, b in bundles.items()},
            "draft": str(draft) if draft else None,
        },
        "prefix_reuse": {**reuse, "bundle": str(first)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fp32", help="the student's fp32 bundle")
    parser.add_argument("--int4", help="the student's int4 bundle")
    parser.add_argument("--draft", help="its draft bundle (omit: prompt lookup only)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--history-tokens", type=int, default=256)
    parser.add_argument("--ignore-eos", action="store_true", help="always new-tokens tokens")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, spec = args.child
        print(json.dumps(CHILDREN[kind](json.loads(spec))))
        return
    bundles = {p: b for p, b in (("fp32", args.fp32), ("int4", args.int4)) if b}
    if not bundles:
        parser.error("give --fp32 and/or --int4 bundles")
    started = time.time()
    out = measure(
        bundles,
        args.draft,
        args.threads,
        args.repeats,
        args.new_tokens,
        args.history_tokens,
        args.ignore_eos,
    )
    out["total_s"] = round(time.time() - started, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
