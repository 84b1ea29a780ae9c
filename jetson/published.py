"""Published AGX Orin decode speeds against the planner's estimates.

The planner's step overhead and bandwidth shares are fitted on these cases
(``fit_decode``), so the plain error is in sample; the out-of-sample column refits them
without the case it predicts (leave one out), so each case is judged by a fit that never
saw it. Sources: NVIDIA's TensorRT Edge-LLM and TensorRT-LLM Jetson figures, MLC-LLM's as
published by jetson-containers (``packages/llm/mlc/docs.md`` of
https://github.com/dusty-nv/jetson-containers: Llama-2-7B q4f16_ft, 46.9 tok/s on AGX
Orin), and llama.cpp's, as recorded in the field notes (``source`` of each case).
No published AGX Orin figure below 4B parameters was found in the stored pages (the
TensorRT Edge-LLM tables for Qwen3-0.6B/1.7B are for Jetson AGX Thor, another module).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moe2edge.jetson.planner import make_inputs, plan


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


def _case_plan(case: PublishedCase) -> dict[str, Any]:
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
    return plan(inp)


def _group(case: PublishedCase) -> str:
    return "llama.cpp" if case.runtime == "llama.cpp" else "gpu"


def fit_decode(cases: list[PublishedCase], memory_ms: dict[str, float]) -> dict[str, float]:
    """Step time = overhead + memory time / bandwidth share, fitted to ``cases``.

    One overhead for all runtimes and one bandwidth share per group (GPU runtimes,
    llama.cpp), by least squares on relative step-time errors (each case weighs alike,
    whatever its speed); a negative overhead is refitted as zero. ``memory_ms``: each
    case's bytes per step at the roofline bandwidth (``decode_memory_ms``).
    """
    groups = sorted({_group(c) for c in cases})
    rows, target = [], []
    for c in cases:
        t_pub = 1000 / c.published_tok_s
        rows.append([1.0] + [memory_ms[c.label] * (_group(c) == g) for g in groups])
        rows[-1] = [v / t_pub for v in rows[-1]]
        target.append(1.0)
    x, y = np.array(rows), np.array(target)
    coef = np.linalg.lstsq(x, y, rcond=None)[0]
    if coef[0] < 0:
        coef = np.concatenate([[0.0], np.linalg.lstsq(x[:, 1:], y, rcond=None)[0]])
    fit = {"step_overhead_ms": float(coef[0])}
    for g, slope in zip(groups, coef[1:], strict=True):
        fit[f"decode_bw_eff_{g}"] = float(1 / slope)
    return fit


def _predict(fit: dict[str, float], case: PublishedCase, memory_ms: float) -> float:
    eff = fit.get(f"decode_bw_eff_{_group(case)}")
    if eff is None:
        return float("nan")
    return 1000 / (fit["step_overhead_ms"] + memory_ms / eff)


def compare_published() -> list[dict[str, Any]]:
    """Planned vs published decode speed for every case: in sample (the planner's
    constants, fitted on all cases) and out of sample (refitted without the case)."""
    plans = {c.label: _case_plan(c) for c in PUBLISHED}
    memory_ms = {label: p["decode_memory_ms"] for label, p in plans.items()}
    rows = []
    for case in PUBLISHED:
        p = plans[case.label]
        held_out = fit_decode([c for c in PUBLISHED if c.label != case.label], memory_ms)
        oos = _predict(held_out, case, memory_ms[case.label])
        row = {
            "case": case.label,
            "params_b": p["params_b"],
            "source": case.source,
            "published_tok_s": case.published_tok_s,
            "roofline_tok_s": p["decode_tok_s_roofline"],
            "planned_tok_s": p["decode_tok_s"],
            "error_pct": 100 * (p["decode_tok_s"] / case.published_tok_s - 1),
            "out_of_sample_tok_s": oos,
            "out_of_sample_error_pct": 100 * (oos / case.published_tok_s - 1),
            "out_of_sample_fit": held_out,
            "achieved_share_of_roofline": case.published_tok_s / p["decode_tok_s_roofline"],
        }
        if case.prefill_2048_ms:
            row["published_prefill_2048_ms"] = case.prefill_2048_ms
            row["planned_prefill_2048_ms"] = p["ttft_ms"]
            row["prefill_error_pct"] = 100 * (p["ttft_ms"] / case.prefill_2048_ms - 1)
        rows.append(row)
    return rows


def format_comparison(rows: list[dict[str, Any]]) -> str:
    out = [
        "| case | params | published tok/s | roofline | planned (in sample) | error | "
        "out of sample | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['case']} | {r['params_b']:.1f}B | {r['published_tok_s']:.1f} | "
            f"{r['roofline_tok_s']:.1f} | {r['planned_tok_s']:.1f} | {r['error_pct']:+.0f}% | "
            f"{r['out_of_sample_tok_s']:.1f} | {r['out_of_sample_error_pct']:+.0f}% |"
        )
    return "\n".join(out)
