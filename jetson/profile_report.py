"""ONNX Runtime profiler events -> per-layer / per-operator tables, trace, chart, Markdown.

``aggregate`` pairs each ``model_run`` event (one ``session.run``) with the step the
profiler run made (``jetson.profile.StepRecorder``: phase and Python wall time, in order)
and puts every ``Node`` event inside a run's span into that run. Coverage (docs/profiler.md):

    ops_covered_pct = sum of Node event durations / sum of model_run durations

over the runs of the measured phases (warm-ups and the cached-prefix prefill left out):
the share of ONNX Runtime's own session-run time that named operators account for. The
rest is the executor between operators (and the profiler's bookkeeping there).
``of_step_wall_pct`` divides by the Python wall time of the same steps instead (binding
inputs and outputs included).
"""

from __future__ import annotations

import bisect
import json
import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moe2edge.fileio import atomic_write
from moe2edge.jetson.errors import JetsonError

log = logging.getLogger(__name__)

LAYER = re.compile(r"layers?[._](\d+)")
NAMED = {
    "embed_tokens": "embed_tokens",
    "lm_head": "lm_head",
    "norm": "final_norm",
}
MARKER_TID = 0  # the trace's "moe2edge steps" track


def layer_of(node: str) -> str:
    """``/model/layers.3/attn/qkv_proj/MatMul`` -> ``layers.3``; embeddings, the final norm
    and the LM head by name; anything else by its first path component."""
    if "final_norm" in node:  # the model builder files it under /model/layers.{N}/
        return "final_norm"
    m = LAYER.search(node)
    if m:
        return f"layers.{int(m.group(1))}"
    parts = [p for p in node.strip("/").split("/") if p]
    if not parts:
        return "(unnamed)"
    if parts[0] == "model" and len(parts) > 1:
        parts = parts[1:]
    return NAMED.get(parts[0], parts[0] if len(parts) > 1 else "(graph)")


def block_of(node: str) -> str:
    """attn, mlp or norm inside a layer ("" outside layers)."""
    m = LAYER.search(node)
    if not m or "final_norm" in node:
        return ""
    rest = node[m.end() :].strip("/").split("/")[0].lower()
    if "attn" in rest or "attention" in rest:
        return "attn"
    if "mlp" in rest or "ffn" in rest or "feed_forward" in rest:
        return "mlp"
    if "norm" in rest:
        return "norm"
    return rest or "other"


def _layer_key(name: str) -> tuple[int, int, str]:
    if name == "embed_tokens":
        return (0, 0, name)
    m = LAYER.fullmatch(name)
    if m:
        return (1, int(m.group(1)), name)
    if name in ("final_norm", "lm_head"):
        return (2, 0 if name == "final_norm" else 1, name)
    return (3, 0, name)


def node_events(events: list[dict]) -> list[dict]:
    return [
        e
        for e in events
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")
    ]


def aggregate(
    events: list[dict], steps: Sequence[tuple[str, float]], measured: Sequence[str]
) -> dict[str, Any]:
    """Phases with their tables, and the coverage over the ``measured`` phases."""
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    if len(runs) != len(steps):
        raise JetsonError(
            f"the profile has {len(runs)} session runs but {len(steps)} steps were made; "
            "is another thread using this session?"
        )
    starts = [r["ts"] for r in runs]
    per_run: list[list[dict]] = [[] for _ in runs]
    for e in node_events(events):
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i >= 0 and e["ts"] + e.get("dur", 0) <= runs[i]["ts"] + runs[i]["dur"] + 1:
            per_run[i].append(e)
    phases: dict[str, dict[str, Any]] = {}
    for phase in dict.fromkeys(p for p, _ in steps):
        idx = [i for i, (p, _) in enumerate(steps) if p == phase]
        phases[phase] = phase_table(
            [runs[i] for i in idx], [per_run[i] for i in idx], [steps[i][1] for i in idx]
        )
    chosen = [i for i, (p, _) in enumerate(steps) if p in measured]
    run_us = sum(runs[i]["dur"] for i in chosen)
    node_us = sum(e["dur"] for i in chosen for e in per_run[i])
    wall_us = sum(steps[i][1] * 1e6 for i in chosen)
    off_us = sum(off_cpu_gaps(runs[i], per_run[i]) for i in chosen)
    coverage = {
        "ops_covered_pct": round(100 * node_us / run_us, 2) if run_us else 0.0,
        # gaps >= 1 ms between two operators: the thread was off the CPU (the scheduler's
        # 4 ms quanta show up there when other processes compete for the cores)
        "off_cpu_gap_ms": round(off_us / 1e3, 3),
        "ops_covered_excluding_off_cpu_pct": (
            round(100 * node_us / (run_us - off_us), 2) if run_us > off_us else 0.0
        ),
        "of_step_wall_pct": round(100 * node_us / wall_us, 2) if wall_us else 0.0,
        "node_ms": round(node_us / 1e3, 3),
        "session_run_ms": round(run_us / 1e3, 3),
        "step_wall_ms": round(wall_us / 1e3, 3),
        "runs": len(chosen),
        "node_events": sum(len(per_run[i]) for i in chosen),
        "phases": [p for p in measured if p in phases],
        "definition": "sum of ONNX Runtime Node event durations / sum of its model_run "
        "(session.run) durations, over the runs of the measured phases",
    }
    warnings = structure_warnings(phases.get("decode") or next(iter(phases.values())))
    for w in warnings:
        log.warning("%s", w)
    return {
        "phases": phases,
        "coverage": coverage,
        "steps": [p for p, _ in steps],
        "warnings": warnings,
    }


def structure_warnings(phase: dict[str, Any]) -> list[str]:
    """What the per-layer table says is odd about the graph: decoder layers that run fewer
    operators than the others (a layer's MLP cut off), no final norm before the LM head."""
    counts = {r["layer"]: r["nodes"] for r in phase["by_layer"] if LAYER.fullmatch(r["layer"])}
    out = []
    if counts:
        usual = max(set(counts.values()), key=list(counts.values()).count)
        for layer, n in counts.items():
            if n < usual:
                out.append(
                    f"{layer} runs {n} operators where the other layers run {usual}: part of "
                    "it is not on the path to the logits; check the export (the LM head input)"
                )
        if "final_norm" not in {r["layer"] for r in phase["by_layer"]}:
            out.append("no final norm runs before the LM head; check the export")
    return out


OFF_CPU_GAP_US = 1000  # the executor itself never takes this long between two operators


def run_gaps(run: dict, nodes: list[dict]) -> list[float]:
    """Microseconds between the run's start, its operators and its end."""
    edges = [run["ts"]]
    for e in sorted(nodes, key=lambda e: e["ts"]):
        edges += [e["ts"], e["ts"] + e["dur"]]
    edges.append(run["ts"] + run["dur"])
    return [max(edges[i + 1] - edges[i], 0) for i in range(0, len(edges) - 1, 2)]


def off_cpu_gaps(run: dict, nodes: list[dict]) -> float:
    """Microseconds of the run's gaps of at least ``OFF_CPU_GAP_US`` between operators."""
    return float(sum(g for g in run_gaps(run, nodes) if g >= OFF_CPU_GAP_US))


def phase_table(runs: list[dict], nodes: list[list[dict]], walls: list[float]) -> dict:
    """Per-step means of one phase: run and node time, by layer, by op, top nodes, memory."""
    n = len(runs)
    run_us = sum(r["dur"] for r in runs) / n
    flat = [e for run in nodes for e in run]
    node_us = sum(e["dur"] for e in flat) / n
    layers: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    ops: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    per_node: dict[str, dict[str, Any]] = {}
    for e in flat:
        name = e["name"].removesuffix("_kernel_time")
        args = e.get("args", {})
        op = str(args.get("op_name", "?"))
        out_b = float(args.get("output_size", 0) or 0)
        layer = layers[layer_of(name)]
        layer["us"] += e["dur"]
        layer["nodes"] += 1
        layer["output_bytes"] += out_b
        layer[f"{block_of(name) or 'all'}_us"] += e["dur"]
        o = ops[op]
        o["us"] += e["dur"]
        o["calls"] += 1
        o["output_bytes"] += out_b
        node = per_node.setdefault(name, {"op": op, "us": 0.0, "provider": args.get("provider")})
        node["us"] += e["dur"]

    def share(us: float) -> float:
        return round(100 * us / n / run_us, 2) if run_us else 0.0

    by_layer = []
    for name in sorted(layers, key=_layer_key):
        d = layers[name]
        row = {
            "layer": name,
            "ms": round(d["us"] / n / 1e3, 4),
            "share_pct": share(d["us"]),
            "nodes": int(d["nodes"] / n),
            "output_bytes": int(d["output_bytes"] / n),
        }
        for block in ("attn", "mlp", "norm"):
            if d.get(f"{block}_us"):
                row[f"{block}_ms"] = round(d[f"{block}_us"] / n / 1e3, 4)
        by_layer.append(row)
    by_op = [
        {
            "op": op,
            "ms": round(d["us"] / n / 1e3, 4),
            "share_pct": share(d["us"]),
            "calls": int(d["calls"] / n),
            "output_bytes": int(d["output_bytes"] / n),
        }
        for op, d in sorted(ops.items(), key=lambda kv: -kv[1]["us"])
    ]
    gaps = [g for run, ns in zip(runs, nodes, strict=True) for g in run_gaps(run, ns)]
    off_us = sum(g for g in gaps if g >= OFF_CPU_GAP_US) / n
    top = sorted(per_node.items(), key=lambda kv: -kv[1]["us"])[:10]
    arena = [
        float(e["args"][k]) for e in flat for k in ("mem_arena_held",) if k in e.get("args", {})
    ]
    return {
        "steps": n,
        "run_ms": round(run_us / 1e3, 4),
        "node_ms": round(node_us / 1e3, 4),
        "wall_ms": round(sum(walls) / n * 1e3, 4),
        "covered_pct": round(100 * node_us / run_us, 2) if run_us else 0.0,
        # the rest of run_ms: the executor between operators (with the profiler's own
        # bookkeeping, a few us per operator) and gaps >= 1 ms with the thread off the CPU
        "between_ops_ms": round((sum(gaps) / n - off_us) / 1e3, 4),
        "off_cpu_ms": round(off_us / 1e3, 4),
        "by_layer": by_layer,
        "by_op": by_op,
        "top_nodes": [
            {
                "node": name,
                "op": d["op"],
                "layer": layer_of(name),
                "ms": round(d["us"] / n / 1e3, 4),
                "share_pct": share(d["us"]),
            }
            for name, d in top
        ],
        "output_bytes_per_step": int(sum(o["output_bytes"] for o in ops.values()) / n),
        "arena_held_bytes": int(max(arena)) if arena else None,
    }


def trace_events(events: list[dict], steps: Sequence[str]) -> dict[str, Any]:
    """ORT's events plus one marker per step on a "moe2edge steps" track (Chrome trace)."""
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    pid = runs[0]["pid"] if runs else 0
    out = list(events)
    out.append(
        {"ph": "M", "name": "thread_name", "pid": pid, "tid": MARKER_TID,
         "args": {"name": "moe2edge steps"}}
    )  # fmt: skip
    counts: dict[str, int] = defaultdict(int)
    for run, phase in zip(runs, steps, strict=True):
        counts[phase] += 1
        out.append(
            {
                "name": f"{phase} {counts[phase]}",
                "cat": "moe2edge",
                "ph": "X",
                "ts": run["ts"],
                "dur": run["dur"],
                "pid": pid,
                "tid": MARKER_TID,
                "args": {"phase": phase},
            }
        )
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def blocks(row: dict[str, Any]) -> str:
    return " / ".join(str(row.get(f"{b}_ms", "-")) for b in ("attn", "mlp", "norm"))


def markdown(result: dict[str, Any]) -> str:
    """The tables of ``result`` as Markdown."""
    cov = result["coverage"]
    lines = [
        f"# Profile of {result['bundle']}",
        "",
        f"precision {result['precision'].get('weights', '?')}, graph {result['graph']}, "
        f"{result['measured']['threads']} threads, {result['measured']['prompt_tokens']} "
        "prompt tokens",
        "",
        f"Operators account for **{cov['ops_covered_pct']}%** of session-run time "
        f"({cov['node_ms']} of {cov['session_run_ms']} ms over {cov['runs']} runs; "
        f"{cov['of_step_wall_pct']}% of the steps' wall time {cov['step_wall_ms']} ms).",
    ]
    lines += [f"\n**warning**: {w}" for w in result.get("warnings", [])]
    for phase in ("prefill", "decode", "batch_decode", "verify", "reuse_tail"):
        p = result["phases"].get(phase)
        if not p:
            continue
        lines += [
            "",
            f"## {phase}: {p['run_ms']} ms per step (operators {p['node_ms']} ms, "
            f"{p['covered_pct']}%; between operators {p['between_ops_ms']} ms; off the CPU "
            f"{p['off_cpu_ms']} ms; wall {p['wall_ms']} ms; {p['steps']} steps)",
            "",
            "| layer | ms | share % | attn / mlp / norm ms | nodes | output bytes |",
            "|---|---:|---:|---|---:|---:|",
        ]
        lines += [
            f"| {r['layer']} | {r['ms']} | {r['share_pct']} | {blocks(r)} | {r['nodes']} | "
            f"{r['output_bytes']} |"
            for r in p["by_layer"]
        ]
        lines += [
            "",
            "| operator | ms | share % | calls | output bytes |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['op']} | {r['ms']} | {r['share_pct']} | {r['calls']} | {r['output_bytes']} |"
            for r in p["by_op"]
        ]
    mem = result.get("memory", {})
    if mem:
        lines += ["", f"process memory: {mem}"]
    return "\n".join(lines) + "\n"


def write_chart(result: dict[str, Any], path: Path) -> str | None:
    """A PNG of time per operator type and per layer (None when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no chart (pip install matplotlib)")
        return None
    phases = [p for p in ("prefill", "decode", "batch_decode") if p in result["phases"]]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    ops = [r["op"] for r in result["phases"]["decode"]["by_op"][:8]]
    width = 0.8 / len(phases)
    for k, phase in enumerate(phases):
        table = {r["op"]: r["share_pct"] for r in result["phases"][phase]["by_op"]}
        axes[0].barh(
            [i + k * width for i in range(len(ops))], [table.get(o, 0) for o in ops], width,
            label=f"{phase} ({result['phases'][phase]['run_ms']:.2f} ms)",
        )  # fmt: skip
    axes[0].set_yticks([i + width for i in range(len(ops))], ops)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("share of session-run time (%)")
    axes[0].set_title("per operator type")
    axes[0].legend()
    for phase in phases:
        rows = result["phases"][phase]["by_layer"]
        axes[1].plot([r["layer"] for r in rows], [r["ms"] for r in rows], "o-", label=phase)
    axes[1].set_ylabel("ms per step")
    axes[1].set_title("per layer")
    axes[1].tick_params(axis="x", rotation=60)
    axes[1].legend()
    fig.suptitle(
        f"{Path(result['bundle']).name}: operators {result['coverage']['ops_covered_pct']}%"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)


def write_outputs(
    result: dict[str, Any], events: list[dict], out_dir: Path, chart: bool = True
) -> dict[str, Any]:
    """trace.json (Chrome/Perfetto), profile.md, profile.png, then profile.json."""
    trace = out_dir / "trace.json"
    atomic_write(trace, json.dumps(trace_events(events, result["steps"])))
    result["trace_file"] = str(trace)
    result["chart_file"] = write_chart(result, out_dir / "profile.png") if chart else None
    md = out_dir / "profile.md"
    atomic_write(md, markdown(result))
    result["tables_file"] = str(md)
    atomic_write(out_dir / "profile.json", json.dumps(result, indent=2) + "\n")
    return result
