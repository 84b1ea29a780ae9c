"""Batches, speculative decoding and MoE teachers on a module, from a ``planner.plan``.

* **Batching.** Decode is bandwidth-bound: one step reads the weights once for all rows
  and each row's own KV. Step time at batch B = overhead + (weights + B x KV per row) /
  (bandwidth x share), and never below the compute of B tokens (the tensor cores fill up
  to 8 rows of an m16n8k16 tile at no extra time, then scale). Aggregate tok/s = B / step.
* **Speculative decoding** (Leviathan et al., 2023, "Fast Inference from Transformers via
  Speculative Decoding"): a draft proposes ``gamma`` tokens, the target checks them in one
  step of gamma + 1 positions. With acceptance rate ``alpha`` per token the expected
  tokens per target step are (1 - alpha^(gamma+1)) / (1 - alpha); a cycle costs gamma
  draft steps plus one target step over gamma + 1 positions (the same bytes as one
  decode step, more compute).
* **A MoE teacher on the module**: memory first (every expert must be resident), then the
  bandwidth per token from the active parameters only.
"""

from __future__ import annotations

from typing import Any

from moe2edge.jetson.planner import RUNTIMES, make_inputs, plan

MMA_ROWS = 8  # tokens an m16n8k16 tile takes at the cost of one


def step_seconds(p: dict[str, Any], rows: int, positions: int = 1) -> float:
    """One decode step of ``rows`` sequences with ``positions`` new tokens each."""
    s, eff = p["step"], RUNTIMES[p["runtime"]]
    memory = (s["weight_bytes"] + rows * s["kv_bytes_per_row"]) / s["bandwidth"]
    tokens = rows * positions
    compute = s["flops_per_token"] * max(tokens, MMA_ROWS) / s["peak_flops"]
    return max(
        eff["step_overhead_ms"] / 1e3 + memory / eff["decode_bw_eff"],
        compute / eff["prefill_compute_eff"],
    )


def batch_curve(p: dict[str, Any], batches: tuple[int, ...] = (1, 2, 4, 8)) -> list[dict[str, Any]]:
    """Aggregate and per-stream decode speed at each batch size, and whether its KV fits."""
    s, out = p["step"], []
    for rows in batches:
        t = step_seconds(p, rows)
        out.append(
            {
                "streams": rows,
                "aggregate_tok_s": rows / t,
                "per_stream_tok_s": 1 / t,
                "step_ms": t * 1e3,
                "kv_fits": rows * s["kv_cache_bytes_per_row"] <= s["free_bytes"],
            }
        )
    return out


def expected_tokens(alpha: float, gamma: int) -> float:
    """Tokens a target step yields with ``gamma`` drafted at acceptance ``alpha``."""
    if not 0 <= alpha <= 1 or gamma < 0:
        raise ValueError(f"need 0 <= alpha <= 1 and gamma >= 0 (got {alpha}, {gamma})")
    if alpha == 1:
        return gamma + 1.0
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def speculative(
    target: dict[str, Any],
    draft: dict[str, Any],
    alpha: float,
    rows: int = 1,
    max_gamma: int = 8,
) -> dict[str, Any]:
    """The best draft length (0: do not speculate) and the decode speed it gives, per
    stream and in aggregate."""
    plain = step_seconds(target, rows)
    best = None
    for gamma in range(0, max_gamma + 1):  # 0: plain decoding, when drafting does not pay
        cycle = gamma * step_seconds(draft, rows) + step_seconds(target, rows, gamma + 1)
        tok_s = expected_tokens(alpha, gamma) / cycle
        if best is None or tok_s > best["per_stream_tok_s"]:
            best = {"gamma": gamma, "per_stream_tok_s": tok_s, "cycle_ms": cycle * 1e3}
    best.update(
        alpha=alpha,
        streams=rows,
        expected_tokens_per_step=expected_tokens(alpha, best["gamma"]),
        aggregate_tok_s=best["per_stream_tok_s"] * rows,
        plain_per_stream_tok_s=1 / plain,
        speedup=best["per_stream_tok_s"] * plain,
        draft=draft["model"],
    )
    return best


def teacher_on_module(
    model: str, module: str = "agx-orin-64gb", mode: str = "30W", context: int = 4096
) -> list[dict[str, Any]]:
    """Would the (MoE) teacher itself run here? Per precision: memory fit, then speed."""
    rows = []
    for precision in ("fp16", "int8", "int4"):
        p = plan(make_inputs(model, module, mode, precision=precision, context=context))
        rows.append(
            {
                "model": p["model"],
                "precision": precision,
                "params_b": p["params_b"],
                "active_params_b": p["params_read_per_token_b"],
                "weights_gb": p["weights_gb"],
                "usable_gb": p["usable_gb"],
                "fits": p["fits"],
                "decode_tok_s_if_it_fit": p["decode_tok_s"],
                "bytes_per_token_gb": p["bytes_per_token_gb"],
            }
        )
    return rows


def serving_plan(
    target: dict[str, Any],
    draft_model: str | None = None,
    acceptance: float | None = None,
    teacher: str | None = None,
    streams: tuple[int, ...] = (1, 2, 4, 8),
) -> dict[str, Any]:
    """Batching, speculation (with a draft and an acceptance rate) and the teacher, for a
    planned target; the draft and teacher are planned on the same module and mode."""
    out: dict[str, Any] = {"batching": batch_curve(target, streams)}
    if draft_model and acceptance is not None:
        draft = plan(
            make_inputs(draft_model, target["module"], target["mode"], runtime=target["runtime"])
        )
        out["speculative"] = [speculative(target, draft, acceptance, rows) for rows in streams]
    if teacher:
        out["teacher"] = teacher_on_module(teacher, target["module"], target["mode"])
    return out


def format_serving(s: dict[str, Any]) -> str:
    lines = ["  batching (decode is bandwidth-bound: weights read once per step for all rows):"]
    for r in s["batching"]:
        lines.append(
            f"    {r['streams']} streams: {r['aggregate_tok_s']:.0f} tok/s in all, "
            f"{r['per_stream_tok_s']:.1f} per stream{'' if r['kv_fits'] else ' (KV does NOT fit)'}"
        )
    for r in s.get("speculative", []):
        lines.append(
            f"    speculative, {r['streams']} streams, draft {r['draft']} at acceptance "
            f"{r['alpha']:.2f}: gamma {r['gamma']}, {r['expected_tokens_per_step']:.2f} tokens "
            f"per target step, {r['per_stream_tok_s']:.1f} tok/s per stream "
            f"({r['speedup']:.2f}x), {r['aggregate_tok_s']:.0f} in all"
        )
    for r in s.get("teacher", []):
        verdict = (
            f"fits, ~{r['decode_tok_s_if_it_fit']:.1f} tok/s"
            if r["fits"]
            else f"does NOT fit (would be ~{r['decode_tok_s_if_it_fit']:.1f} tok/s)"
        )
        lines.append(
            f"    teacher {r['model']} ({r['params_b']:.0f}B, {r['active_params_b']:.1f}B active) "
            f"at {r['precision'].upper()}: {r['weights_gb']:.0f} GB of {r['usable_gb']:.1f} GB "
            f"usable -> {verdict}, {r['bytes_per_token_gb']:.1f} GB read per token"
        )
    return "\n".join(lines)
