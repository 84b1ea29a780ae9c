"""Shared fixtures: a tiny end-to-end pipeline built once per test session; the switch that
turns "dependency missing" skips into failures."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
REQUIRE_DEPS = os.environ.get("MOE2EDGE_REQUIRE_DEPS") == "1"
"""Set by .ci/run: a dependency that `make test` installs must be there, so CI cannot pass
by skipping (the voice path, the browser page). GPU, TensorRT and Piper tests still skip."""


def _missing(what: str, install: str) -> pytest.MarkDecorator:
    reason = f"{what} missing: {install}"
    if REQUIRE_DEPS:
        return pytest.mark.missing_dependency(reason=reason + " (MOE2EDGE_REQUIRE_DEPS=1)")
    return pytest.mark.skip(reason=reason)


def require_tool(*names: str, install: str) -> pytest.MarkDecorator:
    """A mark for tests that need one of the programs ``names`` on PATH: skipped when none
    is there, failed instead with MOE2EDGE_REQUIRE_DEPS=1."""
    if any(shutil.which(n) for n in names):
        return pytest.mark.needs_tool(*names)
    return _missing(" / ".join(names), install)


def require_module(name: str, install: str) -> pytest.MarkDecorator:
    """Like ``require_tool`` for an importable Python package."""
    if importlib.util.find_spec(name) is not None:
        return pytest.mark.needs_tool(name)
    return _missing(f"the Python package {name}", install)


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "needs_tool(*names): the test uses these programs")
    config.addinivalue_line(
        "markers", "missing_dependency(reason): fails the test (MOE2EDGE_REQUIRE_DEPS=1)"
    )


def pytest_runtest_setup(item) -> None:
    marker = item.get_closest_marker("missing_dependency")
    if marker is not None:
        pytest.fail(marker.kwargs["reason"], pytrace=False)


def subprocess_env() -> dict[str, str]:
    """Environment for child processes: the repo importable, no hub access."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    return env


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict[str, Path]:
    """data -> tokenizer -> tiny MoE teacher -> tiny student -> FP32 bundle (seconds)."""
    import torch

    from moe2edge.distill.demo_data import write_demo_data
    from moe2edge.distill.pipeline import distill_student, make_tokenizer
    from moe2edge.distill.teacher import build_demo_teacher
    from moe2edge.distill.tokenizer import load_tokenizer
    from moe2edge.distill.train import TrainConfig, train_model
    from moe2edge.export.onnx_export import export_fp32

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny_run")
    # the tiny model's replies are what the voice tests were written against (a long one to
    # "turn on the kitchen lights"): its data keeps the follow-up-only multi-turn rows
    paths = write_demo_data(
        root / "data", seed=1, train_size=400, eval_size=12, new_command_share=0.0
    )
    make_tokenizer(paths["train"], root / "tokenizer", vocab_size=448)  # rows fit 128 tokens
    tokenizer = load_tokenizer(root / "tokenizer")
    common = dict(
        train_data=str(paths["train"]),
        tokenizer=str(root / "tokenizer"),
        batch_size=8,
        max_steps=6,
        warmup_steps=2,
        checkpoint_every=0,
        log_every=2,
    )
    teacher = build_demo_teacher(
        len(tokenizer),
        hidden_size=32,
        moe_intermediate_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        v_head_dim=8,
    )
    teacher_dir = train_model(
        teacher,
        None,
        tokenizer,
        TrainConfig(run_dir=str(root / "teacher_run"), teacher=None, **common),
        "teacher",
    )
    student_dir = distill_student(
        TrainConfig(
            run_dir=str(root / "student_run"),
            teacher=str(teacher_dir),
            student_preset="tiny",
            **common,
        )
    )
    bundle_dir = export_fp32(student_dir, root / "bundle", max_new_tokens=12)
    return {
        "root": root,
        "train": paths["train"],
        "eval": paths["eval"],
        "grammar": paths["grammar"],
        "tokenizer": root / "tokenizer",
        "teacher": teacher_dir,
        "student": student_dir,
        "bundle": bundle_dir,
    }
