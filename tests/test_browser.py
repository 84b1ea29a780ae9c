"""The web page end to end: headless Chromium with a fake microphone playing a WAV file of
espeak-ng speech talks to the service; the transcript, reply and timings appear on the page.

Chromium is driven over the Chrome DevTools Protocol with the `websockets` package (no
selenium/playwright needed). Needs the Debian packages chromium (and espeak-ng):
`apt-get install chromium` (the Makefile's test-deps target does it). Missing, the test is
skipped, or fails with MOE2EDGE_REQUIRE_DEPS=1 (as in CI).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
from websockets.sync.client import connect

from moe2edge.runtime import Generator
from moe2edge.runtime.server import ServerConfig, create_app
from moe2edge.runtime.voice import SAMPLE_RATE, write_wav
from tests.conftest import require_tool
from tests.server_helpers import ServerThread, speech

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
pytestmark = [
    require_tool(
        "chromium", "chromium-browser", install="apt-get install chromium (make test-deps)"
    ),
    require_tool("espeak-ng", install="apt-get install espeak-ng (make system-deps)"),
]


class DevTools:
    """A minimal Chrome DevTools Protocol client for one page."""

    def __init__(self, ws_url: str) -> None:
        self.ws = connect(ws_url, max_size=None, open_timeout=20)
        self.ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=30))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def eval(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def close(self) -> None:
        self.ws.close()


def launch(url: str, wav: Path, profile: Path) -> tuple[subprocess.Popen, DevTools]:
    args = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-port=0",
        "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}%noloop",
        "--autoplay-policy=no-user-gesture-required", url,
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    port_file = profile / "DevToolsActivePort"
    deadline = time.time() + 30
    while not (port_file.is_file() and len(port_file.read_text().split()) >= 2):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"chromium did not start: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.1)
    port = port_file.read_text().split()[0]
    while True:
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json()
                 if t["type"] == "page"]  # fmt: skip
        if pages:
            return proc, DevTools(pages[0]["webSocketDebuggerUrl"])
        assert time.time() < deadline, "no page target"
        time.sleep(0.1)


PAGE_STATE = """(() => {
  const turns = [...document.querySelectorAll('.turn')].map(t => ({
    user: t.querySelector('.user').textContent,
    final: t.querySelector('.user').classList.contains('final'),
    assistant: t.querySelector('.assistant').textContent,
    status: t.querySelector('.assistant').dataset.status || null,
    timings: t.querySelector('.timings').textContent,
  }));
  return {status: document.getElementById('status').textContent,
          errors: document.getElementById('errors').textContent, turns};
})()"""


def test_page_talks_with_a_fake_microphone(tiny_run, tmp_path) -> None:
    utterance = "turn off the kitchen lights"
    audio = np.concatenate([speech(utterance, lead_s=1.0, tail_s=0.2),
                            np.zeros(12 * SAMPLE_RATE, np.float32)])  # fmt: skip
    wav = tmp_path / "mic.wav"
    write_wav(wav, audio)
    generator = Generator.from_bundle(tiny_run["bundle"], threads=1)
    # the tiny test model often answers inside [brackets]: speak everything so audio flows
    config = ServerConfig(grammar=str(tiny_run["grammar"]), token="page-token", speak_brackets=True)
    with ServerThread(create_app(config, generator=generator)) as srv:
        page = httpx.get(srv.url + "/")
        assert page.status_code == 200 and "Start talking" in page.text
        assert httpx.get(srv.url + "/static/app.js").status_code == 200
        proc, tools = launch(f"{srv.url}/?autostart=1#token=page-token", wav, tmp_path / "profile")
        state = {}
        try:
            deadline = time.time() + 40
            while time.time() < deadline:
                state = tools.eval(PAGE_STATE) or {}
                turns = state.get("turns", [])
                if turns and turns[0]["status"] and turns[0]["timings"]:
                    break
                time.sleep(0.25)
            shot = os.environ.get("MOE2EDGE_SCREENSHOT")
            if shot:  # for a person to look at the page
                import base64

                Path(shot).write_bytes(
                    base64.b64decode(tools.call("Page.captureScreenshot")["data"])
                )
            tools.close()
        finally:
            proc.terminate()
            proc.wait(10)
    turns = state.get("turns", [])
    assert turns, f"no turn on the page: {state}"
    first = turns[0]
    assert first["final"] and first["user"] == utterance, state
    assert first["assistant"].strip(), state
    assert first["status"] in ("completed", "incomplete"), state
    assert re.search(
        r"endpoint -> transcript \d+ ms, first token -?\d+ ms, first audio \d+ ms", first["timings"]
    ), state
    assert state["status"] == "listening" and not state["errors"], state
