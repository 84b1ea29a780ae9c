"""`moe2edge demo` end to end through the console script, at tiny settings."""

import json
import subprocess

from tests.conftest import PYTHON, ROOT, subprocess_env

REQUIRED = {
    "teacher_params",
    "teacher_active_params",
    "student_params",
    "teacher_task_acc",
    "student_task_acc",
    "onnx_task_acc",
    "teacher_reply_wellformed",
    "student_reply_wellformed",
    "onnx_reply_wellformed",
    "subsets",
    "parity_max_abs_logit_diff",
    "greedy_match_rate",
    "ttft_ms_p50",
    "decode_tok_s",
    "stage_seconds",
}


def test_demo_writes_reports(tmp_path):
    run_dir = tmp_path / "demo"
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "moe2edge.cli",
            "demo",
            "--config",
            str(ROOT / "recipes/demo.yaml"),
            f"run_dir={run_dir}",
            "train_size=300",
            "eval_size=6",
            "vocab_size=320",
            "teacher_steps=3",
            "student_steps=3",
            "batch_size=8",
            "max_new_tokens=8",
            "student_preset=tiny",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=subprocess_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert REQUIRED <= set(report)
    assert report["teacher_active_params"] < report["teacher_params"]
    assert report["student_params"] < report["teacher_params"]
    assert report["parity_max_abs_logit_diff"] <= 1e-3
    assert report["greedy_match_rate"] == 1.0
    assert all(
        0.0 <= report[k] <= 1.0 for k in ("teacher_task_acc", "student_task_acc", "onnx_task_acc")
    )
    assert all(0.0 <= report[f"{m}_reply_wellformed"] <= 1.0 for m in ("teacher", "onnx"))
    # the CE-only student trains beside the KD one, and the report shows all three
    assert 0.0 <= report["ce_student_task_acc"] <= 1.0
    assert "ce_student" in report["subsets"]["all"]["models"]
    assert "| CE-only student |" in (run_dir / "report.md").read_text()
    # the bundle's greedy replies are the PyTorch student's, so their accuracy agrees
    assert report["onnx_task_acc"] == report["student_task_acc"]
    assert report["onnx_reply_wellformed"] == report["student_reply_wellformed"]
    assert report["subsets"]["all"]["rows"] == 6
    assert {"task_acc", "reply_wellformed"} <= set(report["subsets"]["single"]["models"]["onnx"])
    assert set(report["stage_seconds"]) >= {
        "data",
        "tokenizer",
        "teacher",
        "distill",
        "ce_baseline",
        "export",
        "parity",
        "runtime_eval",
    }
    assert "# moe2edge demo report" in (run_dir / "report.md").read_text()
    # every export variant was built and scored against FP32 (issue 4)
    variants = json.loads((run_dir / "export-report.json").read_text())
    built = {(v["target"], v["precision"], v["method"]) for v in variants}
    assert built == {
        ("onnxruntime", "fp32", "none"),
        ("onnxruntime", "fp16", "none"),
        ("onnxruntime", "int8", "dynamic"),
        ("onnxruntime", "int8", "static"),
        ("onnxruntime", "int4", "rtn"),
        ("onnxruntime", "int4", "hqq"),
        ("onnxruntime", "int4", "gptq"),
        ("tensorrt", "fp16", "none"),
        ("tensorrt", "int8", "rtn"),
        ("tensorrt", "int4", "rtn"),
    }
    assert all(
        {"kl", "top1_agreement", "task_acc", "reply_wellformed", "weight_bytes"} <= set(v)
        for v in variants
    )
    assert all(v["reply_wellformed"] is not None for v in variants)  # the demo passes its rule
