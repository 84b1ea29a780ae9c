"""Published AGX Orin decode speeds (field notes) against the planner's estimates.

The planner's decode efficiency is calibrated on these cases (geometric mean of
published / roofline per runtime group), so the plain error is in-sample; the
leave-one-out column refits the factor without the case it predicts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from moe2edge.jetson.planner import RUNTIMES, make_inputs, plan


@dataclass(frozen=True)
class PublishedCase:
    label: str
    model: str
    runtime: str
    published_tok_s: float
    group_size: int
    lm_head_precision: str
    source: str
    mode: str = "MAXN"
    prefill_2048_ms: float | None = None


PUBLISHED: tuple[PublishedCase, ...] = (
    PublishedCase(
        "Qwen3-8B INT4 AWQ, TensorRT Edge-LLM",
        "qwen3-8b",
        "tensorrt",
        30.6,
        128,
        "fp16",
        "TensorRT Edge-LLM v0.10 (mode not stated; MAXN assumed)",
        prefill_2048_ms=1384,
    ),
    PublishedCase(
        "Qwen3-4B INT4 AWQ, TensorRT Edge-LLM",
        "qwen3-4b",
        "tensorrt",
        50.7,
        128,
        "fp16",
        "TensorRT Edge-LLM v0.10 (mode not stated; MAXN assumed)",
        prefill_2048_ms=762,
    ),
    PublishedCase(
        "Llama-3-8B INT4, TensorRT-LLM",
        "llama-3-8b",
        "tensorrt",
        35.9,
        128,
        "fp16",
        "TensorRT-LLM 0.12-jetson, MAXN",
    ),
    PublishedCase(
        "Llama-2-7B q4f16_1, MLC-LLM", "llama-2-7b", "mlc", 47.0, 32, "int4", "MLC-LLM, MAXN"
    ),
    PublishedCase(
        "Llama-2-13B q4f16_1, MLC-LLM",
        "llama-2-13b",
        "mlc",
        20.6,
        32,
        "int4",
        "MLC-LLM, MAXN (user report)",
    ),
    PublishedCase(
        "Llama-2-7B Q4_0, llama.cpp", "llama-2-7b", "llama.cpp", 22.5, 32, "q6_k", "llama.cpp 4-bit"
    ),
    PublishedCase(
        "Llama-2-13B Q4_0, llama.cpp",
        "llama-2-13b",
        "llama.cpp",
        13.3,
        32,
        "q6_k",
        "llama.cpp 4-bit",
    ),
)


def _case_plan(
    case: PublishedCase, runtimes: dict[str, dict[str, float]] | None = None
) -> dict[str, Any]:
    inp = make_inputs(
        case.model,
        "agx-orin-64gb",
        case.mode,
        precision="int4",
        group_size=case.group_size,
        lm_head_precision=case.lm_head_precision,
        runtime=case.runtime,
        prompt_tokens=2048,
    )
    if runtimes is None:
        return plan(inp)
    saved = dict(RUNTIMES)
    try:
        RUNTIMES.update(runtimes)
        return plan(inp)
    finally:
        RUNTIMES.clear()
        RUNTIMES.update(saved)


def compare_published() -> list[dict[str, Any]]:
    """Planned vs published decode speed for every case, with leave-one-out errors.

    Leave-one-out: the case's runtime group (TensorRT+MLC, or llama.cpp) gets its decode
    efficiency refitted (geometric mean of published/roofline) without that case.
    """
    rows = []
    plans = [_case_plan(c) for c in PUBLISHED]
    group = {c.label: ("llama.cpp" if c.runtime == "llama.cpp" else "gpu") for c in PUBLISHED}
    ratios = {
        c.label: c.published_tok_s / p["decode_tok_s_roofline"]
        for c, p in zip(PUBLISHED, plans, strict=True)
    }
    for case, p in zip(PUBLISHED, plans, strict=True):
        others = [
            ratios[c.label]
            for c in PUBLISHED
            if c.label != case.label and group[c.label] == group[case.label]
        ]
        loo_eff = (
            math.exp(sum(math.log(r) for r in others) / len(others)) if others else float("nan")
        )
        loo = _case_plan(case, {case.runtime: {**RUNTIMES[case.runtime], "decode_bw_eff": loo_eff}})
        row = {
            "case": case.label,
            "source": case.source,
            "published_tok_s": case.published_tok_s,
            "roofline_tok_s": p["decode_tok_s_roofline"],
            "planned_tok_s": p["decode_tok_s"],
            "error_pct": 100 * (p["decode_tok_s"] / case.published_tok_s - 1),
            "loo_planned_tok_s": loo["decode_tok_s"],
            "loo_error_pct": 100 * (loo["decode_tok_s"] / case.published_tok_s - 1),
            "achieved_share_of_roofline": ratios[case.label],
        }
        if case.prefill_2048_ms:
            row["published_prefill_2048_ms"] = case.prefill_2048_ms
            row["planned_prefill_2048_ms"] = p["ttft_ms"]
            row["prefill_error_pct"] = 100 * (p["ttft_ms"] / case.prefill_2048_ms - 1)
        rows.append(row)
    return rows


def format_comparison(rows: list[dict[str, Any]]) -> str:
    out = [
        "| case | published tok/s | roofline | planned | error | leave-one-out | error (LOO) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['case']} | {r['published_tok_s']:.1f} | {r['roofline_tok_s']:.1f} | "
            f"{r['planned_tok_s']:.1f} | {r['error_pct']:+.0f}% | {r['loo_planned_tok_s']:.1f} | "
            f"{r['loo_error_pct']:+.0f}% |"
        )
    return "\n".join(out)
