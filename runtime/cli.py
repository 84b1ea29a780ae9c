"""``moe2edge generate BUNDLE "prompt"``: stream a reply to stdout."""

from __future__ import annotations

import argparse
import json
import sys

from moe2edge.runtime.generate import GenerationResult, Generator
from moe2edge.runtime.sampling import SamplingParams


def register(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=help_text)
    p.add_argument("bundle", help="bundle directory (holds manifest.json)")
    p.add_argument("prompt", help="the user's message")
    p.add_argument("--raw", action="store_true", help="do not apply the bundle's prompt template")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "tensorrt"])
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = ORT default)")
    p.add_argument("--stats", action="store_true", help="print timings as JSON to stderr")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    generator = Generator.from_bundle(args.bundle, device=args.device, threads=args.threads)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens or generator.default_max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
    )
    params.validate()
    result = GenerationResult()
    for piece in generator.stream(
        generator.encode_prompt(args.prompt, not args.raw), params, result=result
    ):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        stats = {
            "prompt_tokens": result.prompt_tokens,
            "new_tokens": len(result.token_ids),
            "finish_reason": result.finish_reason,
            "ttft_ms": round(result.ttft_ms, 2),
            "decode_tok_s": round(result.decode_tok_s, 1),
        }
        print(json.dumps(stats), file=sys.stderr)
    return 0
