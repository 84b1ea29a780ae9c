"""Voice benchmark: spoken requests over the WebSocket to ``moe2edge serve``, in real time.

This process is the client: it speaks the demo's held-out requests in several voices
(espeak-ng variants and the Piper voice), some with a pause of 300-700 ms spliced in
between two words ("turn on the ... kitchen lights"), and streams them as 20 ms PCM16
frames at real-time pace (silence between turns, as a microphone would) to a server in
another process (started here with ``moe2edge serve`` unless --url is given). The next
request is spoken once the reply has finished playing (plus ``GAP_S``), as a user would:
earlier speech would barge in and cut the remembered reply.

Each utterance's speech is trimmed of its synthesized silence, so where speech truly ends
in the stream is known. The latency is measured as a user hears it: from that true end of
speech to the first non-silent sample of reply audio, played as it arrives (a sample
plays at the later of: the first reply chunk's arrival plus its offset, and its own chunk's
arrival). Each endpointing policy (predictive, fixed 300/500/800 ms) gets its own session
(``session.update``) over the same clips; further TTS voices (``--tts``) serve the
predictive policy again. It prints one JSON object:

- voice_to_voice_ms {p50, p95, n}: true end of speech -> first reply sound (the predictive
  policy, first TTS); false_cutoff_rate: share of the paused utterances with an endpoint
  inside them (before their true end), false_cutoff_rate_all: of all utterances;
- baselines {300, 500, 800}: the same for fixed-silence endpointing;
- stages_ms: ms after the true end of speech of the VAD's end of speech (a stream
  position), the endpoint decision, the final transcript, the first token, the first TTS
  audio chunk and the first sound (events as received by the client; the first token from
  the server's own timing relative to its endpoint);
- tts_first_audio_ms {piper, espeak}: endpoint decision -> first reply sound, per voice;
  tts_synth_first_phrase_ms: one short phrase synthesized in this process, per voice;
- policies: everything per policy and voice; the old fields (response_latency_ms,
  turn_latency_ms: first reply chunk from the endpoint / from the VAD's end; transcript
  exact match, wer, reply_task_acc, reply_wellformed, text_task_acc) for comparison;
  text_task_acc_in_conversation: the typed requests as one conversation after the same
  ``history_turns`` earlier turns a voice session keeps (the control for reply_task_acc).

    python bench/voice.py --bundle runs/demo/bundles/fp32 --n 80
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import jiwer
import numpy as np
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HERE = str(Path(__file__).resolve().parent)  # bench/ last: bench/gguf.py shadows `gguf`
sys.path[:] = [p for p in sys.path if p not in (HERE, "")] + [HERE]

from machine import cpu_name  # noqa: E402  (bench/machine.py)

from moe2edge.distill.demo_domain import is_wellformed  # noqa: E402  (stdlib only)
from moe2edge.runtime.manifest import read_manifest  # noqa: E402
from moe2edge.runtime.voice import FRAME_SAMPLES, SAMPLE_RATE, EspeakSynthesizer, float32_to_pcm16  # noqa: E402
from moe2edge.runtime.voice.audio import pcm16_to_float32, speech_bounds  # noqa: E402

# US English (the ASR model is en-US): five espeak-ng variants and the Piper voice
VOICES = ["en-us", "en-us+f3", "en-us+m1", "en-us+f2", "en-us+m3", "piper"]
POLICIES = ["predictive", "300", "500", "800"]
SOUND = 0.01  # |sample| from which reply audio counts as sound (-40 dBFS)
GAP_S = 0.5  # silence between the end of a reply's audio and the next request
NOISE = 0.002  # the microphone's noise floor under everything sent (-54 dBFS): no digital zeros


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


def start_server(args, port: int, tts: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "moe2edge.cli", "serve", args.bundle, "--port", str(port),
           "--grammar", args.grammar, "--set", f"tts={tts}",
           "--set", f"speculate={str(not args.no_draft).lower()}", "--log-level", "warning",
           *[x for kv in args.set for x in ("--set", kv)]]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, env=env, stdout=sys.stderr, stderr=sys.stderr)
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not become healthy in 90 s")


@contextmanager
def serving(args, tts: str) -> Iterator[str]:
    """The base URL of the server under test: ``--url``, else a ``moe2edge serve`` process
    started here with reply voice ``tts`` and stopped on leaving."""
    if args.url is not None:
        yield args.url
        return
    port = free_port()
    server = start_server(args, port, tts)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


# --- the spoken clips -------------------------------------------------------------------------


def synthesizer(voice: str):
    if voice == "piper":
        from moe2edge.runtime.voice import PiperSynthesizer

        return PiperSynthesizer()
    return EspeakSynthesizer(voice=voice)


def trimmed(tts, text: str) -> np.ndarray:
    audio = tts.synthesize(text)
    start, end = speech_bounds(audio)
    return audio[start:end]


def make_clip(tts, text: str, pause_ms: float, rng) -> dict:
    """``text`` as trimmed speech; with ``pause_ms`` > 0, silence spliced in at a word
    boundary inside it. The clip records its true end and where its pause is (samples)."""
    words = text.split()
    if pause_ms > 0 and len(words) >= 3:
        cut = int(rng.integers(1, len(words) - 1))  # at least one word on either side
        first, second = trimmed(tts, " ".join(words[:cut])), trimmed(tts, " ".join(words[cut:]))
        gap = np.zeros(int(pause_ms * SAMPLE_RATE / 1000), dtype=np.float32)
        audio, pause = np.concatenate([first, gap, second]), (len(first), len(first) + len(gap))
        where = " ".join(words[:cut]) + " ... " + " ".join(words[cut:])
    else:
        audio, pause, where = trimmed(tts, text), None, None
    return {"audio": audio, "end": len(audio), "pause": pause, "paused_text": where}


class Stream:
    """Sends the microphone timeline in real time and remembers when each frame went out."""

    def __init__(self, ws, seed: int = 0, echo=None) -> None:
        self.ws = ws
        self.rng = np.random.default_rng(seed)
        self.sent_at: list[float] = []  # send time of frame i (stream samples i*320..)
        self.t0: float | None = None
        # echo(start, n): what the microphone hears of the device's own playback over the n
        # samples spoken from perf_counter() ``start`` on (bench/barge_in.py --echo-db)
        self.echo = echo

    @property
    def samples(self) -> int:
        return len(self.sent_at) * FRAME_SAMPLES

    async def send(self, audio: np.ndarray) -> None:
        # whole frames first, then the floor over all of them: a zero-padded tail would be
        # digital silence no microphone sends, and it sinks the VAD's noise floor (vad.py)
        audio = np.concatenate([audio, np.zeros(-len(audio) % FRAME_SAMPLES, np.float32)])
        audio = audio + self.rng.normal(0, NOISE, len(audio)).astype(np.float32)
        for i in range(0, len(audio), FRAME_SAMPLES):  # whole frames: the position stays exact
            if self.t0 is None:
                self.t0 = time.perf_counter()
            due = self.t0 + len(self.sent_at) * FRAME_SAMPLES / SAMPLE_RATE
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            frame = audio[i : i + FRAME_SAMPLES]
            if self.echo is not None:
                frame = frame + self.echo(due - FRAME_SAMPLES / SAMPLE_RATE, FRAME_SAMPLES)
            await self.ws.send(float32_to_pcm16(frame))
            self.sent_at.append(time.perf_counter())

    def time_of_sample(self, sample: int) -> float:
        """When stream sample ``sample`` was spoken: its frame went out at the frame's end."""
        index = min(max(0, sample // FRAME_SAMPLES), len(self.sent_at) - 1)
        return self.sent_at[index] - ((index + 1) * FRAME_SAMPLES - sample - 1) / SAMPLE_RATE

    def time_of_ms(self, stream_ms: float) -> float:
        """Send time of the frame holding the sample at ``stream_ms`` (the old measure)."""
        sample = int(round(stream_ms * SAMPLE_RATE / 1000))
        index = max(0, -(-sample // FRAME_SAMPLES) - 1)
        return self.sent_at[min(index, len(self.sent_at) - 1)]


def first_sound(chunks: list[tuple[float, bytes]]) -> float | None:
    """When the first non-silent reply sample plays, the chunks played as they arrive."""
    if not chunks:
        return None
    play_start, offset = chunks[0][0], 0
    for arrived, pcm in chunks:
        x = pcm16_to_float32(pcm)
        loud = np.flatnonzero(np.abs(x) >= SOUND)
        if len(loud):
            return max(play_start + (offset + int(loud[0])) / SAMPLE_RATE, arrived)
        offset += len(x)
    return None


def turn_done(events: list[tuple[float, dict]], end_ms: float) -> bool:
    """The turn that ends after the clip's true end was answered (or heard as nothing)."""
    after = False
    for _, ev in events:
        kind = ev["type"]
        if kind == "input_audio_buffer.speech_stopped" and ev["endpoint_ms"] >= end_ms:
            after = True
        elif after and kind == "conversation.item.input_audio_transcription.completed":
            if not ev["transcript"]:
                return True
        elif after and kind == "response.done":
            return True
    return False


def reply_played_until(events: list[tuple[float, dict]]) -> float:
    """When the audio received so far ends, played in real time from its first chunk."""
    chunks = [(t, ev) for t, ev in events if ev["type"] == "response.audio.delta"]
    if not chunks:
        return 0.0
    samples = sum(len(base64.b64decode(ev["delta"])) // 2 for _, ev in chunks)
    return chunks[0][0] + samples / SAMPLE_RATE


def analyse(clip: dict, events: list[tuple[float, dict]], stream: Stream, start: int) -> dict:
    """One turn's measures from the events received while its clip was spoken."""
    end_sample = start + clip["end"]
    end_ms = 1000 * end_sample / SAMPLE_RATE
    t_end = stream.time_of_sample(end_sample - 1)
    stops = [(t, ev) for t, ev in events if ev["type"] == "input_audio_buffer.speech_stopped"]
    turn = {k: clip[k] for k in ("text", "voice", "action", "paused_text")}
    turn["cut_off"] = any(ev["endpoint_ms"] < end_ms for _, ev in stops)
    final = next(((t, ev) for t, ev in stops if ev["endpoint_ms"] >= end_ms), None)
    transcripts = [ev["transcript"] for _, ev in events
                   if ev["type"] == "conversation.item.input_audio_transcription.completed"]  # fmt: skip
    turn["transcript"] = " ".join(t for t in transcripts if t)
    if final is None:
        return turn
    t_stop, stop = final
    later = [(t, ev) for t, ev in events if t >= t_stop]
    t_final = next((t for t, ev in later if ev["type"].endswith("transcription.completed")), None)
    response = next((ev["response"]["id"] for _, ev in later if ev["type"] == "response.created"), None)  # fmt: skip
    mine = [(t, ev) for t, ev in later if ev.get("response_id") == response
            or ev.get("response", {}).get("id") == response]  # fmt: skip
    chunks = [(t, base64.b64decode(ev["delta"])) for t, ev in mine if ev["type"] == "response.audio.delta"]  # fmt: skip
    server = next((ev for _, ev in mine if ev["type"] == "turn.timings"), {})
    turn["reply"] = next((ev["text"] for _, ev in mine if ev["type"] == "response.text.done"), "")
    turn["server"] = server
    sound = first_sound(chunks)

    def ms(t: float | None) -> float | None:
        return None if t is None else round(1000 * (t - t_end), 1)

    first_token = server.get("first_token_ms")
    turn["stages"] = {
        "vad_end": round(stop["audio_end_ms"] - end_ms, 1),
        "endpoint": ms(t_stop),
        "asr_final": ms(t_final),
        "first_token": None if first_token is None else ms(t_stop + first_token / 1000),
        "first_tts_audio": ms(chunks[0][0]) if chunks else None,
        "first_sound": ms(sound),
    }
    if sound is not None:
        turn["voice_to_voice_ms"] = ms(sound)
        turn["first_audio_after_endpoint_ms"] = round(1000 * (sound - t_stop), 1)
    if chunks:  # the old measures: the first chunk, from the endpoint / the VAD's end
        turn["response_latency_ms"] = 1000 * (chunks[0][0] - stream.time_of_ms(stop["endpoint_ms"]))
        turn["turn_latency_ms"] = 1000 * (chunks[0][0] - stream.time_of_ms(stop["audio_end_ms"]))
    return turn


async def run_voice(url: str, clips: list[dict], token: str | None, policy: str) -> list[dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    turns: list[dict] = []
    silence = np.zeros(FRAME_SAMPLES, dtype=np.float32)
    if policy.startswith("predictive"):  # "predictive:64": complete_silence_ms=64
        settings = {"endpointing": "predictive"}
        if ":" in policy:
            settings["complete_silence_ms"] = float(policy.partition(":")[2])
    else:
        settings = {"endpointing": "fixed", "end_silence_ms": float(policy)}
    async with connect(url, additional_headers=headers, max_size=None) as ws:
        stream = Stream(ws)
        events: list[tuple[float, dict]] = []

        async def receive() -> None:
            async for message in ws:
                ev = json.loads(message)
                events.append((time.perf_counter(), ev))
                if ev["type"] == "error":
                    print(f"error event: {ev['error']}", file=sys.stderr)

        receiver = asyncio.create_task(receive())
        await ws.send(json.dumps({"type": "session.update", "session": {"moe2edge": settings}}))
        await stream.send(np.zeros(SAMPLE_RATE // 2, dtype=np.float32))
        for clip in clips:
            events.clear()
            start = stream.samples
            await stream.send(clip["audio"])
            end_ms = 1000 * (start + clip["end"]) / SAMPLE_RATE
            deadline = time.perf_counter() + 15
            while not turn_done(events, end_ms) and time.perf_counter() < deadline:
                await stream.send(silence)
            # the user waits for the reply to finish playing, then a breath, before the next
            # request (speaking earlier would barge in and cut the remembered reply)
            resume = min(deadline, reply_played_until(events) + GAP_S)  # all audio is in
            while time.perf_counter() < resume:  # by response.done
                await stream.send(silence)
            turn = analyse(clip, list(events), stream, start)
            turns.append(turn)
            print(json.dumps({"policy": policy, **{k: turn.get(k) for k in (
                "voice", "paused_text", "transcript", "reply", "cut_off", "voice_to_voice_ms")}}),
                file=sys.stderr)  # fmt: skip
        receiver.cancel()
    return turns


def chat(
    client: httpx.Client, messages: list[dict], max_tokens: int | None = None
) -> httpx.Response:
    """One greedy chat completion, waiting out the server's rate limit (429 Retry-After)."""
    body = {"messages": messages, "temperature": 0} | (
        {"max_tokens": max_tokens} if max_tokens else {}
    )
    while True:
        r = client.post("/v1/chat/completions", json=body)
        if r.status_code != 429:
            return r
        time.sleep(float(r.headers.get("Retry-After", "1")))


def text_accuracy(
    base: str,
    rows: list[dict],
    token: str | None,
    history_turns: int = 0,
    reserve: int | None = None,
) -> float:
    """Task accuracy of the typed requests over the chat API: each on its own
    (``history_turns=0``), or as one conversation in the spoken order after the last
    ``history_turns`` requests and the model's own replies (what a voice session holds).
    ``reserve``: the reply's room the voice session keeps (its max_new_tokens), asked as
    ``max_tokens``: the server refuses a prompt that leaves less (400), and the oldest turn
    is dropped until it fits, the voice session's own rule."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    hits, history = 0, []
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
        for row in rows:
            messages = history[len(history) - 2 * history_turns :] if history_turns else []
            messages = [*messages, {"role": "user", "content": row["utterance"]}]
            r = chat(client, messages, reserve)
            while r.status_code == 400 and len(messages) > 1:  # too long: drop the oldest turn,
                messages = messages[2:]  # as the voice session does
                r = chat(client, messages, reserve)
            r.raise_for_status()
            reply = r.json()["choices"][0]["message"]["content"]
            hits += same_actions(reply, row["action"])
            history += [messages[-1], {"role": "assistant", "content": reply}]
    return hits / len(rows)


def summarize(turns: list[dict]) -> dict:
    """One policy's numbers over its turns."""
    paused = [t for t in turns if t["paused_text"]]
    server = [t["server"] for t in turns if t.get("server")]
    heard = [t for t in turns if "voice_to_voice_ms" in t]
    return {
        "voice_to_voice_ms": pct([t["voice_to_voice_ms"] for t in heard]),
        "false_cutoff_rate": round(sum(t["cut_off"] for t in paused) / len(paused), 3) if paused else None,
        "false_cutoff_rate_all": round(sum(t["cut_off"] for t in turns) / len(turns), 3),
        "paused_turns": len(paused),
        "first_audio_after_endpoint_ms": pct([t["first_audio_after_endpoint_ms"] for t in heard]),
        "stages_ms": {k: pct([t["stages"][k] for t in turns if t.get("stages", {}).get(k) is not None])
                      for k in ("vad_end", "endpoint", "asr_final", "first_token", "first_tts_audio", "first_sound")},
        "response_latency_ms": pct([t["response_latency_ms"] for t in turns if "response_latency_ms" in t]),
        "turn_latency_ms": pct([t["turn_latency_ms"] for t in turns if "turn_latency_ms" in t]),
        "transcript_exact_match": round(sum(t["transcript"] == t["text"] for t in turns) / len(turns), 3),
        "wer": round(wer([t["text"] for t in turns], [t["transcript"] for t in turns]), 4),
        "reply_task_acc": round(sum(same_actions(t.get("reply") or "", t["action"]) for t in turns) / len(turns), 3),
        "reply_wellformed": round(sum(is_wellformed((t.get("reply") or "").strip()) for t in turns) / len(turns), 3),
        "turns": len(turns),
        "turns_with_audio": len(heard),
        "drafted_share": round(sum(bool(s.get("drafted")) for s in server) / max(1, len(server)), 3),
        "server_response_latency_ms": pct([s["response_latency_ms"] for s in server if s.get("response_latency_ms") is not None]),
        "server_first_token_ms": pct([s["first_token_ms"] for s in server if s.get("first_token_ms") is not None]),
    }  # fmt: skip


def synth_first_phrase_ms(tts_names: list[str], repeats: int = 5) -> dict:
    """Median in-process synthesis time of a reply's usual first phrase, per voice."""
    out = {}
    for name in tts_names:
        tts = synthesizer("piper" if name == "piper" else "en-us")
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            tts.synthesize("sure, the kitchen")
            times.append(1000 * (time.perf_counter() - started))
        out[name] = round(float(np.median(times)), 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--bundle", default=None, help="bundle to serve (default: runs/demo, else runs/demo_probe)"
    )
    p.add_argument("--grammar", default=None, help="JSGF grammar (default: beside the eval data)")
    p.add_argument("--eval", default=None, help="eval.jsonl with utterance/action rows")
    p.add_argument("--n", type=int, default=80, help="spoken requests (turns per policy)")
    p.add_argument("--voices", default=",".join(VOICES), help="espeak-ng voices and/or piper")
    p.add_argument("--policies", default=",".join(POLICIES),
                   help="predictive[:complete_silence_ms] and/or fixed ms")  # fmt: skip
    p.add_argument("--tts", default="piper,espeak", help="reply voices; the first runs every "
                   "policy, the others the predictive one")  # fmt: skip
    p.add_argument("--paused", type=float, default=0.3, help="share of utterances with a pause")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-draft", action="store_true", help="serve with speculate=false")
    p.add_argument("--url", default=None, help="use a running server (http://host:port)")
    p.add_argument("--token", default=os.environ.get("MOE2EDGE_TOKEN"))
    p.add_argument("--set", action="append", default=[], help="extra server key=value")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--sections", default="voice",
                   help="voice, text (its text controls only), noise and/or wake (comma list)")  # fmt: skip
    p.add_argument("--noise", default="20,10,5", help="SNRs (dB) for the noise and wake sections")
    p.add_argument("--noise-n", type=int, default=40, help="utterances per SNR per noise kind")
    p.add_argument("--wake-phrase", default="hey robot")
    p.add_argument("--wake-n", type=int, default=40, help="wake clips per SNR per noise kind")
    p.add_argument("--wake-minutes", type=float, default=30.0, help="non-wake speech (test)")
    p.add_argument("--wake-tune-minutes", type=float, default=30.0, help="non-wake (tuning)")
    p.add_argument("--wake-thresholds", default="1e-20,1e-30,1e-40,1e-50,1e-60,1e-70",
                   help="kws_threshold values tried on the tuning set")  # fmt: skip
    p.add_argument("--merge", default=str(ROOT / "bench/results/voice.json"),
                   help="merge the sections' keys into this JSON (others kept; '' to skip)")  # fmt: skip
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
    rows = [r for r in rows if r.get("kind") != "multi_turn"]
    sections = set(args.sections.split(","))
    result = run_voice_section(args, rows[: args.n]) if "voice" in sections else {}
    if "text" in sections and "voice" not in sections:
        result |= run_text_section(args, rows[: args.n])
    extra = {}
    if sections & {"noise", "wake"}:
        import _noise  # bench/_noise.py

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        extra = _noise.run_sections(args, rows, sections, data_dir, noise_scores)
    result |= extra
    text = json.dumps(result)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.merge:
        merge_results(Path(args.merge), result)
    print(text)


def run_voice_section(args, rows: list[dict]) -> dict:
    """The real-time WebSocket run (the original benchmark)."""
    voices, policies = args.voices.split(","), args.policies.split(",")
    tts_names = args.tts.split(",")
    rng = np.random.default_rng(args.seed)
    synth = {v: synthesizer(v) for v in voices}
    clips = []
    for i, r in enumerate(rows):
        voice, text = voices[i % len(voices)], r.get("spoken", r["utterance"])
        pause_ms = float(rng.uniform(300, 700)) if rng.random() < args.paused else 0.0
        clip = make_clip(synth[voice], text, pause_ms, rng)
        clips.append({**clip, "text": text, "action": r["action"], "voice": voice})

    started = time.time()
    runs: dict[str, dict[str, list[dict]]] = {}
    text_acc = None
    for n, tts in enumerate(tts_names):
        with serving(args, tts) as base:
            url = base.replace("http", "ws", 1) + "/v1/realtime"
            for policy in policies if n == 0 else ["predictive"]:
                runs.setdefault(tts, {})[policy] = asyncio.run(
                    run_voice(url, clips, args.token, policy)
                )
            if text_acc is None:
                text_acc, text_acc_history = text_controls(args, base, rows)
    elapsed = time.time() - started
    summary = {
        tts: {pol: summarize(turns) for pol, turns in by.items()} for tts, by in runs.items()
    }
    main_tts = tts_names[0]
    main = summary[main_tts].get("predictive") or next(iter(summary[main_tts].values()))
    result = {
        "voice_to_voice_ms": main["voice_to_voice_ms"],
        "false_cutoff_rate": main["false_cutoff_rate"],
        "false_cutoff_rate_all": main["false_cutoff_rate_all"],
        "baselines": {
            pol: {k: s[k] for k in ("voice_to_voice_ms", "false_cutoff_rate", "false_cutoff_rate_all")}
            for pol, s in summary[main_tts].items() if pol.isdigit()
        },
        "stages_ms": main["stages_ms"],
        "tts_first_audio_ms": {tts: s["predictive"]["first_audio_after_endpoint_ms"]
                               for tts, s in summary.items() if "predictive" in s},
        "voice_to_voice_by_tts_ms": {tts: s["predictive"]["voice_to_voice_ms"]
                                     for tts, s in summary.items() if "predictive" in s},
        "tts_synth_first_phrase_ms": synth_first_phrase_ms(tts_names),
        # the old fields, for comparison (predictive policy, first TTS)
        **{k: main[k] for k in ("response_latency_ms", "turn_latency_ms", "transcript_exact_match",
                                "wer", "reply_task_acc", "reply_wellformed", "turns",
                                "turns_with_audio", "drafted_share", "server_response_latency_ms",
                                "server_first_token_ms")},
        "text_task_acc": round(text_acc, 3),
        "history_turns": history_turns(args),
        "text_task_acc_in_conversation": round(text_acc_history, 3),
        "reply_tts": main_tts,
        "voices": voices,
        "paused_share": args.paused,
        "policies": summary,
        "draft": not args.no_draft,
        "bundle": args.bundle,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "seconds": round(elapsed, 1),
    }  # fmt: skip
    return result


def text_controls(args, base: str, rows: list[dict]) -> tuple[float, float]:
    """The typed requests one by one, and as one conversation under the voice session's
    history rule (its history_turns, its reply room)."""
    reserve = reply_room(args)
    return (text_accuracy(base, rows, args.token, 0, reserve),
            text_accuracy(base, rows, args.token, history_turns(args), reserve))  # fmt: skip


def run_text_section(args, rows: list[dict]) -> dict:
    """Only the text controls (``--sections text``)."""
    with serving(args, "espeak") as base:
        acc, acc_history = text_controls(args, base, rows)
    return {"text_task_acc": round(acc, 3), "text_task_acc_in_conversation": round(acc_history, 3),
            "history_turns": history_turns(args), "text_reply_room": reply_room(args)}  # fmt: skip


def reply_room(args) -> int:
    """The tokens a voice session keeps free for its reply (``voice_max_new_tokens``, else
    the bundle's max_new_tokens: runtime/server/voice_resources.py)."""
    given = [kv.partition("=")[2] for kv in args.set if kv.startswith("voice_max_new_tokens=")]
    if given and given[-1] not in ("", "null", "None"):
        return int(given[-1])
    return int(read_manifest(args.bundle)["generation"].get("max_new_tokens", 64))


def history_turns(args) -> int:
    """The finished turns the voice session's prompts include (the server's setting)."""
    from moe2edge.runtime.server.config import ServerConfig

    given = [kv.partition("=")[2] for kv in args.set if kv.startswith("voice_history_turns=")]
    return int(given[-1]) if given else ServerConfig.model_fields["voice_history_turns"].default


def merge_results(path: Path, keys: dict) -> None:
    """Write ``keys`` into the JSON at ``path``, keeping its other keys (atomic)."""
    from moe2edge.fileio import atomic_write_json

    merged = json.loads(path.read_text()) if path.is_file() else {}
    atomic_write_json(path, merged | keys, indent=1)


def noise_scores(turns: list[dict]) -> dict:
    """WER and reply task accuracy, as summarize() scores clean speech."""
    return {
        "wer": round(wer([t["text"] for t in turns], [t["transcript"] for t in turns]), 4),
        "reply_task_acc": round(sum(same_actions(t["reply"], t["action"]) for t in turns) / len(turns), 3),
    }  # fmt: skip


if __name__ == "__main__":
    main()
