"""``moe2edge profile BUNDLE [--suggest]``: the profiler's command line (docs/profiler.md)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from moe2edge.fileio import atomic_write
from moe2edge.jetson.errors import JetsonError


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, not {text!r}"
        ) from None


def register(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=help_text)
    p.add_argument("bundle", help="bundle directory (holds manifest.json)")
    p.add_argument("--out", help="output folder (default: runs/profile/BUNDLE_NAME)")
    p.add_argument("--prompt", default=None, help="the prompt to prefill (default: a demo command)")
    p.add_argument("--prompt-tokens", type=int, default=0, help="repeat/cut the prompt to N tokens")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--batch", type=int, default=4, help="rows of the batched decode (0: skip)")
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: one per core)")
    p.add_argument(
        "--compare-threads",
        type=int_list,
        default=None,
        help="thread counts to time decode at (default: 1 and the core count)",
    )
    p.add_argument(
        "--compare", action="append", default=[], metavar="BUNDLE",
        help="a sibling bundle (e.g. its int4) timed side by side (repeatable)",
    )  # fmt: skip
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "tensorrt"])
    p.add_argument("--suggest", action="store_true", help="print ranked suggestions")
    p.add_argument("--acceptance", type=float, default=None, help="speculation acceptance (0-1)")
    p.add_argument("--no-chart", action="store_true", help="do not write profile.png")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from moe2edge.jetson.profile import PROMPT, ProfileConfig, profile_bundle
    from moe2edge.jetson.suggest import format_suggestions, suggest

    bundle = Path(args.bundle)
    cores = os.cpu_count() or 1
    compare_threads = args.compare_threads
    if compare_threads is None:
        compare_threads = (1, cores) if cores > 1 else (1,)
    config = ProfileConfig(
        prompt=args.prompt or PROMPT,
        prompt_tokens=args.prompt_tokens,
        decode_steps=args.decode_steps,
        batch=args.batch,
        threads=args.threads,
        compare_threads=tuple(compare_threads),
        device=args.device,
        chart=not args.no_chart,
        acceptance=args.acceptance,
    )
    for other in args.compare:
        if not (Path(other) / "manifest.json").is_file():
            raise JetsonError(f"--compare {other} is not a bundle (no manifest.json)")
    out = Path(args.out) if args.out else Path("runs") / "profile" / bundle.resolve().name
    result = profile_bundle(bundle, out, config, compare=args.compare)
    suggestions = suggest(result) if args.suggest else []
    if args.suggest:
        atomic_write(out / "suggestions.json", json.dumps(suggestions, indent=2) + "\n")
    if args.json:
        print(json.dumps({**result, "suggestions": suggestions}, indent=2))
        return 0
    cov = result["coverage"]
    print(
        f"operators: {cov['ops_covered_pct']}% of session-run time "
        f"({cov['node_ms']} / {cov['session_run_ms']} ms, {cov['runs']} runs)"
    )
    for phase in ("prefill", "decode", "batch_decode"):
        p = result["phases"].get(phase)
        if p:
            top = ", ".join(f"{r['op']} {r['share_pct']}%" for r in p["by_op"][:3])
            print(f"{phase}: {p['run_ms']} ms per step; {top}")
    for warning in result.get("warnings", []):
        print(f"warning: {warning}")
    print(
        f"tables: {result['tables_file']}\ntrace (Perfetto / chrome://tracing): {result['trace_file']}"
    )
    print(f"chart: {result['chart_file'] or 'not written (matplotlib is not installed)'}")
    if args.suggest:
        print("suggestions:\n" + format_suggestions(suggestions))
    return 0
