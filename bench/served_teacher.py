"""A real vLLM (CPU build, own venv) as the teacher of `distill cache`, against our local path.

For each teacher family (a random tiny Llama in fp32, a random tiny DeepSeek-V3 with MLA and
routed + shared experts in bf16, which vLLM's CPU MoE kernels require) it builds the same
top-k cache twice, from the checkpoint loaded in-process and from vLLM's
`prompt_logprobs`, and reports the tokens/s of each and how far the two caches agree.

    MOE2EDGE_VLLM_PYTHON=.vllm-venv/bin/python python bench/served_teacher.py [--rows 64]

(`make test-vllm` builds that venv and runs this.) Prints JSON, writes
bench/results/served_teacher.json. vLLM's start-up is reported apart from the scoring.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cpu_name  # noqa: E402  (bench/machine.py)

from moe2edge.distill.cache import TeacherCache, build_cache  # noqa: E402
from moe2edge.distill.demo_data import write_demo_data, write_jsonl  # noqa: E402
from moe2edge.distill.pipeline import make_tokenizer  # noqa: E402
from moe2edge.fileio import atomic_write_json  # noqa: E402
from moe2edge.rows import read_rows  # noqa: E402
from tests.vllm_helpers import (  # noqa: E402
    VLLM_PYTHON_ENV,
    build_tiny_teacher,
    served_dtype,
    vllm_python,
    vllm_server,
)


def compare(a: TeacherCache, b: TeacherCache) -> dict:
    same_top1 = total = same_set = 0
    worst = 0.0
    for i in range(len(a)):
        (ids_a, lps_a), (ids_b, lps_b) = a.topk(i)[:2], b.topk(i)[:2]
        ids_a, ids_b, lps_a, lps_b = ids_a[:-1], ids_b[:-1], lps_a[:-1], lps_b[:-1]
        same_top1 += int((ids_a[:, 0] == ids_b[:, 0]).sum())
        total += ids_a.shape[0]
        same_set += sum(
            len(set(x.tolist()) & set(y.tolist())) for x, y in zip(ids_a, ids_b, strict=True)
        )
        worst = max(worst, float((lps_a[:, 0].double() - lps_b[:, 0].double()).abs().max()))
    return {
        "top1_agreement": same_top1 / total,
        "topk_overlap": same_set / (total * a.k),
        "max_abs_top1_logprob_diff": worst,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "bench/results/served_teacher.json"))
    args = parser.parse_args()
    python = vllm_python()
    if python is None:
        print(f"set {VLLM_PYTHON_ENV} to a vLLM venv's python (make vllm-venv)", file=sys.stderr)
        return 2
    results: dict = {
        "cpu": cpu_name(),
        "rows": args.rows,
        "note": "tokens/s measured with other jobs on the same 2 cores; compare within a run",
        "k": args.k,
        "families": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_demo_data(tmp / "data", seed=0, train_size=max(args.rows, 200), eval_size=8)
        tokenizer = make_tokenizer(paths["train"], tmp / "tok", vocab_size=384)
        data = tmp / "rows.jsonl"
        write_jsonl(read_rows(paths["train"])[: args.rows], data)
        common = dict(data=data, tokenizer=tokenizer, k=args.k, max_seq_len=64, shard_examples=32)
        for family in ("llama", "deepseek_v3"):
            teacher = build_tiny_teacher(tmp / family, tokenizer, family)
            t0 = time.perf_counter()
            build_cache(out=tmp / f"{family}-local", teacher=teacher, batch_size=8, **common)
            local_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            with vllm_server(
                teacher, python, served_dtype(family), log_path=tmp / f"{family}-vllm.log"
            ) as url:
                startup_s = time.perf_counter() - t0
                t1 = time.perf_counter()
                served = build_cache(
                    out=tmp / f"{family}-vllm", server=url, api="vllm", concurrency=8, **common
                )
                served_s = time.perf_counter() - t1
            tokens = served["tokens"]
            results["families"][family] = {
                "vllm_dtype": served_dtype(family),
                "tokens": tokens,
                "local_tok_s": tokens / local_s,
                "vllm_tok_s": tokens / served_s,
                "vllm_startup_s": startup_s,
                **compare(
                    TeacherCache(tmp / f"{family}-local", tokenizer_dir=tokenizer),
                    TeacherCache(tmp / f"{family}-vllm", tokenizer_dir=tokenizer),
                ),
            }
    print(json.dumps(results, indent=2))
    atomic_write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
