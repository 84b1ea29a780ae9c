"""Voice benchmark: spoken requests over the WebSocket to ``moe2edge serve``, in real time.

This process is the client: it speaks the demo's held-out requests with espeak-ng in
several voices and streams them as 20 ms PCM16 frames at real-time pace (silence between
turns, as a microphone would) to a server running in another process (started here with
``moe2edge serve`` unless --url is given). It prints one JSON object:

- response_latency_ms {p50, p95}: first reply audio received - when the frame holding the
  endpoint decision's sample was sent (what the user waits once the server can know the
  turn is over);
- turn_latency_ms {p50, p95}: first reply audio received - when the frame holding the last
  voiced sample was sent (includes the endpoint silence);
- endpoint_silence_ms: the server's end-of-turn silence setting;
- transcript_exact_match, wer: final transcripts against the spoken text;
- reply_task_acc: the voice replies' actions against the reference actions;
- reply_wellformed: share of voice replies whose spoken part confirms their own actions
  (the demo domain's reply forms, ``demo_domain.is_wellformed``);
- text_task_acc: the same requests as text through /v1/chat/completions.

    python bench/voice.py --bundle runs/demo/bundles/fp32 --n 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jiwer
import numpy as np
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe2edge.distill.demo_domain import is_wellformed  # noqa: E402  (stdlib only)
from moe2edge.runtime.voice import FRAME_SAMPLES, SAMPLE_RATE, EspeakSynthesizer, float32_to_pcm16  # noqa: E402

VOICES = ["en-us", "en-us+f3", "en-us+m1", "en-us+f2"]  # US English: the ASR model is en-US


def extract_actions(reply: str) -> list[str]:  # same rule as moe2edge.distill.formats
    return re.findall(r"\[[^\]]*\]", reply)


def same_actions(reply: str, action: str) -> bool:
    """The reply's action sequence is the reference's (a compound command has two)."""
    return extract_actions(reply) == extract_actions(action)


def wer(refs: list[str], hyps: list[str]) -> float:
    """Word error rate over all turns: word edits / reference words (jiwer)."""
    return jiwer.wer(refs, hyps) if refs else 0.0


def pct(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, "n": 0}
    a = np.asarray(values)
    return {"p50": round(float(np.percentile(a, 50)), 1),
            "p95": round(float(np.percentile(a, 95)), 1), "n": len(a)}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "moe2edge.cli", "serve", args.bundle, "--port", str(port),
           "--grammar", args.grammar, "--set", f"vad_end_silence_ms={args.end_silence_ms}",
           "--set", f"speculate={str(not args.no_draft).lower()}", "--log-level", "warning",
           *[x for kv in args.set for x in ("--set", kv)]]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, env=env, stdout=sys.stderr, stderr=sys.stderr)
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not become healthy in 60 s")


class Stream:
    """Sends the microphone timeline in real time and remembers when each frame went out."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.sent_at: list[float] = []  # send time of frame i (stream samples i*320..)
        self.t0: float | None = None

    async def send(self, audio: np.ndarray) -> None:
        pcm = float32_to_pcm16(audio)
        step = FRAME_SAMPLES * 2
        for i in range(0, len(pcm) - step + 1, step):
            if self.t0 is None:
                self.t0 = time.perf_counter()
            due = self.t0 + len(self.sent_at) * FRAME_SAMPLES / SAMPLE_RATE
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.ws.send(pcm[i : i + step])
            self.sent_at.append(time.perf_counter())

    def time_of_ms(self, stream_ms: float) -> float:
        """Send time of the frame holding the sample at ``stream_ms``."""
        sample = int(round(stream_ms * SAMPLE_RATE / 1000))
        index = max(0, -(-sample // FRAME_SAMPLES) - 1)
        return self.sent_at[min(index, len(self.sent_at) - 1)]


async def run_voice(url: str, clips: list[dict], token: str | None) -> list[dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    turns: list[dict] = []
    silence = np.zeros(FRAME_SAMPLES, dtype=np.float32)
    async with connect(url, additional_headers=headers, max_size=None) as ws:
        stream = Stream(ws)
        current: dict = {}
        done = asyncio.Event()

        async def receive() -> None:
            async for message in ws:
                ev = json.loads(message)
                kind = ev["type"]
                if kind == "input_audio_buffer.speech_stopped":
                    current.update(audio_end_ms=ev["audio_end_ms"], endpoint_ms=ev["endpoint_ms"])
                elif kind == "conversation.item.input_audio_transcription.completed":
                    current["transcript"] = ev["transcript"]
                    if not ev["transcript"]:
                        done.set()
                elif kind == "response.audio.delta" and "first_audio" not in current:
                    current["first_audio"] = time.perf_counter()
                elif kind == "response.text.done":
                    current["reply"] = ev["text"]
                elif kind == "turn.timings":
                    current["server"] = ev
                elif kind == "response.done":
                    current["status"] = ev["response"]["status"]
                    done.set()
                elif kind == "error":
                    print(f"error event: {ev['error']}", file=sys.stderr)

        receiver = asyncio.create_task(receive())
        await stream.send(np.zeros(SAMPLE_RATE // 2, dtype=np.float32))
        for clip in clips:
            current.clear()
            done.clear()
            await stream.send(clip["audio"])
            deadline = time.perf_counter() + 15
            while not done.is_set() and time.perf_counter() < deadline:
                await stream.send(silence)
            await stream.send(np.zeros(int(0.4 * SAMPLE_RATE), dtype=np.float32))
            turn = {
                "text": clip["text"],
                "voice": clip["voice"],
                "action": clip["action"],
                **current,
            }
            if "first_audio" in current and "endpoint_ms" in current:
                turn["response_latency_ms"] = 1000 * (
                    current["first_audio"] - stream.time_of_ms(current["endpoint_ms"])
                )
                turn["turn_latency_ms"] = 1000 * (
                    current["first_audio"] - stream.time_of_ms(current["audio_end_ms"])
                )
            turn.pop("first_audio", None)
            turns.append(turn)
            print(json.dumps({k: turn.get(k) for k in ("voice", "text", "transcript", "reply",
                  "response_latency_ms", "turn_latency_ms")}), file=sys.stderr)  # fmt: skip
        receiver.cancel()
    return turns


def text_accuracy(base: str, rows: list[dict], token: str | None) -> float:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    hits = 0
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
        for row in rows:
            r = client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": row["utterance"]}], "temperature": 0})  # fmt: skip
            r.raise_for_status()
            hits += same_actions(r.json()["choices"][0]["message"]["content"], row["action"])
    return hits / len(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--bundle", default=None, help="bundle to serve (default: runs/demo, else runs/demo_probe)"
    )
    p.add_argument("--grammar", default=None, help="JSGF grammar (default: beside the eval data)")
    p.add_argument("--eval", default=None, help="eval.jsonl with utterance/action rows")
    p.add_argument("--n", type=int, default=40, help="spoken requests")
    p.add_argument("--voices", default=",".join(VOICES))
    p.add_argument("--end-silence-ms", type=float, default=300.0)
    p.add_argument("--no-draft", action="store_true", help="serve with speculate=false")
    p.add_argument("--url", default=None, help="use a running server (http://host:port)")
    p.add_argument("--token", default=os.environ.get("MOE2EDGE_TOKEN"))
    p.add_argument("--set", action="append", default=[], help="extra server key=value")
    args = p.parse_args()
    run_dir = next(
        (
            ROOT / "runs" / d
            for d in ("demo", "demo_probe")
            if (ROOT / "runs" / d / "bundles/fp32").is_dir()
        ),
        None,
    )
    if args.bundle is None:
        if run_dir is None:
            raise SystemExit("no demo bundle: run `make demo` or pass --bundle")
        args.bundle = str(run_dir / "bundles/fp32")
    data_dir = Path(args.eval).parent if args.eval else Path(args.bundle).parents[1] / "data"
    args.eval = args.eval or str(data_dir / "eval.jsonl")
    args.grammar = args.grammar or str(data_dir / "commands.jsgf")
    rows = [json.loads(line) for line in Path(args.eval).read_text().splitlines() if line.strip()]
    # one utterance per voice turn: multi-turn rows need their earlier turns, so they are left
    # out; the speech is the words-only form of the utterance (no digits)
    rows = [r for r in rows if r.get("kind") != "multi_turn"][: args.n]
    voices = args.voices.split(",")
    synth = {v: EspeakSynthesizer(voice=v) for v in voices}
    clips = [{"text": r.get("spoken", r["utterance"]), "action": r["action"], "voice": voices[i % len(voices)],
              "audio": synth[voices[i % len(voices)]].synthesize(r.get("spoken", r["utterance"]))}
             for i, r in enumerate(rows)]  # fmt: skip

    server = None
    base = args.url
    if base is None:
        port = free_port()
        server = start_server(args, port)
        base = f"http://127.0.0.1:{port}"
    try:
        started = time.time()
        turns = asyncio.run(
            run_voice(base.replace("http", "ws", 1) + "/v1/realtime", clips, args.token)
        )
        text_acc = text_accuracy(base, rows, args.token)
        elapsed = time.time() - started
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
    exact = sum(t.get("transcript") == t["text"] for t in turns)
    reply_hits = sum(same_actions(t.get("reply") or "", t["action"]) for t in turns)
    wellformed = sum(is_wellformed((t.get("reply") or "").strip()) for t in turns)
    server_side = [t["server"] for t in turns if "server" in t]
    result = {
        "response_latency_ms": pct([t["response_latency_ms"] for t in turns if "response_latency_ms" in t]),
        "turn_latency_ms": pct([t["turn_latency_ms"] for t in turns if "turn_latency_ms" in t]),
        "endpoint_silence_ms": args.end_silence_ms,
        "transcript_exact_match": round(exact / len(turns), 3),
        "wer": round(wer([t["text"] for t in turns], [t.get("transcript") or "" for t in turns]), 4),
        "reply_task_acc": round(reply_hits / len(turns), 3),
        "reply_wellformed": round(wellformed / len(turns), 3),
        "text_task_acc": round(text_acc, 3),
        "turns": len(turns),
        "turns_with_audio": sum("response_latency_ms" in t for t in turns),
        "voices": voices,
        "drafted_share": round(sum(bool(s.get("drafted")) for s in server_side) / max(1, len(server_side)), 3),
        "server_response_latency_ms": pct([s["response_latency_ms"] for s in server_side if s.get("response_latency_ms") is not None]),
        "server_first_token_ms": pct([s["first_token_ms"] for s in server_side if s.get("first_token_ms") is not None]),
        "draft": not args.no_draft,
        "bundle": args.bundle,
        "seconds": round(elapsed, 1),
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
