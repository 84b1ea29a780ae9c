"""The ``profile`` section of the product benchmark (``bench/product.py`` imports ``run``).

One run of ``moe2edge profile`` (``moe2edge.jetson.profile``) on a demo-domain student's
fast bundle: prefill, decode and a batched decode under ONNX Runtime's profiler, the
per-layer / per-operator tables, the Chrome/Perfetto trace, the PNG chart, and the ranked
suggestions of ``--suggest`` (``moe2edge.jetson.suggest``) with the INT4 sibling measured
side by side.

Bundles: ``--bundle`` (and ``--int4-bundle``) if given; else ``runs/demo/bundles/fast-*``
when ``make demo`` made them; else a demo-domain student is built here once (cached in
``--work``): the demo data set's tokenizer and a Llama student of the ``--student-preset``
shape (default ``100m``, random init: the timings do not depend on the weights' values),
exported by onnxruntime-genai's model builder at fp32 and int4 (``export fast``).

    python bench/product_profile.py [--bundle B] [--int4-bundle B4] [--decode-steps 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_WORK = ROOT / "runs" / "bench-profile"
VOCAB = 4096  # the student's vocabulary: the demo BPE (768) plus filler tokens


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def prepare(work: Path, preset: str = "100m", seed: int = 0) -> dict[str, Path]:
    """The demo-domain student of shape ``preset`` and its fast fp32 / int4 bundles (cached)."""
    demo = ROOT / "runs" / "demo" / "bundles"
    if (demo / "fast-fp32" / "manifest.json").is_file():
        found = {"fp32": demo / "fast-fp32", "source": demo}
        int4 = sorted(demo.glob("fast-int4*"))
        if int4:
            found["int4"] = int4[0]
        return found
    work = work / preset
    paths = {"fp32": work / "bundle_fp32", "int4": work / "bundle_int4", "source": work}
    built = all((paths[p] / "manifest.json").is_file() for p in ("fp32", "int4"))
    if (
        built
        and json.loads((paths["fp32"] / "manifest.json").read_text())["model"]["vocab_size"]
        == VOCAB
    ):
        return paths
    import torch

    from moe2edge.distill.demo_data import write_demo_data
    from moe2edge.distill.pipeline import make_tokenizer
    from moe2edge.distill.student import build_student
    from moe2edge.distill.tokenizer import load_tokenizer
    from moe2edge.export.genai_graph import export_fast, run_builder

    torch.set_num_threads(os.cpu_count() or 1)
    data = write_demo_data(work / "data", seed=seed, train_size=2000, eval_size=8)
    make_tokenizer(data["train"], work / "tokenizer", vocab_size=768)
    tokenizer = load_tokenizer(work / "tokenizer")
    # one text token per id up to VOCAB, so every id the random model emits is text; and a
    # vocabulary unlike the hidden size: onnxruntime-genai 0.18's builder wires the lm_head
    # to layer 0's output when vocab_size == hidden_size (the 100m preset's 768)
    tokenizer.add_tokens([f"<t{i}>" for i in range(len(tokenizer), VOCAB)])
    model = build_student(preset, vocab_size=len(tokenizer), seed=seed)
    student = work / "student"
    model.save_pretrained(student)
    tokenizer.save_pretrained(student)
    sources = run_builder(student, {p: work / f"genai_{p}" for p in ("fp32", "int4")})
    for precision, src in sources.items():
        export_fast(student, paths[precision], precision, builder_dir=src, overwrite=True)
    return paths


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Profile the bundle and return the ``profile`` section: ops_covered_pct, trace_file,
    suggestions, and what they were computed from."""
    from moe2edge.jetson.profile import ProfileConfig, profile_bundle
    from moe2edge.jetson.suggest import suggest

    work = Path(getattr(args, "work", None) or DEFAULT_WORK)
    bundle = getattr(args, "bundle", None)
    int4 = getattr(args, "int4_bundle", None)
    source = "given"
    if bundle is None:
        paths = prepare(work, getattr(args, "student_preset", "100m"), getattr(args, "seed", 0))
        bundle, int4, source = paths["fp32"], int4 or paths.get("int4"), str(paths["source"])
    threads = int(getattr(args, "threads", 1) or 1)  # the service's default (ServerConfig)
    cores = os.cpu_count() or 1
    config = ProfileConfig(
        decode_steps=int(getattr(args, "decode_steps", 32)),
        batch=int(getattr(args, "batch", 4)),
        threads=threads,
        compare_threads=tuple(sorted({1, cores})),
    )
    out_dir = Path(getattr(args, "out", None) or work / "profile")
    started = time.perf_counter()
    result = profile_bundle(bundle, out_dir, config, compare=[int4] if int4 else [])
    suggestions = suggest(result)
    return {
        "bundle": str(bundle),
        "bundle_source": source,
        "model": result["model"],
        "precision": result["precision"],
        "ops_covered_pct": result["coverage"]["ops_covered_pct"],
        "ops_covered_excluding_off_cpu_pct": result["coverage"][
            "ops_covered_excluding_off_cpu_pct"
        ],
        "coverage": result["coverage"],
        "trace_file": result["trace_file"],
        "chart_file": result.get("chart_file"),
        "tables_file": result["tables_file"],
        "phases": {
            name: {k: v for k, v in phase.items() if k not in ("by_layer", "by_op")}
            for name, phase in result["phases"].items()
        },
        "top_ops_decode": result["phases"]["decode"]["by_op"][:5],
        "measured": result["measured"],
        "suggestions": suggestions,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="the bundle to profile (default: the demo student's)")
    parser.add_argument("--int4-bundle", help="its int4 sibling, measured side by side")
    parser.add_argument("--work", default=str(DEFAULT_WORK))
    parser.add_argument("--out", help="profile output folder (default: WORK/profile)")
    parser.add_argument("--student-preset", default="100m")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="ORT threads (the service's 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=str(ROOT / "bench/results/product_profile.json"))
    args = parser.parse_args()
    out = run(args)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        from moe2edge.fileio import atomic_write

        atomic_write(Path(args.json), text + "\n")


if __name__ == "__main__":
    main()
