"""What a step with several rows costs at INT4, and whether its logits equal one-row steps'.

Two of issue 14's INT4 goals depend on MatMulNBits with more than one activation row: the
p95 inter-token latency of 8 streams (a batched step has 8 rows, one per stream) and greedy
speculative output equal to plain decoding (a verify runs k + 1 rows of one sequence). This
measures both directly on one bundle, per ``accuracy_level`` (the MatMulNBits attribute:
4 = int8 activations, 0 = the fp32 kernel), side by side in one process:

- ``step_ms``: median time of one batched decode step (``runtime.batch.KVBatch``) with
  1, 2, 4, 8 rows after a 64-token prompt, and ``step_ratio`` to the one-row step;
- ``verify_ms``: one sequence, ``--verify`` new tokens in one forward, and its ratio;
- ``max_logit_gap``: the largest |logit| difference between a ``--verify``-token forward
  and the same tokens one step at a time, over ``--contexts`` random contexts, and
  ``argmax_flips``: the share of those positions whose greedy token differs.

The accuracy-level variants are copies of the bundle with the attribute rewritten (the
weights are the same file). Needs ``bench/runtime.py``'s INT4 bundle (it builds it).

    python bench/int4_rows.py [--bundle runs/bench-runtime/bundle_int4] [--levels 4,0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from machine import cpu_name  # bench/machine.py (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from moe2edge.runtime.batch import KVBatch  # noqa: E402
from moe2edge.runtime.engine import OnnxEngine  # noqa: E402

PROMPT_TOKENS = 64


def with_accuracy_level(bundle: Path, level: int, work: Path) -> Path:
    """A copy of ``bundle`` whose MatMulNBits nodes have ``accuracy_level = level``."""
    out = work / f"level{level}"
    shutil.copytree(bundle, out)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    if not nodes:
        raise SystemExit(f"{bundle} has no MatMulNBits nodes: give an INT4 bundle")
    for node in nodes:
        kept = [a for a in node.attribute if a.name != "accuracy_level"]
        del node.attribute[:]
        node.attribute.extend(kept + [onnx.helper.make_attribute("accuracy_level", level)])
    onnx.save(model, str(out / "model.onnx"))
    return out


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 3)


def step_times(engine: OnnxEngine, prompt: list[int], rows_list, verify: int, repeats: int):
    steps = {}
    for rows in rows_list:
        batch = KVBatch(engine, rows)
        caches = [batch.take() for _ in range(rows)]
        for cache in caches:
            engine.forward(prompt, cache)

        def step(batch=batch, caches=caches):
            batch.forward(caches, [5] * len(caches))
            for cache in caches:
                cache.truncate(PROMPT_TOKENS)

        steps[rows] = median_ms(step, repeats)
        for cache in caches:
            batch.free(cache)
    cache = engine.new_cache()
    engine.forward(prompt, cache)

    def verify_step():
        engine.forward(list(range(5, 5 + verify)), cache, all_logits=True)
        cache.truncate(PROMPT_TOKENS)

    return steps, median_ms(verify_step, repeats)


def logit_gaps(engine: OnnxEngine, verify: int, contexts: int, seed: int):
    rng, vocab = np.random.default_rng(seed), engine.vocab_size
    gap, flips, positions = 0.0, 0, 0
    for _ in range(contexts):
        prompt = rng.integers(0, vocab, PROMPT_TOKENS).tolist()
        tokens = rng.integers(0, vocab, verify).tolist()
        cache = engine.new_cache()
        engine.forward(prompt, cache)
        single = np.stack([engine.forward([t], cache) for t in tokens])
        cache.truncate(PROMPT_TOKENS)
        multi = engine.forward(tokens, cache, all_logits=True)
        gap = max(gap, float(np.abs(single - multi).max()))
        flips += int((single.argmax(-1) != multi.argmax(-1)).sum())
        positions += verify
    return round(gap, 5), round(flips / positions, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=str(ROOT / "runs" / "bench-runtime" / "bundle_int4"))
    parser.add_argument("--levels", default="4,0", help="accuracy levels, comma-separated")
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--verify", type=int, default=5, help="tokens in one verify forward")
    parser.add_argument("--contexts", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "int4_rows.json"))
    args = parser.parse_args()
    bundle = Path(args.bundle)
    if not (bundle / "manifest.json").is_file():
        raise SystemExit(f"no bundle at {bundle}: run bench/runtime.py first (it builds it)")
    levels = [int(x) for x in args.levels.split(",")]
    rows_list = [int(x) for x in args.rows.split(",")]
    if 1 not in rows_list:
        parser.error("--rows must include 1 (the ratios are to the one-row step)")
    started = time.time()
    result = {
        "bundle": str(bundle),
        "cpu": cpu_name(),
        "threads": args.threads,
        "prompt_tokens": PROMPT_TOKENS,
        "verify_tokens": args.verify,
        "levels": {},
    }
    with tempfile.TemporaryDirectory(prefix="int4-rows-") as tmp:
        for level in levels:
            engine = OnnxEngine(
                with_accuracy_level(bundle, level, Path(tmp)),
                verify=False,  # the copy's model.onnx differs from the manifest's sha256
                threads=args.threads,
                max_length=1024,
            )
            prompt = (
                np.random.default_rng(args.seed)
                .integers(0, engine.vocab_size, PROMPT_TOKENS)
                .tolist()
            )
            steps, verify_ms = step_times(engine, prompt, rows_list, args.verify, args.repeats)
            gap, flips = logit_gaps(engine, args.verify, args.contexts, args.seed)
            one = steps[1]
            result["levels"][str(level)] = {
                "step_ms": steps,
                "step_ratio": {r: round(ms / one, 3) for r, ms in steps.items()},
                "verify_ms": verify_ms,
                "verify_ratio": round(verify_ms / one, 3),
                "max_logit_gap": gap,
                "argmax_flips": flips,
            }
            print(f"level {level}: {result['levels'][str(level)]}", file=sys.stderr, flush=True)
            del engine
    result["seconds"] = round(time.time() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
