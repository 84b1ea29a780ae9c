"""GGUF benchmark: `moe2edge export gguf` files in llama.cpp (llama-cpp-python) against the
FP32 ONNX bundle.

For each of F16, Q8_0, Q4_0 it reports: file bytes, load seconds, llama.cpp decode tokens/s
(one-token steps, one thread), greedy agreement with the FP32 bundle on the eval prompts
(``greedy_equal``: identical replies; ``token_agreement``: positions before the first
difference) and whether llama.cpp's tokenizer gives the runtime's prompt ids. Prints one
JSON object and writes bench/results/gguf.json.

    make gguf-check  # llama-cpp-python built for the CPU (long; see the Makefile)
    python bench/gguf.py [--student DIR --bundle DIR --eval FILE] [--steps 300]

Without --student it builds a demo-like student first (demo data -> tokenizer -> the `demo`
student preset trained with cross-entropy only; no teacher: GGUF export does not care where
the weights came from) and its FP32 bundle (~3 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not bench/: this file's name would shadow the `gguf` package

from moe2edge.export.gguf import GGUF_TYPES, compare_with_bundle, export_gguf  # noqa: E402
from moe2edge.fileio import atomic_write_json  # noqa: E402


def build_student(work: Path, steps: int) -> tuple[Path, Path, Path]:
    """(student dir, FP32 bundle, eval JSONL) of a demo-like student trained with CE."""
    import torch

    from moe2edge.distill.demo_data import write_demo_data
    from moe2edge.distill.pipeline import make_tokenizer
    from moe2edge.distill.student import build_student as build_preset
    from moe2edge.distill.tokenizer import load_tokenizer
    from moe2edge.distill.train import TrainConfig, train_model
    from moe2edge.export.onnx_export import export_fp32

    torch.set_num_threads(2)
    paths = write_demo_data(work / "data", seed=0, train_size=3000, eval_size=40)
    make_tokenizer(paths["train"], work / "tokenizer", 384)
    tokenizer = load_tokenizer(work / "tokenizer")
    student = build_preset("demo", len(tokenizer))
    cfg = TrainConfig(
        run_dir=str(work / "student_run"),
        train_data=str(paths["train"]),
        tokenizer=str(work / "tokenizer"),
        teacher=None,
        student_preset="demo",
        max_steps=steps,
        checkpoint_every=0,
        tensorboard=False,
        plot=False,
    )
    student_dir = train_model(student, None, tokenizer, cfg, "student")
    bundle = export_fp32(student_dir, work / "bundle", max_new_tokens=40, overwrite=True)
    return student_dir, bundle, paths["eval"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/bench-gguf")
    parser.add_argument("--student", help="HF Llama checkpoint (default: build one)")
    parser.add_argument("--bundle", help="its FP32 bundle (`moe2edge export onnx`)")
    parser.add_argument("--eval", help="eval JSONL (utterance/prompt rows)")
    parser.add_argument("--steps", type=int, default=300, help="CE steps of the built student")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", default=str(ROOT / "bench/results/gguf.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    if args.student:
        student, bundle, eval_path = Path(args.student), Path(args.bundle), Path(args.eval)
    else:
        student, bundle, eval_path = build_student(work, args.steps)

    results, example = {}, {}
    for gguf_type in GGUF_TYPES:
        summary = export_gguf(student, work / f"student-{gguf_type}.gguf", gguf_type, True)
        check = compare_with_bundle(
            summary["path"], bundle, eval_path, args.prompts, args.max_new_tokens
        )
        results[gguf_type] = {
            "file_bytes": summary["bytes"],
            "kept_f16": summary["kept_f16"],
            **{k: v for k, v in check.items() if k != "per_prompt"},
        }
        first = check["per_prompt"][0]
        example.update(prompt=first["prompt"], fp32_bundle=first["reply"])
        example[gguf_type] = first["llama_cpp_reply"]
    out = {
        "student": str(student),
        "onnx_fp32_bytes": sum(
            p.stat().st_size for p in Path(bundle).glob("model.onnx*") if p.is_file()
        ),
        "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "types": results,
        "example": example,  # the first prompt's greedy replies
    }
    print(json.dumps(out, indent=2))
    atomic_write_json(args.out, out)


if __name__ == "__main__":
    main()
