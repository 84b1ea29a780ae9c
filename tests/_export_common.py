"""Quantized variants of the tiny student's FP32 bundle, built once per test session.

Each tests/test_export_*.py module wraps ``build_tiny_variants`` in a fixture; the cache
here makes the build happen once. The FP32 bundle is copied first: reports write
``accuracy`` into manifests, and the ``tiny_run`` bundle belongs to every other test too.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

from moe2edge.export.quantize import quantize_bundle
from moe2edge.export.tensorrt_flavor import tensorrt_bundle
from moe2edge.runtime.generate import Generator
from tests.conftest import PYTHON, ROOT, subprocess_env

TINY_INT4 = (("rtn", 16), ("rtn", 32), ("hqq", 32), ("gptq", 16), ("gptq", 32))


_CACHE: dict[str, dict[str, Path]] = {}


def run_cli(*args, timeout=300) -> subprocess.CompletedProcess:
    """``moe2edge export ARGS`` in a subprocess of this checkout."""
    return subprocess.run(
        [PYTHON, "-m", "moe2edge.cli", "export", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=subprocess_env(),
        timeout=timeout,
    )


def build_tiny_variants(tiny_run, tmp_path_factory) -> dict[str, Path]:
    if "variants" not in _CACHE:
        _CACHE["variants"] = _build(tiny_run, tmp_path_factory.mktemp("export_variants"))
    return _CACHE["variants"]


def _build(tiny_run, root: Path) -> dict[str, Path]:
    fp32 = root / "fp32"
    shutil.copytree(tiny_run["bundle"], fp32)
    calib = dict(calibration=tiny_run["train"], calibration_limit=8)
    out = {"fp32": fp32}
    out["fp16"] = quantize_bundle(fp32, root / "fp16", "fp16")
    out["int8-dynamic"] = quantize_bundle(fp32, root / "int8-dynamic", "int8", "dynamic")
    out["int8-static"] = quantize_bundle(fp32, root / "int8-static", "int8", "static", **calib)
    for method, block in TINY_INT4:
        name = f"int4-{method}-{block}"
        out[name] = quantize_bundle(fp32, root / name, "int4", method, block, **calib)
    out["trt-fp16"] = tensorrt_bundle(fp32, root / "trt-fp16", "fp16")
    out["trt-int8"] = tensorrt_bundle(fp32, root / "trt-int8", "int8")
    out["trt-int4-16"] = tensorrt_bundle(fp32, root / "trt-int4-16", "int4", 16)
    out["trt-int4-32"] = tensorrt_bundle(fp32, root / "trt-int4-32", "int4", 32)
    return out


def prompt_logits(bundle: Path, prompts: list[str]) -> np.ndarray:
    """Next-token logits after each prompt, through the runtime ([prompts, vocab])."""
    gen = Generator.from_bundle(bundle)
    rows = []
    for p in prompts:
        rows.append(gen.engine.forward(gen.encode_prompt(p), gen.engine.new_cache()))
    return np.stack(rows).astype(np.float64)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| over the spread of the reference logits."""
    return float(np.abs(a - b).max() / (b.max(axis=-1) - b.min(axis=-1)).mean())
