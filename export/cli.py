"""``moe2edge export ...``: bundles from a student checkpoint, quantized variants, checks.

onnx       FP32 ONNX bundle from an HF student (optimum)
fast       ONNX Runtime's fused graph (onnxruntime-genai's model builder)
quantize   FP16 / INT8 (dynamic, static) / INT4 (rtn, hqq, gptq) bundle from the FP32 one
tensorrt   the TensorRT flavour (standard ops, FP16 activations, INT8/INT4 weight-only)
check-trt  which nodes TensorRT's ONNX parser would refuse
report     accuracy of variants against the FP32 bundle, written into each manifest
engine     build a TensorRT engine (on the device, with TensorRT and a GPU)
verify     recompute every hash and check the io contract
gguf       a llama.cpp GGUF file (F16, Q8_0, Q4_0) from an HF Llama student
"""

from __future__ import annotations

import argparse
import json
import logging

from moe2edge.runtime.manifest import verify_bundle

log = logging.getLogger(__name__)


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
    onnx.add_argument(
        "--draft-for",
        metavar="TARGET_BUNDLE",
        help="the student is a draft model (`distill draft`): record the bundle it drafts for",
    )
    onnx.set_defaults(handler=run_onnx)

    from moe2edge.export.genai_graph import register_fast  # imports nothing heavy at module level

    register_fast(sub)

    q = sub.add_parser("quantize", help="a quantized bundle from the FP32 bundle")
    q.add_argument("parent", help="the FP32 bundle (`export onnx` wrote it)")
    q.add_argument("bundle", help="output bundle directory (a new bundle)")
    q.add_argument("--precision", required=True, choices=["fp16", "int8", "int4"])
    q.add_argument(
        "--method",
        choices=["dynamic", "static", "rtn", "hqq", "gptq"],
        help="int8: dynamic (default) or static; int4: rtn (default), hqq or gptq",
    )
    q.add_argument("--target", default="onnxruntime", choices=["onnxruntime", "tensorrt"])
    q.add_argument("--block-size", type=int, default=32, help="INT4 block size (32, 64, 128)")
    q.add_argument("--calibration", help="JSONL for int8 static / gptq (prompt + reply rows)")
    q.add_argument("--calibration-limit", type=int, default=32)
    q.add_argument("--symmetric", action="store_true", help="INT4 without zero points")
    q.add_argument(
        "--keep-embedding", action="store_true", help="INT4: leave the embedding table in FP32"
    )
    q.add_argument("--accuracy-level", type=int, help="MatMulNBits accuracy_level (0-4)")
    q.add_argument(
        "--no-reduce-range",
        action="store_true",
        help="INT8: full 8-bit weights (ARM / VNNI CPUs; see docs/export.md)",
    )
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(handler=run_quantize)

    t = sub.add_parser("tensorrt", help="the TensorRT flavour (standard ONNX ops only)")
    t.add_argument("parent", help="the FP32 bundle")
    t.add_argument("bundle", help="output bundle directory")
    t.add_argument("--precision", default="int4", choices=["fp16", "int8", "int4"])
    t.add_argument("--block-size", type=int, default=32)
    t.add_argument(
        "--asymmetric", action="store_true", help="UINT4 + zero points (TensorRT refuses these)"
    )
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(handler=run_tensorrt)

    c = sub.add_parser("check-trt", help="list nodes TensorRT's ONNX parser does not support")
    c.add_argument("bundle")
    c.add_argument("--json", action="store_true", help="print {unsupported: [...], ...}")
    c.set_defaults(handler=run_check_trt)

    r = sub.add_parser("report", help="accuracy of bundles against their FP32 parent")
    r.add_argument("bundles", nargs="+", help="bundles (the FP32 one is found or named)")
    r.add_argument("--eval", help="JSONL with utterance/prompt, reply, action")
    r.add_argument("--reference", help="the FP32 bundle (default: among the bundles / parent)")
    r.add_argument("--limit", type=int, help="evaluate the first N rows only")
    r.add_argument("--markdown", help="also write the markdown table to this file")
    r.add_argument("--no-write", action="store_true", help="leave the manifests unchanged")
    r.add_argument(
        "--fast-task-acc",
        action="store_true",
        help="task accuracy from the teacher-forced pass, decoding only where a variant "
        "departs from FP32 (equal up to near-ties; see docs/export.md)",
    )
    r.add_argument("--json", action="store_true")
    r.set_defaults(handler=run_report)

    e = sub.add_parser("engine", help="build a TensorRT engine (needs TensorRT and a GPU)")
    e.add_argument("bundle")
    e.add_argument("--out", help="engine directory (default: BUNDLE/engine)")
    e.add_argument("--max-batch", type=int, default=1)
    e.add_argument("--max-seq-len", type=int, help="default: the model's context")
    e.add_argument("--max-prefill", type=int, help="longest prompt chunk (default: context)")
    e.add_argument("--workspace-gb", type=float, default=2.0)
    e.add_argument("--timing-cache", help="reuse/extend this timing cache file")
    e.add_argument("--optimization-level", type=int, default=3)
    e.set_defaults(handler=run_engine)

    verify = sub.add_parser("verify", help="recompute every hash and check the io contract")
    verify.add_argument("bundle")
    verify.set_defaults(handler=run_verify)

    from moe2edge.export.gguf import GGUF_TYPES  # numpy only at module level

    g = sub.add_parser("gguf", help="a llama.cpp GGUF file from an HF Llama student checkpoint")
    g.add_argument("student", help="HF Llama checkpoint directory (with tokenizer.json)")
    g.add_argument("out", help="output .gguf file")
    g.add_argument(
        "--type",
        default="f16",
        choices=GGUF_TYPES,
        help="weights of the 2-D tensors (norms stay F32; see docs/export.md)",
    )
    g.add_argument("--overwrite", action="store_true")
    g.set_defaults(handler=run_gguf)


def run_onnx(args: argparse.Namespace) -> int:
    from moe2edge.export.onnx_export import export_fp32

    bundle = export_fp32(
        args.student,
        args.bundle,
        args.max_new_tokens,
        overwrite=args.overwrite,
        draft_for=args.draft_for,
    )
    print(f"wrote {bundle}")
    if args.parity_prompts:
        from moe2edge.export.pipeline import parity_for_bundle

        result = parity_for_bundle(args.student, bundle, args.parity_prompts, args.parity_limit)
        print(json.dumps({k: v for k, v in result.items() if k != "per_prompt"}))
    return 0


def _precision_line(bundle) -> str:
    from moe2edge.runtime.manifest import read_manifest

    p = read_manifest(bundle)["precision"]
    ratio = p.get("weight_ratio_vs_fp32")
    return f"wrote {bundle}: {p['weights']} {p['method']}" + (
        f", weights {ratio:.3f}x FP32" if ratio else ""
    )


def run_quantize(args: argparse.Namespace) -> int:
    if args.target == "tensorrt":
        from moe2edge.export.errors import ExportError

        if args.method not in (None, "rtn"):
            raise ExportError("the TensorRT flavour quantizes with rtn only")
        args.asymmetric = False  # TensorRT takes symmetric quantization only
        return run_tensorrt(args)
    from moe2edge.export.quantize import quantize_bundle

    bundle = quantize_bundle(
        args.parent,
        args.bundle,
        args.precision,
        args.method,
        args.block_size,
        calibration=args.calibration,
        calibration_limit=args.calibration_limit,
        symmetric=args.symmetric,
        quantize_embedding=not args.keep_embedding,
        accuracy_level=args.accuracy_level,
        reduce_range=not args.no_reduce_range,
        overwrite=args.overwrite,
    )
    print(_precision_line(bundle))
    return 0


def run_tensorrt(args: argparse.Namespace) -> int:
    from moe2edge.export.tensorrt_flavor import tensorrt_bundle

    bundle = tensorrt_bundle(
        args.parent,
        args.bundle,
        args.precision,
        args.block_size,
        symmetric=not args.asymmetric,
        overwrite=args.overwrite,
    )
    print(_precision_line(bundle))
    return 0


def run_check_trt(args: argparse.Namespace) -> int:
    from moe2edge.export.check_trt import check_bundle, summary

    result = check_bundle(args.bundle)
    print(json.dumps(result, indent=2) if args.json else summary(result))
    return 1 if result["unsupported"] or result["errors"] else 0


def run_report(args: argparse.Namespace) -> int:
    from moe2edge.export.report import json_rows, markdown_table, report

    rows = report(
        args.bundles,
        args.eval,
        args.reference,
        limit=args.limit,
        write=not args.no_write,
        exact_greedy=not args.fast_task_acc,
    )
    table = markdown_table(rows)
    if args.markdown:
        from moe2edge.fileio import atomic_write

        atomic_write(args.markdown, table)
    print(json.dumps(json_rows(rows), indent=2) if args.json else table, end="\n")
    return 0


def run_engine(args: argparse.Namespace) -> int:
    """ONNX pre-checks (seconds) first, then the TensorRT build (minutes to an hour)."""
    from moe2edge.export.check_trt import check_bundle_for_engine
    from moe2edge.runtime.tensorrt.build import build_engine

    for warning in check_bundle_for_engine(args.bundle):
        log.warning("%s", warning)
    engine_json = build_engine(
        args.bundle,
        args.out,
        max_batch=args.max_batch,
        max_seq_len=args.max_seq_len,
        max_prefill=args.max_prefill,
        workspace_bytes=int(args.workspace_gb * (1 << 30)),
        timing_cache=args.timing_cache,
        optimization_level=args.optimization_level,
        verbose=bool(getattr(args, "verbose", False)),
    )
    print(f"wrote {engine_json}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from moe2edge.export.verify import lineage_warning, verify_io_contract

    manifest = verify_bundle(args.bundle)
    verify_io_contract(args.bundle, manifest)
    print(f"{args.bundle}: {len(manifest['files'])} files verified, io contract ok")
    warning = lineage_warning(args.bundle, manifest)
    if warning:
        print(f"warning: {warning}")
    return 0


def run_gguf(args: argparse.Namespace) -> int:
    from moe2edge.export.gguf import export_gguf

    summary = export_gguf(args.student, args.out, args.type, overwrite=args.overwrite)
    kept = summary["kept_f16"]
    kept = f"; kept F16 (rows not whole blocks): {', '.join(kept)}" if kept else ""
    print(f"wrote {summary['path']}: {args.type}, {summary['bytes']} bytes{kept}")
    return 0
