"""The short version of bench/reliability.py (issue 17): the same functions with small counts
against real servers on 127.0.0.1 -- about 1,000 HTTP cases, 300 WebSocket sequences, a
1-minute soak, every security check, and the artifacts sections when that module is here.
Any server error, abnormal close, leaked thread or held slot fails it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.conftest import require_tool

BENCH = Path(__file__).resolve().parents[1] / "bench"
pytestmark = [
    pytest.mark.slow,
    require_tool("espeak-ng", install="apt-get install espeak-ng (make system-deps)"),
]
for module in ("schemathesis", "hypothesis", "psutil"):
    if importlib.util.find_spec(module) is None:
        pytestmark.append(pytest.mark.skip(reason=f"pip install {module} (moe2edge[dev])"))


@pytest.fixture(scope="module")
def bench(tiny_run):
    sys.path.append(str(BENCH))  # last: bench/gguf.py must not shadow the gguf package
    try:
        import reliability

        yield reliability, {"bundle": tiny_run["bundle"], "grammar": tiny_run["grammar"]}
    finally:
        while str(BENCH) in sys.path:
            sys.path.remove(str(BENCH))


def test_fuzzing_finds_no_server_error(bench, tmp_path) -> None:
    reliability, paths = bench
    out = reliability.fuzz(paths, tmp_path, http_cases=1000, ws_sequences=300, seed=17)
    http, ws = out["http_fuzz"], out["ws_fuzz"]
    assert http["cases"] >= 1000 and len(http["operations"]) >= 5
    assert http["server_errors"] == 0, http["examples"]
    assert {"200", "400"} <= set(http["statuses"])  # both kinds of data reached the handlers
    assert ws["sequences"] == 300 and ws["abnormal_closes"] == 0, ws["notes"]
    assert ws["server_errors"] == 0 and ws["slots_after"] == 0
    assert {"invalid_json", "invalid_session", "message_too_large"} <= set(ws["error_codes"])
    assert http["server_alive"] and ws["server_alive"]


def test_one_minute_soak(bench, tmp_path) -> None:
    reliability, paths = bench
    soak = reliability.soak(paths, tmp_path, seconds=60)
    counts = soak["counts"]
    assert soak["server_alive"] and soak["server_errors"] == 0
    assert counts.get("chat", 0) and counts.get("chat_stream", 0) and counts.get("hung_up", 0)
    assert counts.get("voice_sessions", 0) >= 2 and counts.get("barge_ins", 0) >= 1
    assert counts.get("burst_429", 0) >= 1  # overload answered 429
    assert counts.get("connection_errors", 0) == 0 and counts.get("voice_abnormal", 0) == 0
    assert soak["slots_after"] == 0 and soak["voice_sessions_after"] == 0
    assert soak["leaked_threads"] == 0, (soak["threads_new"], soak["samples"][-3:])
    assert soak["leaked_fds"] == 0, soak["fds_new"]


def test_every_security_check_passes(bench, tmp_path) -> None:
    reliability, paths = bench
    out = reliability.security(paths, tmp_path)
    assert out["checks"] >= 25
    assert out["failed"] == 0, [r for r in out["results"] if not r["passed"]]


def test_artifacts_sections(bench) -> None:
    reliability, _ = bench
    if importlib.util.find_spec("reliability_artifacts") is None:
        pytest.skip("bench/reliability_artifacts.py is not in this tree")
    out = reliability.artifacts(faults_trials=5, disk_trials=5, mutations=50)
    assert all("error" not in section for section in out.values()), out
    assert out["faults"]["corrupt_loaded"] == 0 and out["disk_full"]["corrupt_left"] == 0
    assert out["corruption"]["mutations"] >= 50 and out["corruption"]["tracebacks"] == 0
