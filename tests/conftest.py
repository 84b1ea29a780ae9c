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
    from moe2edge.tiny import build_tiny_run

    return build_tiny_run(tmp_path_factory.mktemp("tiny_run"))
