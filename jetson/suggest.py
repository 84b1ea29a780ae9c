"""``moe2edge profile BUNDLE --suggest``: ranked changes, each with its expected gain.

Every suggestion is computed from the profile's measured numbers (``jetson.profile``:
the operator shares of a decode step, and unprofiled step times measured side by side in
one run) and the planner's models (``jetson.planner``: bits per weight; ``jetson.throughput``:
the batched step and speculative decoding):

* **precision**: the weight-reading operators' share ``s`` of a decode step, times the
  planner's bytes-per-weight ratio ``r`` of INT4 (at the block size) to the bundle's
  precision: expected step = (1 - s) + s x r (decode is bandwidth-bound, so weight bytes
  set the matmul time). An INT4 sibling given with ``--compare`` is measured too.
* **block_size** (INT4 bundles): the same with the block size's scale overhead.
* **threads**: decode step time measured at each thread count.
* **batching**: decode step time measured at batch 1 and batch B; aggregate tokens/s
  gain = B x t1 / tB, plus the planner's batch curve for this model on the Jetson.
* **speculation**: ``throughput.expected_tokens(alpha, gamma)`` per verify step over the
  verify step's measured cost (linear in positions from the measured 1- and k-position
  steps), best gamma; alpha from ``--acceptance``, else the demo domain's measured
  prompt-lookup acceptance (docs/runtime.md).
* **prefix_reuse**: prefill of the whole prompt vs of its tail after a cached prefix.

Each is ``{name, change, metric, expected_gain, measured_gain?, basis}``; gains are ratios
(> 1 is better), ranked by the measured gain where there is one, else the expected gain.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from moe2edge.jetson.planner import (
    ModelShape,
    bits_per_weight,
    load_model,
    make_inputs,
    plan,
)
from moe2edge.jetson.throughput import batch_curve, expected_tokens

log = logging.getLogger(__name__)

# operators that read the weights of a Linear (their share of decode is what precision buys)
WEIGHT_OPS = {
    "MatMul", "MatMulNBits", "Gemm", "FusedMatMul", "MatMulInteger", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "QGemm", "QLinearMatMul", "QAttention", "Attention",
}  # fmt: skip
BITS = {"fp32": 32.0, "float32": 32.0}
# prompt-lookup acceptance measured on the demo-domain student (bench/runtime.py's
# speculative section, docs/runtime.md); --acceptance replaces it
DEMO_NGRAM_ACCEPTANCE = 0.134
MAX_GAMMA = 8


def weight_bits(precision: str, block_size: int | None) -> float:
    if precision in BITS:
        return BITS[precision]
    return bits_per_weight(precision, block_size or 128)


def op_share(phase: dict[str, Any], ops: set[str]) -> float:
    """Share (0..1) of a phase's session-run time spent in ``ops``."""
    return sum(r["share_pct"] for r in phase["by_op"] if r["op"] in ops) / 100


def amdahl(share: float, ratio: float) -> float:
    """Speedup when a part of ``share`` of the time scales by ``ratio``."""
    return 1 / ((1 - share) + share * ratio)


def export_command(result: dict[str, Any], block: int) -> str:
    bundle = Path(result["bundle"])
    out = bundle.parent / f"{bundle.name}-int4-b{block}"
    if result.get("graph") == "onnxruntime-genai":
        return f"moe2edge export fast STUDENT {out} --precision int4 --block-size {block}"
    return f"moe2edge export quantize {bundle} {out} --precision int4 --block-size {block}"


def precision(result: dict[str, Any], block: int = 32) -> dict[str, Any] | None:
    prec = result["precision"]
    current = str(prec.get("weights", "fp32"))
    if current == "int4":
        return None
    share = op_share(result["phases"]["decode"], WEIGHT_OPS)
    b_now, b_int4 = weight_bits(current, prec.get("block_size")), bits_per_weight("int4", block)
    out: dict[str, Any] = {
        "name": "precision",
        "change": export_command(result, block),
        "metric": "decode step time (tokens/s at batch 1)",
        "expected_gain": round(amdahl(share, b_int4 / b_now), 3),
        "basis": {
            "decode_weight_op_share": round(share, 4),
            "bits_per_weight_now": b_now,
            "bits_per_weight_int4": b_int4,
            "planner": "bits_per_weight (jetson/planner.py): int4 + an fp16 scale per block",
            "decode_ms": round(result["measured"]["unprofiled"]["decode_ms"], 3),
        },
    }
    int4 = [
        c for c in result["measured"].get("compare", []) if c["precision"].get("weights") == "int4"
    ]
    if int4:
        c = int4[0]
        out["measured_gain"] = round(
            result["measured"]["unprofiled"]["decode_ms"] / c["decode_ms"], 3
        )
        out["basis"].update(
            measured_bundle=c["bundle"], measured_int4_decode_ms=round(c["decode_ms"], 3)
        )
    return out


def block_size(result: dict[str, Any], to: int = 128) -> dict[str, Any] | None:
    prec = result["precision"]
    if prec.get("weights") != "int4" or (prec.get("block_size") or 128) >= to:
        return None
    share = op_share(result["phases"]["decode"], WEIGHT_OPS)
    now, new = bits_per_weight("int4", prec["block_size"]), bits_per_weight("int4", to)
    return {
        "name": "block_size",
        "change": export_command(result, to) + "  (check accuracy: moe2edge export report)",
        "metric": "decode step time",
        "expected_gain": round(amdahl(share, new / now), 3),
        "basis": {"decode_weight_op_share": round(share, 4), "bits_now": now, "bits_new": new},
    }


def threads(result: dict[str, Any]) -> dict[str, Any] | None:
    by = {int(k): v for k, v in result["measured"].get("decode_ms_by_threads", {}).items()}
    if len(by) < 2:
        return None
    best = min(by, key=by.get)
    service_default = 1  # runtime/server/config.py ServerConfig.threads
    base = by.get(service_default, by[min(by)])
    return {
        "name": "threads",
        "change": f"moe2edge serve {result['bundle']} --threads {best}",
        "metric": "decode step time vs the service's default of 1 thread",
        "expected_gain": round(base / by[best], 3),
        "measured_gain": round(base / by[best], 3),
        "basis": {"decode_ms_by_threads": {str(k): round(v, 3) for k, v in sorted(by.items())}},
    }


def model_shape(result: dict[str, Any]) -> ModelShape:
    config = Path(result["bundle"]) / "config.json"
    if config.is_file():
        return load_model(str(config))
    m = result["model"]
    return ModelShape(
        "bundle", m["hidden_size"], m["num_layers"], m["num_attention_heads"],
        m["num_kv_heads"], m["intermediate_size"], m["vocab_size"], m.get("head_dim") or 0,
    )  # fmt: skip


def planner_batch_gain(result: dict[str, Any], rows: int) -> dict[str, Any]:
    """The planner's aggregate gain at ``rows`` streams for this model on an AGX Orin 30 W."""
    weights = result["precision"].get("weights", "fp32")
    inputs = make_inputs("dense-13b", "agx-orin-64gb", "30W", precision="int4")
    inputs.model = model_shape(result)
    inputs.precision = weights if weights in ("int4", "int8") else "fp16"
    inputs.context = min(inputs.model.max_context, 4096)
    curve = batch_curve(plan(inputs), (1, rows))
    return {
        "module": "agx-orin-64gb 30W",
        "precision": inputs.precision,
        "aggregate_gain": round(curve[1]["aggregate_tok_s"] / curve[0]["aggregate_tok_s"], 3),
    }


def batching(result: dict[str, Any]) -> dict[str, Any] | None:
    m = result["measured"]
    t1, tb, rows = (
        m["unprofiled"]["decode_ms"],
        m["unprofiled"].get("batch_decode_ms"),
        m["batch_rows"],
    )
    if not rows or tb is None:  # this graph runs one forward per row (runtime/batch.py)
        planned = planner_batch_gain(result, 4)
        return {
            "name": "batching",
            "change": "moe2edge export fast STUDENT OUT (GroupQueryAttention graph: rows share "
            "one decode step), then moe2edge serve OUT --slots 4",
            "metric": "aggregate decode tokens/s at 4 streams vs 1",
            "expected_gain": planned["aggregate_gain"],
            "basis": {
                "this_graph": f"{result.get('graph')}: one forward per row, no gain from slots",
                "decode_ms_batch1": round(t1, 3),
                "planner_on_jetson": planned,
            },
        }
    per_row = max((tb - t1) / (rows - 1), 0.0)  # the throughput model: step = t1 + (B-1) x per_row
    curve = {str(b): round(b * t1 / (t1 + (b - 1) * per_row), 3) for b in (1, 2, 4, 8)}
    return {
        "name": "batching",
        "change": f"moe2edge serve {result['bundle']} --slots {rows}",
        "metric": f"aggregate decode tokens/s at {rows} streams vs 1",
        "expected_gain": round(rows * t1 / tb, 3),
        "measured_gain": round(rows * t1 / tb, 3),
        "basis": {
            "decode_ms_batch1": round(t1, 3),
            f"decode_ms_batch{rows}": round(tb, 3),
            "per_stream_slowdown": round(tb / t1, 3),
            "fitted_aggregate_gain_by_streams": curve,
            "planner_on_jetson": planner_batch_gain(result, rows),
        },
    }


def speculation(result: dict[str, Any], acceptance: float | None = None) -> dict[str, Any] | None:
    m = result["measured"]
    t1, tv = m["unprofiled"]["decode_ms"], m["unprofiled"].get("verify_ms")
    k = int(result["config"]["verify_tokens"])
    if tv is None:
        return None
    alpha = acceptance if acceptance is not None else result["config"].get("acceptance")
    source = "given" if alpha is not None else "demo domain prompt lookup (docs/runtime.md)"
    alpha = DEMO_NGRAM_ACCEPTANCE if alpha is None else alpha
    per_pos = max((tv - t1) / (k - 1), 0.0)
    best = max(
        range(1, MAX_GAMMA + 1),
        key=lambda g: expected_tokens(alpha, g) / (t1 + g * per_pos),
    )
    gain = expected_tokens(alpha, best) * t1 / (t1 + best * per_pos)
    return {
        "name": "speculation",
        "change": f"moe2edge serve {result['bundle']} --speculate ngram"
        + ("" if gain > 1 else "  (does not pay here: keep off)"),
        "metric": "decode tokens/s per stream",
        "expected_gain": round(gain, 3),
        "basis": {
            "acceptance": alpha,
            "acceptance_source": source,
            "best_draft_tokens": best,
            "expected_tokens_per_step": round(expected_tokens(alpha, best), 3),
            "decode_ms": round(t1, 3),
            f"verify_ms_{k}_positions": round(tv, 3),
            "model": "throughput.expected_tokens (Leviathan et al.); proposal cost ~0 (prompt lookup)",
        },
    }


def prefix_reuse(result: dict[str, Any]) -> dict[str, Any] | None:
    m = result["measured"]
    full, tail = m["unprofiled"].get("prefill_ms"), m["unprofiled"].get("reuse_tail_ms")
    if full is None or tail is None:
        return None
    return {
        "name": "prefix_reuse",
        "change": f"moe2edge serve {result['bundle']} prefix_cache_mb=128  (the default; 0 turns it off)",
        "metric": "time to first token when the prompt's start is cached",
        "expected_gain": round(full / tail, 3),
        "measured_gain": round(full / tail, 3),
        "basis": {
            "prefill_ms": round(full, 3),
            "prompt_tokens": m["prompt_tokens"],
            "tail_prefill_ms": round(tail, 3),
            "tail_tokens": m["reuse_tail_tokens"],
        },
    }


def suggest(result: dict[str, Any], acceptance: float | None = None) -> list[dict[str, Any]]:
    """The ranked suggestions for a ``profile_bundle`` result (best first)."""
    made = [
        precision(result),
        block_size(result),
        threads(result),
        batching(result),
        speculation(result, acceptance),
        prefix_reuse(result),
    ]
    out = [s for s in made if s is not None]
    out.sort(key=lambda s: -s.get("measured_gain", s["expected_gain"]))
    for rank, s in enumerate(out, 1):
        s["rank"] = rank
    return out


def format_suggestions(suggestions: list[dict[str, Any]]) -> str:
    lines = []
    for s in suggestions:
        measured = f", measured {s['measured_gain']:.2f}x" if "measured_gain" in s else ""
        lines.append(
            f"{s['rank']}. {s['name']}: expected {s['expected_gain']:.2f}x{measured} on "
            f"{s['metric']}\n   {s['change']}"
        )
    return "\n".join(lines)
