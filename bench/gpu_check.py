"""GPU check: the same greedy replies from the CPU, ONNX Runtime's CUDA and TensorRT
execution providers, and the native TensorRT runner, on one bundle.

On a machine with a CUDA GPU it builds a TensorRT engine from the bundle (``build_engine``,
batch up to ``--max-batch``), generates greedy replies to the same prompts on every backend
it can open, and compares each with the CPU's token for token (plus the largest logit
difference over one prompt, and a batched decode of all prompts at once on the native
runner against their single-row replies). It prints JSON and writes
``bench/results/gpu_check.json``.

Without a GPU it writes nothing and exits with status 2, saying what is missing: no result
of this script is ever filled in by hand. A backend whose software is missing on a GPU
machine (no ``tensorrt`` bindings, an onnxruntime without a provider) is reported as not
run with the reason, the others still run.

    python bench/gpu_check.py --bundle runs/demo/bundles/fp32     # the demo's FP32 bundle
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "gpu_check.json"
PROMPTS = [
    "turn on the kitchen lights",
    "what is the temperature in the office",
    "set the bedroom to 21 degrees",
    "is the garage door open",
]


def what_is_missing() -> dict[str, str]:
    """Everything the check needs that this machine lacks (empty: all there)."""
    import onnxruntime as ort

    from moe2edge.runtime.tensorrt.device import TensorRTUnavailable, cuda_device_info

    missing = {}
    try:
        cuda_device_info()
    except TensorRTUnavailable as exc:
        missing["gpu"] = str(exc)
    providers = ort.get_available_providers()
    for provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        if provider not in providers:
            missing[provider] = (
                f"onnxruntime {ort.__version__} has only {providers}: install onnxruntime-gpu"
            )
    if importlib.util.find_spec("tensorrt") is None:
        missing["tensorrt"] = (
            "the tensorrt Python bindings are not installed (pip install tensorrt)"
        )
    return missing


def greedy_replies(generator: Any, new_tokens: int) -> list[list[int]]:
    from moe2edge.runtime import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    return [generator.generate(p, params).token_ids for p in PROMPTS]


def logit_difference(reference: Any, engine: Any, ids: list[int]) -> float:
    a = reference.forward(ids, reference.new_cache(), all_logits=True)
    b = engine.forward(ids, engine.new_cache(), all_logits=True)
    return float(np.abs(a - b).max())


def batched_native(generator: Any, singles: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """Greedy decode of every prompt in one batch on the native runner vs one at a time."""
    engine = generator.engine
    rows = min(len(PROMPTS), engine.max_batch)
    caches = [engine.new_cache() for _ in range(rows)]
    last = [
        engine.forward(generator.encode_prompt(p), c)
        for p, c in zip(PROMPTS[:rows], caches, strict=True)
    ]
    out: list[list[int]] = [[] for _ in range(rows)]
    start = time.perf_counter()
    for _ in range(new_tokens):
        nxt = [int(np.argmax(logits)) for logits in last]
        for row, token in zip(out, nxt, strict=True):
            row.append(token)
        if len(out[0]) == new_tokens:
            break
        last = list(engine.forward_batch([[t] for t in nxt], caches))
    seconds = time.perf_counter() - start
    return {
        "rows": rows,
        "identical_to_single_rows": out == [s[:new_tokens] for s in singles[:rows]],
        "aggregate_tok_s": rows * (new_tokens - 1) / seconds if seconds > 0 else None,
    }


def run_backend(name: str, open_generator: Any, cpu: Any, cpu_replies, args) -> dict[str, Any]:
    try:
        start = time.perf_counter()
        generator = open_generator()
        opened_s = time.perf_counter() - start
        replies = greedy_replies(generator, args.new_tokens)
        ids = generator.encode_prompt(PROMPTS[0])
        row: dict[str, Any] = {
            "ran": True,
            "open_s": round(opened_s, 2),
            "identical_to_cpu": sum(a == b for a, b in zip(replies, cpu_replies, strict=True)),
            "prompts": len(PROMPTS),
            "max_abs_logit_difference": logit_difference(cpu.engine, generator.engine, ids),
        }
        if name == "tensorrt_native":
            row["batched"] = batched_native(generator, replies, args.new_tokens)
            row["engine"] = generator.engine.describe()
        return row
    except Exception as exc:  # a failed backend is a result: the others still run
        return {"ran": False, "error": f"{type(exc).__name__}: {exc}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default=str(ROOT / "runs" / "demo" / "bundles" / "fp32"))
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    missing = what_is_missing()
    if "gpu" in missing:
        print(json.dumps({"ran": False, "missing": missing}, indent=2))
        print(
            "gpu_check: not run, no CUDA GPU on this machine; nothing written. Run it where "
            "`nvidia-smi` works, with onnxruntime-gpu and the tensorrt bindings installed.",
            file=sys.stderr,
        )
        return 2
    bundle = Path(args.bundle)
    if not (bundle / "manifest.json").is_file():
        print(
            f"gpu_check: no bundle at {bundle}: run `moe2edge demo` or pass --bundle",
            file=sys.stderr,
        )
        return 2

    from moe2edge.runtime import Generator
    from moe2edge.runtime.tensorrt.build import build_engine
    from moe2edge.runtime.tensorrt.device import cuda_device_info

    cpu = Generator.from_bundle(bundle, device="cpu", threads=1)
    cpu_replies = greedy_replies(cpu, args.new_tokens)
    results: dict[str, Any] = {
        "machine": {"python": platform.python_version(), **cuda_device_info()},
        "bundle": str(bundle),
        "new_tokens": args.new_tokens,
        "missing": missing,
        "backends": {},
    }
    backends = results["backends"]
    for device, provider in (
        ("cuda", "CUDAExecutionProvider"),
        ("tensorrt", "TensorrtExecutionProvider"),
    ):
        if provider in missing:
            backends[f"ort_{device}"] = {"ran": False, "error": missing[provider]}
        else:
            backends[f"ort_{device}"] = run_backend(
                device,
                lambda d=device: Generator.from_bundle(bundle, device=d),
                cpu,
                cpu_replies,
                args,
            )
    if "tensorrt" in missing:
        backends["tensorrt_native"] = {"ran": False, "error": missing["tensorrt"]}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "bundle"
            shutil.copytree(bundle, copy)
            start = time.perf_counter()
            try:
                build_engine(copy, max_batch=args.max_batch, max_seq_len=args.max_seq_len)
                built = {"build_s": round(time.perf_counter() - start, 1)}
                backends["tensorrt_native"] = built | run_backend(
                    "tensorrt_native",
                    lambda: Generator.from_bundle(copy, device="tensorrt-native"),
                    cpu,
                    cpu_replies,
                    args,
                )
            except Exception as exc:
                backends["tensorrt_native"] = {"ran": False, "error": f"build: {exc}"}
    text = json.dumps(results, indent=2, default=str)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n", encoding="utf-8")
    ok = all(b.get("ran") and b["identical_to_cpu"] == b["prompts"] for b in backends.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
