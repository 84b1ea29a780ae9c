"""Speculative decoding and prefix reuse, measured: the ``speculative`` and ``prefix_reuse``
keys of bench/runtime.py (also runnable alone).

- ``speculative``: per precision (a student's fp32 and int4 bundles), greedy decode tok/s of
  plain decoding, prompt lookup (``ngram``) and the draft bundle (``--draft``, when given),
  on smart-home prompts in the bundle's chat format; the methods take turns on every prompt
  (rotated order), in one process per precision; acceptance = accepted / proposed tokens;
  ``greedy_equal``: every method's tokens equal plain decoding's. With ``genai`` bundles
  (the model builder's output the fast bundles were made from), onnxruntime-genai runs the
  same prompts too, plain (``genai``) and with its own n-gram speculative decoding
  (``genai_ngram``: ``set_speculative_options(ngram_size=3, max_draft_tokens=8)``, batch 1
  only in 0.18); ``greedy_equal`` then covers its tokens as well.
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

import numpy as np

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


class GenaiMethod:
    """onnxruntime-genai's generator loop on the same prompt ids, greedy; ``ngram``: its
    n-gram speculative decoding. ``generate`` returns (tokens, decode seconds, stats)."""

    def __init__(self, path: str, threads: int, ngram: bool):
        import onnxruntime_genai as og

        self.og, self.ngram = og, ngram
        config = og.Config(path)
        if threads:
            options = {"intra_op_num_threads": threads}
            config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)

    def generate(self, ids: list[int], new_tokens: int, ignore_eos: bool):
        og = self.og
        params = og.GeneratorParams(self.model)
        total = len(ids) + new_tokens
        params.set_search_options(
            do_sample=False, max_length=total, min_length=total if ignore_eos else 0
        )
        if self.ngram:
            params.set_speculative_options(ngram_size=3, max_draft_tokens=8)
        generator = og.Generator(self.model, params)
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        generator.generate_next_token()
        first = time.perf_counter()
        while not generator.is_done():
            generator.generate_next_token()
        seconds = time.perf_counter() - first
        tokens = [int(t) for t in generator.get_sequence(0)[len(ids) :]]
        stats = generator.get_speculative_stats() if self.ngram else {}
        return tokens, seconds, stats


def speculative_child(spec: dict) -> dict:
    """One bundle: plain / ngram / draft (and genai, genai_ngram) on every prompt, in
    rotated order."""
    from moe2edge.runtime import Generator, SamplingParams
    from moe2edge.runtime.engine import open_engine
    from moe2edge.runtime.speculative import SpeculationConfig

    plain = Generator.from_bundle(spec["bundle"], threads=spec["threads"])
    methods = {"plain": plain, "ngram": plain.with_speculation(SpeculationConfig("ngram"))}
    if spec.get("draft"):
        draft = open_engine(spec["draft"], threads=spec["threads"])
        config = SpeculationConfig("draft", spec["draft"], max_draft_tokens=spec["max_draft"])
        methods["draft"] = plain.with_speculation(config, draft)
    if spec.get("genai"):
        for name, ngram in (("genai", False), ("genai_ngram", True)):
            methods[name] = GenaiMethod(spec["genai"], spec["threads"], ngram)
    params = SamplingParams(max_new_tokens=spec["new_tokens"], ignore_eos=spec["ignore_eos"])

    def run(name: str, prompt: str) -> tuple[list[int], float, int, int]:
        """(tokens, decode seconds, proposed, accepted); an end token ends the tokens."""
        method = methods[name]
        if isinstance(method, GenaiMethod):
            ids = plain.encode_prompt(prompt)
            tokens, seconds, stats = method.generate(ids, spec["new_tokens"], spec["ignore_eos"])
            if not spec["ignore_eos"]:  # ours leave the end token out of token_ids
                ends = set(plain.eos_token_ids)
                tokens = next(
                    (tokens[:i] for i, t in enumerate(tokens) if t in ends), tokens
                )  # fmt: skip
            proposed = int(stats.get("draft_tokens_evaluated", 0))
            return tokens, seconds, proposed, int(stats.get("draft_tokens_accepted", 0))
        result = method.generate(prompt, params)
        return (
            result.token_ids,
            result.decode_ms / 1000,
            result.proposed_tokens,
            result.accepted_tokens,
        )

    names = list(methods)
    totals = {n: {"tokens": 0, "s": 0.0, "proposed": 0, "accepted": 0} for n in names}
    equal = {n: True for n in names}
    for name in names:  # warm-up: first-run allocations, not measured
        run(name, UTTERANCES[0])
    for round_ in range(spec["repeats"]):
        for i, prompt in enumerate(spec["prompts"]):
            shift = (round_ + i) % len(names)
            tokens = {}
            for name in names[shift:] + names[:shift]:
                tokens[name], seconds, proposed, accepted = run(name, prompt)
                t = totals[name]
                t["tokens"] += len(tokens[name]) - 1
                t["s"] += seconds
                t["proposed"] += proposed
                t["accepted"] += accepted
            for name in names:
                equal[name] &= tokens[name] == tokens["plain"]
    return {
        "decode_tok_s": {n: round(t["tokens"] / t["s"], 2) for n, t in totals.items()},
        "acceptance": {
            n: round(t["accepted"] / t["proposed"], 3) for n, t in totals.items() if t["proposed"]
        },
        "greedy_equal": all(equal.values()),
        "greedy_equal_to_plain": equal,
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
    genai: dict[str, str | Path] | None = None,
    prefix_reuse: bool = True,
) -> dict:
    """Both sections for ``bundles`` (precision -> bundle directory); ``genai``: precision
    -> the model builder's bundle for onnxruntime-genai (its plain and n-gram runs); prefix
    reuse runs on the first of ``bundles`` (its context must hold the history);
    ``prefix_reuse=False``: the ``speculative`` section only."""
    genai = genai or {}
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
                "genai": str(genai[precision]) if precision in genai else None,
            },
        )
    first = next(iter(bundles.values()))
    reuse = prefix_reuse and in_child(
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
            "greedy_equal_to_plain": {p: s["greedy_equal_to_plain"] for p, s in spec.items()},
            "bundles": {p: str(b) for p, b in bundles.items()},
            "genai_bundles": {p: str(b) for p, b in genai.items()},
            "draft": str(draft) if draft else None,
        },
        **({"prefix_reuse": {**reuse, "bundle": str(first)}} if reuse else {}),
    }


OURS_SPECULATIVE = ("ngram", "draft")
GENAI_CONFIGS = ("genai", "genai_ngram")


def spec_vs_genai(speculative: dict, suffix: str = "") -> dict:
    """``speedup`` entries of bench/runtime.py: our fastest speculative method over
    onnxruntime-genai's fastest configuration (plain or its n-gram speculation), per
    precision (``moe2edge_spec_vs_genai{suffix}_{precision}``), with which ones they were."""
    speedup, best = {}, {}
    for precision, rates in speculative["decode_tok_s"].items():
        ours = {m: v for m, v in rates.items() if m in OURS_SPECULATIVE}
        theirs = {m: v for m, v in rates.items() if m in GENAI_CONFIGS}
        if ours and theirs:
            a, b = max(ours, key=ours.get), max(theirs, key=theirs.get)
            speedup[f"moe2edge_spec_vs_genai{suffix}_{precision}"] = round(ours[a] / theirs[b], 3)
            best[precision] = {"moe2edge": a, "genai": b}
    return {"speedup": speedup, "best": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fp32", help="the student's fp32 bundle")
    parser.add_argument("--int4", help="the student's int4 bundle")
    parser.add_argument("--draft", help="its draft bundle (omit: prompt lookup only)")
    parser.add_argument("--genai-fp32", help="onnxruntime-genai's bundle of the fp32 student")
    parser.add_argument("--genai-int4", help="... of the int4 student")
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
        genai={p: b for p, b in (("fp32", args.genai_fp32), ("int4", args.genai_int4)) if b},
    )
    out["speculative"]["vs_genai"] = spec_vs_genai(out["speculative"])
    out["total_s"] = round(time.time() - started, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
