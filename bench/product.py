"""Product benchmarks: ``constrained`` (tool calls under a grammar, bench/product_constrained.py),
``versions`` (bench/product_versions.py) and ``profile`` (bench/product_profile.py).

Each section is a module exposing ``run(args) -> dict``; a section whose module is missing
is reported as ``{"error": ...}``. Results are merged into bench/results/product.json (the
sections not run keep their last results), written atomically, with the machine recorded.

    nice python bench/product.py --sections constrained \\
        --bundle runs/demo/bundles/fp32 --data runs/demo/data
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SECTIONS = ("constrained", "versions", "profile")
RESULTS = ROOT / "bench" / "results" / "product.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    p.add_argument("--bundle", default="runs/demo/bundles/fp32", help="a demo student bundle")
    p.add_argument("--data", default="runs/demo/data", help="the demo data (eval.jsonl)")
    p.add_argument("--prompts", type=int, default=1000)
    p.add_argument("--subset", type=int, default=200, help="prompts of the batching and "
                   "speculation modes")  # fmt: skip
    p.add_argument("--rows", type=int, default=4, help="batching rows (slots)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--profile-bundle", default=None, help="the bundle to profile (default: "
                   "bench/product_profile.py builds a 100m-shaped demo-domain student)")  # fmt: skip
    args, _ = p.parse_known_args(argv)  # the other sections' options are theirs
    return args


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from machine import cpu_name

    from moe2edge.fileio import atomic_write_json

    args = parse_args(argv)
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.is_file() else {}
    for name in [s.strip() for s in args.sections.split(",") if s.strip()]:
        if name not in SECTIONS:
            raise SystemExit(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
        try:
            module = importlib.import_module(f"product_{name}")
        except ModuleNotFoundError as exc:
            report[name] = {"error": f"bench/product_{name}.py is missing ({exc})"}
            continue
        started = time.perf_counter()
        # --bundle and --out are the constrained section's; profile has its own bundle
        own = {"bundle": args.profile_bundle, "out": None} if name == "profile" else {}
        report[name] = module.run(argparse.Namespace(**(vars(args) | own)))
        report[name]["seconds"] = round(time.perf_counter() - started, 1)
    report["machine"] = {
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "threads": args.threads or "default",
    }
    atomic_write_json(out, report)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
