"""The web page end to end: headless Chromium with a fake microphone playing a WAV file of
espeak-ng speech talks to the service; the turn appears on the page as a conversation: the
final transcript, the reply, its action as a chip, a latency bar of its stages and the
page's p50/p95. A screenshot is kept (MOE2EDGE_ARTIFACTS, default runs/test-artifacts/).

Chromium is driven over the Chrome DevTools Protocol with the `websockets` package (no
selenium/playwright needed). Needs the Debian packages chromium (and espeak-ng):
`apt-get install chromium` (the Makefile's test-deps target does it). Missing, the test is
skipped, or fails with MOE2EDGE_REQUIRE_DEPS=1 (as in CI).
"""

from __future__ import annotations

import base64
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
from tests.conftest import ROOT, require_tool
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
        "--autoplay-policy=no-user-gesture-required", "--window-size=900,720", url,
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
    raw: t.querySelector('.assistant').dataset.raw || '',
    status: t.querySelector('.assistant').dataset.status || null,
    actions: [...t.querySelectorAll('.action')].map(a => a.dataset.name),
    chips: [...t.querySelectorAll('.action')].map(a => a.textContent),
    stages: Object.fromEntries([...t.querySelectorAll('.seg')].map(
      s => [s.dataset.stage, Number(s.dataset.ms)])),
    labels: t.querySelector('.stages') ? t.querySelector('.stages').textContent : '',
    latency: Number(t.querySelector('.latency').dataset.turnLatencyMs),
  }));
  return {status: document.getElementById('status').textContent,
          errors: document.getElementById('errors').textContent,
          p50: document.getElementById('p50').textContent,
          p95: document.getElementById('p95').textContent, turns};
})()"""
# the page's own parser and percentile on known input (the model decides what the live
# turn's reply holds)
PAGE_FUNCTIONS = """JSON.stringify([
  parseActions('[lights.dim room=dining_room value=30] [fan.on] Dimming the room.'),
  parseActions('Sure [not an action]'),
  [percentile([400, 100, 300, 200], 50), percentile([400, 100, 300, 200], 95)],
])"""
CALL = re.compile(r"^\s*\[([A-Za-z_][\w.-]*)((?:\s+[\w.-]+=[^\s\]\[]*)*)\s*\]")


def leading_actions(text: str) -> list[str]:
    """The names of the bracketed actions a reply starts with (the bracket tool format)."""
    names = []
    while m := CALL.match(text):
        names.append(m.group(1))
        text = text[m.end() :]
    return names


def keep_screenshot(tools: DevTools, tmp_path: Path, name: str = "page.png") -> Path:
    png = base64.b64decode(tools.call("Page.captureScreenshot", format="png")["data"])
    (tmp_path / name).write_bytes(png)
    folder = Path(os.environ.get("MOE2EDGE_ARTIFACTS") or ROOT / "runs" / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(png)
    return folder / name


def replay_turn(n: int, transcript: str, reply: str, latency: dict, call=None) -> list[dict]:
    """The events of one more turn in the server's shapes (docs/voice-protocol.md), for what
    the tiny model's live reply may not show: an action, a server-validated call."""
    item, resp = f"item_replay{n}", f"resp_replay{n}"
    events = [
        {"type": "input_audio_buffer.speech_started", "item_id": item, "audio_start_ms": 0},
        {"type": "conversation.item.input_audio_transcription.delta", "item_id": item,
         "transcript": transcript.rsplit(" ", 1)[0]},
        {"type": "conversation.item.input_audio_transcription.completed", "item_id": item,
         "transcript": transcript},
        {"type": "response.created", "response": {"id": resp, "status": "in_progress"}},
    ]  # fmt: skip
    if call:
        item_obj = {"type": "function_call", "name": call[0], "arguments": json.dumps(call[1])}
        events.append({"type": "response.output_item.done", "response_id": resp, "item": item_obj})
    events += [{"type": "response.text.delta", "response_id": resp, "delta": w + " "}
               for w in reply.split(" ")]  # fmt: skip
    events.append({"type": "turn.timings", "item_id": item, "response_id": resp, **latency})
    events.append({"type": "response.done", "response": {"id": resp, "status": "completed"}})
    return events


REPLAY = json.dumps(
    replay_turn(
        2, "dim the dining room lights", "[lights.dim room=dining_room value=30] Dimming the "
        "dining room.", {"endpoint_delay_ms": 96, "first_token_ms": 40, "response_latency_ms": 210,
                         "turn_latency_ms": 306, "final_transcript_ms": 3, "drafted": False},
    )
    + replay_turn(
        3, "turn on the fan", "[fan.on] Turning on the fan.", {"endpoint_delay_ms": 800,
        "first_token_ms": 60, "response_latency_ms": 250, "turn_latency_ms": 1050},
        call=("fan.on", {"speed": 2}),
    )
)  # fmt: skip


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
                if turns and turns[0]["status"] and turns[0]["stages"]:
                    break
                time.sleep(0.25)
            time.sleep(0.3)  # let the last paint land before the screenshot
            shot = keep_screenshot(tools, tmp_path)
            functions = json.loads(tools.eval(PAGE_FUNCTIONS))
            tools.eval(f"{REPLAY}.forEach(onEvent)")
            replayed = tools.eval(PAGE_STATE)
            keep_screenshot(tools, tmp_path, "page-replay.png")
            tools.close()
        finally:
            proc.terminate()
            proc.wait(10)
    assert shot.stat().st_size > 10_000, shot
    turns = state.get("turns", [])
    assert turns, f"no turn on the page: {state}"
    first = turns[0]
    assert first["final"] and first["user"] == utterance, state
    assert first["raw"].strip(), state
    assert first["status"] in ("completed", "incomplete"), state
    # the action: a reply starting with [name key=value ...] shows each call as a chip, and
    # the text beside the chips is the rest of the reply
    names = leading_actions(first["raw"])
    assert first["actions"] == names, state
    if names:
        assert not first["assistant"].lstrip().startswith("["), state
    assert first["raw"].endswith(first["assistant"]), state
    # the latency bar: its three stages add up to the turn's voice-to-voice latency
    stages = first["stages"]
    assert set(stages) == {"endpoint", "first_token", "first_sound"}, state
    assert all(v >= 0 for v in stages.values()), state
    assert first["latency"] > 0 and abs(sum(stages.values()) - first["latency"]) < 1, state
    assert 0 < stages["endpoint"] < 2000, state  # the endpointing silence came first
    for label in ("endpoint", "first token", "first sound", "voice-to-voice"):
        assert label in first["labels"], state
    # one turn: p50 = p95 = its latency
    assert state["p50"] == state["p95"] == f"{round(first['latency'])} ms", state
    assert state["status"] == "listening" and not state["errors"], state
    (calls, plain, percentiles) = functions
    assert [c["name"] for c in calls["calls"]] == ["lights.dim", "fan.on"], functions
    assert calls["calls"][0]["args"] == [["room", "dining_room"], ["value", "30"]], functions
    assert calls["rest"] == "Dimming the room." and plain == {
        "calls": [],
        "rest": "Sure [not an action]",
    }
    assert percentiles == [200, 400], functions
    # the page's rendering of what the live model did not show: a chip parsed from the text,
    # a chip from the server's function_call event, p50/p95 over three turns
    two, three = replayed["turns"][1:]
    assert two["actions"] == ["lights.dim"] and two["assistant"].startswith("Dimming"), replayed
    assert "room=dining_room" in two["chips"][0] and "value=30" in two["chips"][0], replayed
    assert two["stages"] == {"endpoint": 96, "first_token": 40, "first_sound": 170}, replayed
    assert three["actions"] == ["fan.on"] and "speed=2" in three["chips"][0], replayed
    ordered = sorted([first["latency"], 306, 1050])
    assert replayed["p50"] == f"{round(ordered[1])} ms", replayed
    assert replayed["p95"] == f"{round(ordered[2])} ms", replayed
