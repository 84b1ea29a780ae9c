"""The 13B path at a scale this machine holds: a >= 600M student through training and every export.

One run, on the CPU:

1. a Llama-3-template tokenizer (distill/templates.py) and the demo domain as chat rows;
2. 2-rank FSDP2 training on gloo (real `torchrun`) from a meta-device init, a few
   steps against a small random DeepSeek-V3 teacher, with sharded (DCP) checkpoints;
   per-rank peak RSS from metrics.jsonl;
3. the same run killed with SIGKILL after its first checkpoint and resumed: the final weights
   must be bitwise equal to the uninterrupted run's;
4. export to FP32 (ONNX with external data: > 2 GB), FP16, INT8, INT4 RTN, INT4 GPTQ,
   TensorRT FP16 and TensorRT INT4, each in a fresh process whose peak RSS is measured
   (moe2edge.export.peak_rss); ``peak_rss_ratio`` = peak RSS / FP32 model bytes;
5. each variant verified (sha256 and io contract), loaded by the runtime, and greedy-compared
   with FP32 on 20 prompts: the share of FP32's greedy tokens that the variant also picks
   when fed FP32's path (teacher-forced top-1 agreement, as `moe2edge export report`).

    python bench/scale.py [--out-dir runs/scale] [--steps 4]

Prints JSON and writes bench/results/scale.json. Needs ~40 GB of disk and ~16 GB of RAM.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from machine import cpu_name  # noqa: E402  (bench/machine.py)

from moe2edge.distill.checkpoint import complete_checkpoints  # noqa: E402
from moe2edge.distill.demo_data import generate_dataset, write_jsonl  # noqa: E402
from moe2edge.distill.templates import build_family_tokenizer  # noqa: E402
from moe2edge.export.peak_rss import measure, model_bytes  # noqa: E402
from moe2edge.export.verify import verify_io_contract  # noqa: E402
from moe2edge.fileio import atomic_write_json  # noqa: E402
from moe2edge.runtime import Generator  # noqa: E402
from moe2edge.runtime.manifest import read_manifest, verify_bundle  # noqa: E402
from moe2edge.runtime.session import render_chat  # noqa: E402

log = logging.getLogger("bench.scale")

# ~605M parameters with the stand-in Llama-3 vocabulary (24 layers at d=1536, GQA 12/4 heads, SwiGLU 4096): 2.4 GB in fp32.
STUDENT = dict(
    hidden_size=1536,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=12,
    num_key_value_heads=4,
    max_position_embeddings=512,
)
VARIANTS = (  # name, target function, kwargs
    ("fp16", "moe2edge.export.quantize:quantize_bundle", dict(precision="fp16")),
    ("int8", "moe2edge.export.quantize:quantize_bundle", dict(precision="int8")),
    ("int4-rtn", "moe2edge.export.quantize:quantize_bundle", dict(precision="int4", method="rtn")),
    (
        "int4-gptq",
        "moe2edge.export.quantize:quantize_bundle",
        dict(precision="int4", method="gptq", calibration_limit=16),
    ),
    ("trt-fp16", "moe2edge.export.tensorrt_flavor:tensorrt_bundle", dict(precision="fp16")),
    ("trt-int4", "moe2edge.export.tensorrt_flavor:tensorrt_bundle", dict(precision="int4")),
)
MIB = 1 << 20


def student_params(vocab_size: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **STUDENT))
    return sum(p.numel() for p in model.parameters())


def prepare_data(root: Path) -> tuple[Path, Path, Path]:
    """Chat rows of the demo domain and the Llama-3-template tokenizer."""
    train, evaluation = generate_dataset(seed=0, train_size=512, eval_size=40)

    def chat(row: dict) -> dict:
        return {
            "messages": [
                {"role": "user", "content": row["utterance"]},
                {"role": "assistant", "content": row["reply"]},
            ]
        }

    write_jsonl([chat(r) for r in train], root / "train.jsonl")
    write_jsonl([chat(r) for r in evaluation], root / "eval.jsonl")
    tokenizer = build_family_tokenizer("llama-3", root / "tokenizer")
    return root / "train.jsonl", root / "eval.jsonl", tokenizer


def tiny_teacher(root: Path, tokenizer: Path) -> Path:
    """A small random DeepSeek-V3-architecture teacher on the same vocabulary: the run measures
    the student's scale, not what it learns (a real teacher is served, see docs/teacher-cache)."""
    from transformers import AutoTokenizer

    from moe2edge.distill.teacher import build_demo_teacher

    tok = AutoTokenizer.from_pretrained(tokenizer)
    teacher = build_demo_teacher(len(tok), seed=0)
    teacher.save_pretrained(root / "teacher", safe_serialization=True)
    tok.save_pretrained(root / "teacher")
    return root / "teacher"


def train_config(run_dir: Path, data: Path, tokenizer: Path, teacher: Path, steps: int) -> Path:
    cfg = dict(
        run_dir=str(run_dir),
        train_data=str(data),
        tokenizer=str(tokenizer),
        teacher=str(teacher),
        student_preset="100m",
        student_overrides=STUDENT,
        max_seq_len=64,
        batch_size=4,
        max_steps=steps,
        warmup_steps=1,
        lr=1e-3,
        checkpoint_every=max(1, steps // 2),
        keep_checkpoints=2,
        log_every=1,
        eval_data=None,
        plot=False,
        seed=0,
    )
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def torchrun(config: Path, log_path: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "moe2edge.distill.train",
        "--config",
        str(config),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def train_step(run_dir: Path, config: Path, model_adam_bytes: int) -> dict:
    started = time.perf_counter()
    proc = torchrun(config, run_dir.with_suffix(".log"))
    if proc.wait() != 0:
        raise SystemExit(f"training failed: see {run_dir.with_suffix('.log')}")
    seconds = time.perf_counter() - started
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    peaks = [
        max(r)
        for r in zip(*(rec["peak_rss_mb"] for rec in records if "peak_rss_mb" in rec), strict=True)
    ]
    return {
        "seconds": round(seconds, 1),
        "peak_rss_mb": max(peaks),
        "per_rank_peak_rss_mb": peaks,
        "unsharded_model_adam_mb": round(model_adam_bytes / MIB),
        "peak_rss_ratio": round(max(peaks) * MIB / model_adam_bytes, 3),
    }


def killed_and_resumed(run_dir: Path, config: Path) -> float:
    """Start the run, SIGKILL every process once its first checkpoint is complete, resume."""
    started = time.perf_counter()
    proc = torchrun(config, run_dir.with_suffix(".killed.log"))
    while not complete_checkpoints(run_dir):
        if proc.poll() is not None:
            raise SystemExit("the run to be killed ended before its first checkpoint")
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc = torchrun(config, run_dir.with_suffix(".resumed.log"))
    if proc.wait() != 0:
        raise SystemExit(f"the resumed run failed: see {run_dir.with_suffix('.resumed.log')}")
    return time.perf_counter() - started


def same_weights(a: Path, b: Path) -> bool:
    from safetensors.numpy import load_file

    def tensors(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    x, y = tensors(a), tensors(b)
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def greedy_agreement(gen: Generator, reference: list[tuple[list[int], list[int]]]) -> float:
    """Share of the reference's greedy tokens this bundle also picks on the reference path."""
    same = total = 0
    for prompt, path in reference:
        cache = gen.engine.new_cache()
        logits = gen.engine.forward(prompt, cache)
        for token in path:
            same += int(int(np.argmax(logits)) == token)
            total += 1
            logits = gen.engine.forward([token], cache)
    return same / max(total, 1)


def greedy_paths(gen: Generator, prompts: list[list[int]], new_tokens: int) -> list:
    out = []
    for prompt in prompts:
        cache = gen.engine.new_cache()
        logits, path = gen.engine.forward(prompt, cache), []
        for _ in range(new_tokens):
            path.append(int(np.argmax(logits)))
            logits = gen.engine.forward([path[-1]], cache)
        out.append((prompt, path))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="runs/scale")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--json", default=str(ROOT / "bench/results/scale.json"))
    parser.add_argument(
        "--layers",
        type=int,
        default=STUDENT["num_hidden_layers"],
        help="fewer for a quick trial of the script (the result needs 24)",
    )
    args = parser.parse_args()
    STUDENT["num_hidden_layers"] = args.layers
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    root = Path(args.out_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    bench_started = time.perf_counter()
    train_data, eval_data, tokenizer = prepare_data(root)
    from transformers import AutoTokenizer

    params = student_params(len(AutoTokenizer.from_pretrained(tokenizer)))
    teacher = tiny_teacher(root, tokenizer)
    model_adam_bytes = params * 4 * 3  # fp32 weights + Adam's two moments
    result: dict = {
        "student_params": params,
        "fp32_bytes": params * 4,
        "steps": {},
        "variants": {},
        "cpu": cpu_name(),
    }
    log.info("student: %.1fM parameters", params / 1e6)

    run_a = root / "train"
    result["steps"]["train_fsdp2"] = train_step(
        run_a, train_config(run_a, train_data, tokenizer, teacher, args.steps), model_adam_bytes
    )
    run_b = root / "train_killed"
    seconds = killed_and_resumed(
        run_b, train_config(run_b, train_data, tokenizer, teacher, args.steps)
    )
    result["steps"]["train_killed_resumed"] = {"seconds": round(seconds, 1)}
    result["resume_bitwise"] = same_weights(run_a / "student", run_b / "student")
    log.info("resume bitwise: %s", result["resume_bitwise"])
    atomic_write_json(args.json, {**result, "complete": False})  # partial results survive a kill

    bundles = root / "bundles"
    fp32 = bundles / "fp32"
    m = measure(
        "moe2edge.export.onnx_export:export_fp32",
        str(run_a / "student"),
        str(fp32),
        max_new_tokens=args.new_tokens,
        overwrite=True,
    )
    fp32_bytes = model_bytes(fp32)
    result["fp32_onnx_bytes"] = fp32_bytes
    result["steps"]["export_fp32"] = step_record(m, fp32_bytes)
    built = {"fp32": fp32}
    for name, target, kwargs in VARIANTS:
        out = bundles / name
        extra = {"calibration": str(eval_data)} if kwargs.get("method") == "gptq" else {}
        try:
            m = measure(target, str(fp32), str(out), overwrite=True, **kwargs, **extra)
        except Exception as exc:  # reported, and the other variants still run
            result["steps"][f"export_{name}"] = {"error": f"{type(exc).__name__}: {exc}"}
            log.error("export %s failed: %s", name, exc)
            continue
        result["steps"][f"export_{name}"] = step_record(m, fp32_bytes)
        built[name] = out
        atomic_write_json(args.json, {**result, "complete": False})

    fp32_gen = Generator.from_bundle(fp32)
    rows = [json.loads(line) for line in eval_data.open()][: args.prompts]
    # the server's rendering: the bundle's Llama-3 chat template, up to the assistant header
    prompts = [render_chat(fp32_gen, [("user", r["messages"][0]["content"])]) for r in rows]
    reference = greedy_paths(fp32_gen, prompts, args.new_tokens)
    del fp32_gen
    for name, bundle in built.items():
        record: dict = {"verified": False, "loaded": False, "greedy_agreement": None}
        try:
            verify_io_contract(bundle, verify_bundle(bundle))  # sha256s, then the io contract
            record["verified"] = True
            gen = Generator.from_bundle(bundle)
            record["loaded"] = True
            record["greedy_agreement"] = round(greedy_agreement(gen, reference), 4)
            record["precision"] = read_manifest(bundle).get("precision", {})
            del gen
        except Exception as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"
        result["variants"][name] = record
        log.info("%s: %s", name, record)
    result["total_seconds"] = round(time.perf_counter() - bench_started, 1)
    result["complete"] = True
    print(json.dumps(result, indent=2))
    atomic_write_json(args.json, result)
    return 0


def step_record(m, fp32_bytes: int) -> dict:
    return {
        "seconds": m.seconds,
        "peak_rss_mb": round(m.peak_rss_bytes / MIB),
        "peak_rss_ratio": m.ratio(fp32_bytes),
    }


if __name__ == "__main__":
    sys.exit(main())
