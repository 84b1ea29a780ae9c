"""Every variant of an FP32 bundle, built and measured in one call (used by ``moe2edge demo``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moe2edge.export.quantize import quantize_bundle
from moe2edge.export.report import json_rows, markdown_table, report
from moe2edge.export.tensorrt_flavor import tensorrt_bundle
from moe2edge.fileio import atomic_write

log = logging.getLogger(__name__)

# (directory name, target, precision, method) -- INT4 at the block size given to the call
ORT_VARIANTS = (
    ("fp16", "onnxruntime", "fp16", "none"),
    ("int8-dynamic", "onnxruntime", "int8", "dynamic"),
    ("int8-static", "onnxruntime", "int8", "static"),
    ("int4-rtn", "onnxruntime", "int4", "rtn"),
    ("int4-hqq", "onnxruntime", "int4", "hqq"),
    ("int4-gptq", "onnxruntime", "int4", "gptq"),
)
TRT_VARIANTS = (
    ("trt-fp16", "tensorrt", "fp16", "none"),
    ("trt-int8", "tensorrt", "int8", "rtn"),
    ("trt-int4", "tensorrt", "int4", "rtn"),
)


def build_all_variants(
    fp32_bundle_dir: str | Path,
    eval_jsonl: str | Path,
    out_root: str | Path,
    calibration_jsonl: str | Path | None = None,
    block_size: int = 32,
    calibration_limit: int = 32,
    eval_limit: int | None = None,
    exact_greedy: bool = False,
    reply_check: Callable[[str], bool] | None = None,
) -> list[dict[str, Any]]:
    """Build the ORT and TensorRT variants under ``out_root`` and return the ``--json`` rows.

    The FP32 bundle comes first in the rows. Calibration (INT8 static, GPTQ) reads
    ``calibration_jsonl``, or ``eval_jsonl`` when none is given (its inputs only: the
    prompts and replies, never the expected actions). Also writes ``out_root/report.md``.
    Task accuracy is reconstructed from the teacher-forced pass (``exact_greedy=False``,
    the report's fast mode: on the demo student it gave the same task accuracy as
    step-by-step decoding for all ten bundles, in half the time). ``reply_check``: the
    domain's well-formed-reply rule, for ``reply_wellformed`` (``report.report``).
    """
    out_root = Path(out_root)
    calibration = calibration_jsonl or eval_jsonl
    bundles, seconds = [], {}
    for name, target, precision, method in ORT_VARIANTS + TRT_VARIANTS:
        started = time.perf_counter()
        out = out_root / (f"{name}-b{block_size}" if precision == "int4" else name)
        if target == "tensorrt":
            tensorrt_bundle(fp32_bundle_dir, out, precision, block_size, overwrite=True)
        else:
            quantize_bundle(
                fp32_bundle_dir,
                out,
                precision,
                method,
                block_size,
                calibration=calibration,
                calibration_limit=calibration_limit,
                overwrite=True,
            )
        seconds[out.name] = round(time.perf_counter() - started, 2)
        log.info("built %s in %.1f s", out, seconds[out.name])
        bundles.append(out)
    rows = report(
        [Path(fp32_bundle_dir)] + bundles,
        eval_jsonl,
        limit=eval_limit,
        exact_greedy=exact_greedy,
        reply_check=reply_check,
    )
    for row in rows:
        row["build_s"] = seconds.get(Path(row["bundle"]).name, 0.0)
    atomic_write(out_root / "report.md", markdown_table(rows))
    return json_rows(rows)
