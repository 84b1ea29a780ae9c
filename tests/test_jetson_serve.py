"""`moe2edge jetson serve`: the runtime service with the power governor in the loop.

Real server process, real HTTP on 127.0.0.1, power read from the AGX Orin fixture sysfs tree.
"""

import json
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.conftest import PYTHON, ROOT, subprocess_env
from tests.server_helpers import free_port

FIXTURE = Path(__file__).parent / "fixtures" / "jetson" / "agx-orin-jp6"


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, json.loads(response.read())


def test_service_runs_under_the_governor(tiny_run):
    port = free_port()
    proc = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "moe2edge.cli",
            "jetson",
            "serve",
            str(tiny_run["bundle"]),
            "--no-voice",
            "--port",
            str(port),
            "--root",
            str(FIXTURE),
            "--source",
            "hwmon",
            "--budget-w",
            "30",
        ],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.3)
        status, body = post(
            f"http://127.0.0.1:{port}/v1/completions",
            {"model": "x", "prompt": "turn on the kitchen lights", "max_tokens": 8},
        )
        assert status == 200 and body["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert "power governor: budget 30.0 W" in output, output[-2000:]
