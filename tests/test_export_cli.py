"""`moe2edge export quantize | tensorrt | check-trt | report | engine | verify` as a user runs them."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests._export_common import build_tiny_variants, run_cli


@pytest.fixture(scope="module")
def tiny_variants(tiny_run, tmp_path_factory):
    return build_tiny_variants(tiny_run, tmp_path_factory)


def test_quantize_then_verify(tiny_variants, tiny_run, tmp_path):
    out = tmp_path / "int4"
    proc = run_cli(
        "quantize", tiny_variants["fp32"], out, "--precision", "int4", "--method", "gptq",
        "--block-size", "16", "--calibration", tiny_run["train"], "--calibration-limit", "4",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}: int4 gptq, weights" in proc.stdout
    proc = run_cli("verify", out)
    assert proc.returncode == 0 and "io contract ok" in proc.stdout, proc.stderr
    proc = run_cli("quantize", tiny_variants["fp32"], out, "--precision", "int4")
    assert (
        proc.returncode == 2
        and "moe2edge: error:" in proc.stderr
        and "already exists" in proc.stderr
    )
    assert "Traceback" not in proc.stderr


def test_tensorrt_flavour_and_check_trt(tiny_variants, tmp_path):
    out = tmp_path / "trt"
    proc = run_cli("quantize", tiny_variants["fp32"], out, "--precision", "int4", "--target",
                   "tensorrt", "--block-size", "16")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("check-trt", out, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["unsupported"] == [] and result["target"] == "tensorrt"
    proc = run_cli("check-trt", tiny_variants["int4-rtn-16"], "--json")
    assert proc.returncode == 1
    unsupported = json.loads(proc.stdout)["unsupported"]
    assert any(
        u["op_type"] == "MatMulNBits" and u["domain"] == "com.microsoft" for u in unsupported
    )
    proc = run_cli("check-trt", tiny_variants["int4-rtn-16"])
    assert "UNSUPPORTED com.microsoft::MatMulNBits x15" in proc.stdout


def test_report_json(tiny_variants, tiny_run, tmp_path):
    md = tmp_path / "table.md"
    proc = run_cli("report", tiny_variants["fp32"], tiny_variants["trt-int8"], "--eval",
                   tiny_run["eval"], "--limit", "2", "--json", "--markdown", md, "--no-write")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["precision"] for r in rows] == ["fp32", "int8"] and rows[1]["target"] == "tensorrt"
    assert {"bundle", "kl", "top1_agreement", "task_acc", "perplexity", "weight_bytes"} <= set(
        rows[0]
    )
    assert md.read_text().startswith("| bundle |")


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here"
)
def test_engine_without_tensorrt_stops_clearly(tiny_variants):
    proc = run_cli("engine", tiny_variants["trt-int4-16"])
    assert proc.returncode == 2
    assert "TensorRT is not installed" in proc.stderr and "Traceback" not in proc.stderr


def test_engine_runs_the_onnx_prechecks_before_the_build(tiny_variants):
    """An ONNX Runtime INT4 bundle (MatMulNBits) stops in the export-side pre-checks, in
    seconds, whether or not TensorRT is installed: the build is never reached."""
    proc = run_cli("engine", tiny_variants["int4-rtn-16"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "will not build with TensorRT" in proc.stderr
    assert "com.microsoft::MatMulNBits" in proc.stderr
    assert "TensorRT is not installed" not in proc.stderr
