"""``moe2edge bench BUNDLE``: the standard benchmark of a bundle on this device.

Four sections, written as ``bench.json`` and ``bench.md`` (docs/profiler.md):

* **ttft**: prompt in -> first token, in this process (``Generator.stream``), per prompt
  and round; p50 / p95.
* **decode**: tokens/s of a fixed-length reply (``ignore_eos``), batch 1.
* **concurrency**: a real ``moe2edge serve`` on 127.0.0.1 (its own process, ``--slots``
  = the most streams) and S streaming chat completions at once from threads here:
  aggregate completion tokens/s, time to first chunk and the gap between chunks.
* **voice**: the stages after the end of speech, each measured here (the WebSocket path
  end to end is ``bench/voice.py``): pocketsphinx's final result after the utterance's last
  frame, TTFT of the transcript, espeak-ng's first phrase of the reply; skipped, with the
  reason, where espeak-ng or pocketsphinx is missing.

Short by default (a few seconds on a small bundle); ``--rounds`` and ``--new-tokens`` for more.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from moe2edge.fileio import atomic_write
from moe2edge.jetson.errors import JetsonError

log = logging.getLogger(__name__)

PROMPTS = [
    "turn on the kitchen lights",
    "dim the office lights to forty percent",
    "set the bedroom thermostat to twenty degrees",
]


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` (nearest rank); 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": pct(values, 0.5), "p95": pct(values, 0.95), "n": len(values)}


def ttft_and_decode(gen, rounds: int, new_tokens: int) -> tuple[dict, dict]:
    from moe2edge.runtime.generate import GenerationResult
    from moe2edge.runtime.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    ttft, rates = [], []
    for prompt in PROMPTS:  # warm-up: allocations, first-run graph work
        for _ in gen.stream(gen.encode_prompt(prompt), SamplingParams(max_new_tokens=2)):
            pass
    for _ in range(rounds):
        for prompt in PROMPTS:
            result = GenerationResult()
            for _ in gen.stream(gen.encode_prompt(prompt), params, result=result):
                pass
            ttft.append(result.ttft_ms)
            rates.append(result.decode_tok_s)
    return {"ms": summary(ttft)}, {"tok_s": summary(rates), "new_tokens": new_tokens}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, slots: int, threads: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "moe2edge.cli", "serve", str(bundle), "max_new_tokens_limit=4096",
        "rate_limit_rps=0",  # the benchmark is one client standing in for many users
        "--host", "127.0.0.1", "--port", str(port), "--no-voice", "--slots", str(slots),
        "--queue", str(slots), "--threads", str(threads), "--log-level", "warning",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "MOE2EDGE_TOKEN"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
            raise JetsonError(f"moe2edge serve exited with {proc.returncode}: {err}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return proc, port
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise JetsonError("moe2edge serve did not answer /health within 120 s") from None
            time.sleep(0.2)


def one_stream(port: int, prompt: str, new_tokens: int, out: dict) -> None:
    """One streaming chat completion: first-chunk time, chunk gaps, completion tokens."""
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": new_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    started, last, gaps, tokens = time.perf_counter(), None, [], 0
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        out["error"] = f"HTTP {resp.status}: {resp.read()[:300]!r}"
        return
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: {"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = int(chunk["usage"]["completion_tokens"])
        if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
            now = time.perf_counter()
            if last is None:
                out["first_chunk_ms"] = (now - started) * 1e3
            else:
                gaps.append((now - last) * 1e3)
            last = now
    conn.close()
    out.update(tokens=tokens, gaps_ms=gaps)


def concurrency(bundle: Path, streams: list[int], new_tokens: int, threads: int) -> dict:
    proc, port = start_server(bundle, max(streams), threads)
    try:
        rows = []
        for n in [1, *streams]:  # the first 1 warms the server up
            outs: list[dict] = [{} for _ in range(n)]
            workers = [
                threading.Thread(target=one_stream, args=(port, PROMPTS[i % 3], new_tokens, o))
                for i, o in enumerate(outs)
            ]
            started = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            wall = time.perf_counter() - started
            errors = [o["error"] for o in outs if "error" in o]
            if errors:
                raise JetsonError(f"the server refused a stream: {errors[0]}")
            tokens = sum(o["tokens"] for o in outs)
            rows.append(
                {
                    "streams": n,
                    "aggregate_tok_s": round(tokens / wall, 1),
                    "completion_tokens": tokens,
                    "first_chunk_ms": summary(
                        [o["first_chunk_ms"] for o in outs if "first_chunk_ms" in o]
                    ),
                    "chunk_gap_ms": summary([g for o in outs for g in o["gaps_ms"]]),
                }
            )
        return {
            "rows": rows[1:],
            "server": f"moe2edge serve --slots {max(streams)} --threads {threads}",
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def voice(gen, grammar: str | None) -> dict:
    """ASR final, TTFT of the transcript and TTS first phrase, each measured here."""
    try:
        from moe2edge.runtime.voice.asr import make_recognizer
        from moe2edge.runtime.voice.tts import EspeakSynthesizer
    except ImportError as exc:
        return {"skipped": f"the voice extra is not installed ({exc.name})"}
    try:
        tts = EspeakSynthesizer()
        recognizer = make_recognizer(
            "pocketsphinx", **({"grammar_path": grammar} if grammar else {})
        )
    except (ImportError, OSError, RuntimeError, FileNotFoundError) as exc:
        return {"skipped": f"voice components unavailable: {exc}"}
    from moe2edge.runtime.generate import GenerationResult
    from moe2edge.runtime.sampling import SamplingParams

    asr, first, synth, transcripts = [], [], [], []
    for prompt in PROMPTS:
        audio = tts.synthesize(prompt)
        recognizer.start_utterance()
        frame = 320  # 20 ms at 16 kHz, as a microphone streams
        for i in range(0, len(audio), frame):
            recognizer.feed(audio[i : i + frame])
        started = time.perf_counter()
        text = recognizer.finish()
        asr.append((time.perf_counter() - started) * 1e3)
        transcripts.append(text)
        result = GenerationResult()
        for _ in gen.stream(
            gen.encode_prompt(text or prompt), SamplingParams(max_new_tokens=8), result=result
        ):
            pass
        first.append(result.ttft_ms)
        started = time.perf_counter()
        tts.synthesize(" ".join((result.text or "okay").split()[:6]) or "okay")
        synth.append((time.perf_counter() - started) * 1e3)
    total = [a + f + s for a, f, s in zip(asr, first, synth, strict=True)]
    return {
        "asr_final_ms": summary(asr),
        "ttft_ms": summary(first),
        "tts_first_phrase_ms": summary(synth),
        "end_of_speech_to_first_audio_ms": summary(total),
        "transcripts": transcripts,
        "note": "stages measured in this process; bench/voice.py measures the WebSocket path",
    }


def run_suite(
    bundle: str | Path,
    out_dir: str | Path,
    rounds: int = 2,
    new_tokens: int = 32,
    streams: tuple[int, ...] = (1, 4),
    threads: int = 1,
    grammar: str | None = None,
    sections: tuple[str, ...] = ("ttft", "decode", "concurrency", "voice"),
) -> dict[str, Any]:
    """Run the sections and write ``bench.json`` and ``bench.md`` into ``out_dir``."""
    from moe2edge.runtime.errors import RuntimeUserError
    from moe2edge.runtime.generate import Generator

    bundle, out_dir = Path(bundle), Path(out_dir)
    if not 1 <= rounds <= 100 or not 1 <= new_tokens <= 4096 or not streams:
        raise JetsonError(
            "need rounds in 1..100, new_tokens in 1..4096 and at least one stream count"
        )
    try:
        gen = Generator.from_bundle(bundle, threads=threads)
    except RuntimeUserError as exc:
        raise JetsonError(f"cannot benchmark {bundle}: {exc}") from exc
    out: dict[str, Any] = {
        "bundle": str(bundle),
        "precision": gen.engine.manifest.get("precision", {}).get("weights"),
        "threads": threads,
        "cpu_count": os.cpu_count(),
    }
    started = time.perf_counter()
    if "ttft" in sections or "decode" in sections:
        out["ttft"], out["decode"] = ttft_and_decode(gen, rounds, new_tokens)
    if "concurrency" in sections:
        out["concurrency"] = concurrency(bundle, sorted(set(streams)), new_tokens, threads)
    if "voice" in sections:
        out["voice"] = voice(gen, grammar)
    out["seconds"] = round(time.perf_counter() - started, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "bench.json", json.dumps(out, indent=2) + "\n")
    atomic_write(out_dir / "bench.md", markdown(out))
    out["files"] = [str(out_dir / "bench.json"), str(out_dir / "bench.md")]
    return out


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# moe2edge bench: {r['bundle']}",
        "",
        f"{r['precision']}, {r['threads']} threads",
        "",
    ]
    lines += ["| measure | p50 | p95 | n |", "|---|---:|---:|---:|"]
    rows = []
    if "ttft" in r:
        rows += [("TTFT (ms)", r["ttft"]["ms"]), ("decode (tok/s)", r["decode"]["tok_s"])]
    voice_r = r.get("voice", {})
    for key in (
        "asr_final_ms",
        "ttft_ms",
        "tts_first_phrase_ms",
        "end_of_speech_to_first_audio_ms",
    ):
        if key in voice_r:
            rows.append((f"voice {key}", voice_r[key]))
    lines += [f"| {name} | {s['p50']} | {s['p95']} | {s['n']} |" for name, s in rows]
    if "skipped" in voice_r:
        lines += ["", f"voice: skipped ({voice_r['skipped']})"]
    if "concurrency" in r:
        lines += [
            "",
            "| streams | tok/s in all | first chunk p50 ms | chunk gap p95 ms |",
            "|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {c['streams']} | {c['aggregate_tok_s']} | {c['first_chunk_ms']['p50']} | {c['chunk_gap_ms']['p95']} |"
            for c in r["concurrency"]["rows"]
        ]
    return "\n".join(lines) + "\n"


def register(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=help_text)
    p.add_argument("bundle", help="bundle directory (holds manifest.json)")
    p.add_argument("--out", help="output folder (default: runs/bench/BUNDLE_NAME)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--streams", default="1,4", help="concurrent streams, comma-separated")
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (the service's 1)")
    p.add_argument("--grammar", help="JSGF grammar for the voice section's recognizer")
    p.add_argument(
        "--sections", default="ttft,decode,concurrency,voice", help="comma-separated subset"
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        streams = tuple(int(s) for s in args.streams.split(",") if s.strip())
    except ValueError:
        raise JetsonError(
            f"--streams takes comma-separated integers, not {args.streams!r}"
        ) from None
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = set(sections) - {"ttft", "decode", "concurrency", "voice"}
    if unknown:
        raise JetsonError(
            f"unknown --sections {sorted(unknown)}; use ttft, decode, concurrency, voice"
        )
    out = Path(args.out) if args.out else Path("runs") / "bench" / Path(args.bundle).resolve().name
    result = run_suite(
        args.bundle,
        out,
        args.rounds,
        args.new_tokens,
        streams,
        args.threads,
        args.grammar,
        sections,
    )
    print(markdown(result), end="")
    print(f"wrote {', '.join(result['files'])}")
    return 0
