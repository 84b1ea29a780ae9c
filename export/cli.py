"""``moe2edge export ...``: bundles from a student checkpoint, and checks on bundles."""

from __future__ import annotations

import argparse
import json

from runtime.manifest import verify_bundle


def register(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=help_text)
    sub = p.add_subparsers(dest="export_command", required=True, metavar="ACTION")

    onnx = sub.add_parser("onnx", help="FP32 ONNX bundle from an HF student checkpoint")
    onnx.add_argument("student", help="HF checkpoint directory (with tokenizer.json)")
    onnx.add_argument("bundle", help="output bundle directory")
    onnx.add_argument("--max-new-tokens", type=int, default=64)
    onnx.add_argument("--overwrite", action="store_true")
    onnx.add_argument(
        "--parity-prompts",
        help="JSONL with a 'prompt' or 'utterance' field: "
        "check PyTorch vs ONNX Runtime on them and record it in the manifest",
    )
    onnx.add_argument("--parity-limit", type=int, default=50)
    onnx.set_defaults(handler=run_onnx)

    verify = sub.add_parser("verify", help="recompute every hash and check the io contract")
    verify.add_argument("bundle")
    verify.set_defaults(handler=run_verify)


def run_onnx(args: argparse.Namespace) -> int:
    from export.onnx_export import export_fp32

    bundle = export_fp32(args.student, args.bundle, args.max_new_tokens, overwrite=args.overwrite)
    print(f"wrote {bundle}")
    if args.parity_prompts:
        from export.pipeline import parity_for_bundle

        result = parity_for_bundle(args.student, bundle, args.parity_prompts, args.parity_limit)
        print(json.dumps({k: v for k, v in result.items() if k != "per_prompt"}))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from export.verify import verify_io_contract

    manifest = verify_bundle(args.bundle)
    verify_io_contract(args.bundle, manifest)
    print(f"{args.bundle}: {len(manifest['files'])} files verified, io contract ok")
    return 0
