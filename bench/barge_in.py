"""Barge-in benchmark: the user speaks while a reply plays; how soon does the reply stop?

This process is the client of a ``moe2edge serve`` it starts (or ``--url``). Each trial
speaks a command (the demo's held-out requests, several voices) in real time, keeps the
microphone open (silence with a noise floor) until the reply's first audio arrives, waits a
random 0.2-1.0 s of playback, then speaks an interruption. The interruption's speech is
trimmed of its synthesized silence, so its true onset in the stream is known.

- barge_in_stop_ms {p50, p95, n}: true onset of the interruption -> the reply is stopped for
  the listener: the later of ``input_audio_buffer.speech_started`` arriving (a Realtime
  client flushes its playback buffer on it) and the cancelled reply's last audio chunk
  arriving (a naive client plays whatever comes);
- speech_started_ms, last_audio_ms: the two parts;
- truncation_error_ms: ``conversation.item.truncated``'s audio_end_ms minus what this
  client had played by the barge-in (played in real time from the first chunk's arrival);
- trials where the reply had finished sending before the interruption are reported
  (``finished_before``) and still count: the listener is then stopped by speech_started.

    python bench/barge_in.py --bundle runs/demo/bundles/fp32 --n 40
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import voice as vb  # bench/voice.py: server start, clips, the real-time microphone stream
from machine import cpu_name
from websockets.asyncio.client import connect

ROOT = vb.ROOT
INTERRUPTIONS = ["stop", "wait, turn off the fan in the bedroom", "no, lock the garage door"]
SILENCE_S = 0.02
ACOUSTIC_DELAY_S = 0.01  # speaker -> microphone


class Playback:
    """The client's loudspeaker: each reply plays in real time from its first chunk's
    arrival and stops when ``speech_started`` arrives (a Realtime client flushes then);
    ``echo`` is what the microphone hears of it, ``gain`` (from --echo-db) under its level."""

    def __init__(self, events: list, gain: float) -> None:
        self.events, self.gain = events, gain
        self._seen = 0  # events read so far
        self._replies: dict[str, tuple[float, list[np.ndarray]]] = {}  # id -> (first, audio)
        self._stopped: float | None = None  # the first speech_started after a reply began

    def _read(self) -> None:
        for t, e in self.events[self._seen :]:
            if e["type"] == "response.audio.delta":
                pcm = np.frombuffer(base64.b64decode(e["delta"]), np.int16)
                audio = self._replies.setdefault(e["response_id"], (t, []))[1]
                audio.append(pcm.astype(np.float32) / 32768)
            elif e["type"] == "input_audio_buffer.speech_started" and self._stopped is None:
                self._stopped = t if self._replies else None
        self._seen = len(self.events)

    def echo(self, start: float, n: int) -> np.ndarray:
        self._read()
        out = np.zeros(n, np.float32)
        at = start + np.arange(n) / vb.SAMPLE_RATE
        for first_at, chunks in self._replies.values():
            audio = np.concatenate(chunks)
            index = np.round((at - first_at - ACOUSTIC_DELAY_S) * vb.SAMPLE_RATE).astype(int)
            playing = (index >= 0) & (index < len(audio))
            stopped = self._stopped
            if stopped is not None and stopped >= first_at:  # flushed (else: before it began)
                playing &= at < stopped
            out[playing] += self.gain * audio[index[playing]]
        return out


def _sent_s(events, reply_id) -> float:
    """Seconds of audio sent for the reply ``reply_id``."""
    return sum(len(base64.b64decode(e["delta"])) / 2 / vb.SAMPLE_RATE for _, e in events
               if e["type"] == "response.audio.delta" and e["response_id"] == reply_id)  # fmt: skip


async def trial(url: str, token: str | None, command: np.ndarray, interrupt: np.ndarray | None,
                wait_s: float, seed: int, echo_gain: float = 0.0) -> dict:  # fmt: skip
    """One barge-in; ``interrupt`` None: a control, the reply plays to its end (any
    speech_started during it is the device interrupting itself)."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with connect(url, additional_headers=headers, max_size=2**24) as ws:
        events: list[tuple[float, dict]] = []

        async def receive() -> None:
            async for message in ws:
                events.append((time.perf_counter(), json.loads(message)))

        reader = asyncio.create_task(receive())
        playback = Playback(events, echo_gain)
        stream = vb.Stream(ws, seed, playback.echo if echo_gain else None)
        silence = np.zeros(int(SILENCE_S * vb.SAMPLE_RATE), np.float32)
        try:
            while not any(e["type"] == "session.created" for _, e in events):
                await asyncio.sleep(0.01)
            await stream.send(command)
            deadline = time.perf_counter() + 20
            while time.perf_counter() < deadline and not _first(events, "response.audio.delta"):
                await stream.send(silence)
            first_audio = _first(events, "response.audio.delta")
            if first_audio is None:
                return {"error": "no reply audio within 20 s"}
            reply_id = first_audio[1]["response_id"]
            while time.perf_counter() < first_audio[0] + wait_s:
                await stream.send(silence)
            if interrupt is None:
                return await _control(stream, events, reply_id, first_audio[0], silence)
            onset_sample = stream.samples
            await stream.send(interrupt)
            deadline = time.perf_counter() + 10
            while time.perf_counter() < deadline and not _done(events, reply_id):
                await stream.send(silence)
            for _ in range(10):  # 200 ms more: late audio of the cancelled reply shows up
                await stream.send(silence)
        finally:
            reader.cancel()
        onset = stream.time_of_sample(onset_sample)
        started = [t for t, e in events if e["type"] == "input_audio_buffer.speech_started"
                   and t > onset - 0.1]  # fmt: skip
        reply_audio = [(t, e) for t, e in events
                       if e["type"] == "response.audio.delta" and e["response_id"] == reply_id]  # fmt: skip
        done = next((e["response"] for _, e in events
                     if e["type"] == "response.done" and e["response"]["id"] == reply_id), None)  # fmt: skip
        truncated = next((e for _, e in events if e["type"] == "conversation.item.truncated"), None)
        if not started:
            return {"error": "no speech_started for the interruption"}
        early = [t for t, e in events if e["type"] == "input_audio_buffer.speech_started"
                 and first_audio[0] < t < onset - 0.1]  # fmt: skip
        sent_s = _sent_s(events, reply_id)
        played_ms = 1000 * min(sent_s, started[0] - first_audio[0])
        last_audio = reply_audio[-1][0]
        return {
            "stop_ms": 1000 * (max(started[0], last_audio) - onset),
            "speech_started_ms": 1000 * (started[0] - onset),
            "last_audio_ms": 1000 * (last_audio - onset),
            "status": done["status"] if done else None,
            "finished_before": done is not None and done["status"] != "cancelled",
            "truncation_error_ms": (truncated["audio_end_ms"] - played_ms) if truncated else None,
            "self_interrupted": bool(early),
            "reply_heard_s": min(sent_s, (early or started)[0] - first_audio[0]),
        }


async def _control(stream, events, reply_id, first_audio_at, silence) -> dict:
    deadline = time.perf_counter() + 20
    while time.perf_counter() < deadline and not _done(events, reply_id):
        await stream.send(silence)
    for _ in range(25):  # 0.5 s more: the end of playback and its echo
        await stream.send(silence)
    starts = [t for t, e in events if e["type"] == "input_audio_buffer.speech_started"
              and t > first_audio_at]  # fmt: skip
    sent_s = _sent_s(events, reply_id)
    done_at = next((t for t, e in events if e["type"] == "response.done"), None)
    return {"control": True, "self_interrupted": bool(starts), "reply_s": sent_s,
            "reply_heard_s": min(sent_s, starts[0] - first_audio_at) if starts else sent_s,
            "self_start_s": starts[0] - first_audio_at if starts else None,  # after first audio
            "done_s": done_at - first_audio_at if done_at else None}  # fmt: skip


def _first(events, kind):
    return next(((t, e) for t, e in events if e["type"] == kind), None)


def _done(events, reply_id) -> bool:
    return any(e["type"] == "response.done" and e["response"]["id"] == reply_id for _, e in events)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default=str(ROOT / "runs/demo/bundles/fp32"))
    p.add_argument("--grammar", default=None, help="JSGF grammar (default: beside the eval data)")
    p.add_argument("--n", type=int, default=40, help="trials")
    p.add_argument("--voices", default=",".join(vb.VOICES))
    p.add_argument("--tts", default="piper", help="the reply voice (piper or espeak)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--url", default=None)
    p.add_argument("--token", default=os.environ.get("MOE2EDGE_TOKEN"))
    p.add_argument("--set", action="append", default=[], help="extra server key=value")
    p.add_argument("--echo-db", type=float, default=None,
                   help="mix the reply's playback into the microphone this many dB under its "
                        "level (residual echo); default: no echo")  # fmt: skip
    p.add_argument("--controls", type=int, default=0,
                   help="also run this many trials without an interruption")  # fmt: skip
    p.add_argument("--out", default=str(ROOT / "bench/results/voice.json"),
                   help="merge barge_in_stop_ms into this JSON (atomic)")  # fmt: skip
    args = p.parse_args()
    args.no_draft = False
    data_dir = Path(args.bundle).parents[1] / "data"
    args.grammar = args.grammar or str(data_dir / "commands.jsgf")
    rows = [json.loads(x) for x in (data_dir / "eval.jsonl").read_text().splitlines() if x]
    rows = [r for r in rows if r.get("kind") == "single"]
    rng = np.random.default_rng(args.seed)
    voices = args.voices.split(",")
    synth = {v: vb.synthesizer(v) for v in voices}
    server, base = None, args.url
    if base is None:
        port = vb.free_port()
        server = vb.start_server(args, port, args.tts)
        base = f"http://127.0.0.1:{port}"
    url = base.replace("http", "ws", 1) + "/v1/realtime"
    results, controls, started = [], [], time.time()
    gain = 0.0 if args.echo_db is None else 10 ** (args.echo_db / 20)
    try:
        for i in range(args.n):
            voice = voices[i % len(voices)]
            command = vb.trimmed(synth[voice], rows[i % len(rows)].get("spoken"))
            other = synth[voices[(i + 1) % len(voices)]]
            interrupt = vb.trimmed(other, INTERRUPTIONS[i % len(INTERRUPTIONS)])
            wait_s = float(rng.uniform(0.2, 1.0))
            r = asyncio.run(trial(url, args.token, command, interrupt, wait_s, args.seed + i, gain))
            results.append(r | {"voice": voice, "wait_s": round(wait_s, 3)})
            print(json.dumps(results[-1]), file=sys.stderr)
        for i in range(args.controls):
            command = vb.trimmed(synth[voices[i % len(voices)]], rows[-1 - i % len(rows)]["spoken"])
            r = asyncio.run(trial(url, args.token, command, None, 0.0, args.seed + 1000 + i, gain))
            controls.append(r)
            print(json.dumps(controls[-1]), file=sys.stderr)
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
    ok = [r for r in results if "error" not in r]
    heard = [r for r in ok + controls if "error" not in r]
    self_cuts = sum(r["self_interrupted"] for r in heard)
    heard_min = sum(r["reply_heard_s"] for r in heard) / 60
    trunc = [r["truncation_error_ms"] for r in ok if r["truncation_error_ms"] is not None]
    summary = {
        "barge_in_stop_ms": vb.pct([r["stop_ms"] for r in ok]),
        "speech_started_ms": vb.pct([r["speech_started_ms"] for r in ok]),
        "last_audio_ms": vb.pct([r["last_audio_ms"] for r in ok]),
        "truncation_error_ms": vb.pct([abs(x) for x in trunc]) if trunc else None,
        "finished_before": sum(r["finished_before"] for r in ok),
        "errors": [r for r in results + controls if "error" in r],
        "echo_db": args.echo_db,
        "self_interruptions": self_cuts,
        "self_interruptions_per_reply_minute": round(self_cuts / heard_min, 2)
        if heard_min
        else None,
        "reply_minutes_heard": round(heard_min, 2),
        "controls": len(controls),
        "trials": len(results),
        "settings": args.set,
        "bundle": args.bundle,
        "reply_tts": args.tts,
        "cpu": cpu_name(),
        "seconds": round(time.time() - started, 1),
    }
    print(json.dumps(summary))
    vb.merge_results(
        Path(args.out), {"barge_in_stop_ms": summary["barge_in_stop_ms"], "barge_in": summary}
    )


if __name__ == "__main__":
    main()
