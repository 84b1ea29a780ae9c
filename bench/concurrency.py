"""Concurrent streams through the real HTTP server: aggregate tokens/s and p95 inter-token
latency at 1, 2, 4, 8 streams (``bench/runtime.py``'s ``concurrency`` section).

For each number of streams S, ``moe2edge serve BUNDLE --slots S`` runs in its own process
(the service's batching loop: one row per stream), and S streaming chat completions run at
once from this process (one asyncio loop, httpx), ``--rounds`` times in a row. A stream's
inter-token latency is the gap between two of its content chunks as the client reads them;
the aggregate rate is every stream's completion tokens (``usage``) over the wall time from
the first request to the last reply.

    python bench/concurrency.py BUNDLE --streams 1,2,4,8 --new-tokens 64 [--speculate ngram]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _served import free_port, wait_healthy  # bench/_served.py (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "turn on the kitchen lights and dim the office lights to forty percent"


def start_server(
    bundle: Path, slots: int, threads: int, speculate: str = "off"
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "moe2edge.cli", "serve", str(bundle), "--port", str(port),
        "--no-voice", "--slots", str(slots), "--queue", str(slots), "--threads", str(threads),
        "--log-level", "warning", "--set", f"max_new_tokens_limit={1 << 16}",
        "--set", "rate_limit_rps=0",  # one client standing in for many users
        "--speculate", speculate,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, lambda: proc.stderr.read().decode()[-2000:] if proc.poll() else "")
    return proc, url


async def one_stream(client, url: str, new_tokens: int) -> tuple[int, list[float]]:
    """(completion tokens, gaps in seconds between content chunks) of one streaming reply."""
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": new_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    gaps, last, tokens = [], None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
    return tokens, gaps


async def run_streams(url: str, streams: int, new_tokens: int, rounds: int) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        await one_stream(client, url, 4)  # warm-up
        started = time.perf_counter()
        results = await asyncio.gather(
            *[_rounds(client, url, new_tokens, rounds) for _ in range(streams)]
        )
        wall = time.perf_counter() - started
    tokens = sum(t for stream in results for t, _ in stream)
    gaps = [g for stream in results for _, gs in stream for g in gs]
    return {
        "aggregate_tok_s": round(tokens / wall, 2),
        "p95_itl_ms": round(float(np.percentile(gaps, 95)) * 1000, 2) if gaps else None,
        "median_itl_ms": round(float(np.median(gaps)) * 1000, 2) if gaps else None,
        "tokens": tokens,
        "wall_s": round(wall, 2),
    }


async def _rounds(client, url: str, new_tokens: int, rounds: int) -> list:
    return [await one_stream(client, url, new_tokens) for _ in range(rounds)]


def measure(
    bundle: Path,
    streams: list[int],
    new_tokens: int,
    rounds: int = 2,
    threads: int = 1,
    speculate: str = "off",
) -> dict[str, dict]:
    """{streams: {aggregate_tok_s, p95_itl_ms, ...}}, a fresh server for each count;
    ``speculate``: the server's speculative decoding (off, ngram)."""
    out, bundle = {}, Path(bundle)
    for n in streams:
        proc, url = start_server(bundle, n, threads, speculate)
        try:
            out[str(n)] = asyncio.run(run_streams(url, n, new_tokens, rounds))
        finally:
            proc.terminate()
            proc.wait(30)
        print(f"concurrency {bundle.name} x{n}: {out[str(n)]}", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--streams", default="1,2,4,8")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="replies per stream, in a row")
    parser.add_argument("--threads", type=int, default=1, help="the server's ORT threads")
    parser.add_argument("--speculate", default="off", choices=["off", "ngram"])
    args = parser.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    result = measure(
        Path(args.bundle), streams, args.new_tokens, args.rounds, args.threads, args.speculate
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
