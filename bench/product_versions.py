"""The ``versions`` section of the product benchmark: the A/B split and a hot swap under load.

One ``moe2edge serve`` process (its own process, as deployed) serves three tiny random
models made here (one tokenizer, seeds 0, 1, 2; fast FP32 bundles, so the routing and the
swap are what is measured): ``a`` and ``b`` at weights 90:10 behind the alias ``home``.

1. Split: ``--requests`` chat completions (one token each), each with its own session key
   (OpenAI ``user``), ``--concurrency`` at a time: the share each version served. Then
   ``--sticky`` of those sessions again (by ``X-Session-Id`` this time): a violation is one
   answered by another version than the first time.
2. Swap: ``--streams`` clients stream chat completions to ``home`` back to back (SSE, raw
   httpx) while the admin API loads ``c`` at weight 90 (it takes new requests once warm)
   and then at once retires ``a`` (no new requests; the streams it is serving finish; then
   it is freed): a's share moves to c with a's streams in flight. ``--swaps`` rounds: c
   replaces a, then a (loaded again) replaces c, and so on. A stream is
   dropped without a 200, its ``[DONE]`` or with an error event; corrupted when its text is
   not the greedy reply of the version that served it (computed in this process from the
   bundle, ``Generator.generate``).

    python bench/product_versions.py [--requests 1000] [--streams 6]

Prints JSON, writes bench/results/product_versions.json; ``run(args)`` returns the same
dict (``bench/product.py`` calls it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _served import free_port, wait_healthy  # noqa: E402  (bench/_served.py)
from machine import cpu_name  # noqa: E402  (bench/machine.py)

PROMPTS = ["turn on the kitchen lights", "dim the office lights to forty percent", "hello"]
TOKEN = "bench-versions"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def tiny_bundles(root: Path, seeds: dict[str, int]) -> dict[str, Path]:
    """One demo tokenizer, one random tiny student per seed, each an FP32 bundle."""
    import torch

    from moe2edge.distill.demo_data import write_demo_data
    from moe2edge.distill.pipeline import make_tokenizer
    from moe2edge.distill.student import build_student
    from moe2edge.distill.tokenizer import load_tokenizer, special_token_ids
    from moe2edge.export.onnx_export import export_fp32

    torch.set_num_threads(1)
    paths = write_demo_data(root / "data", seed=1, train_size=300, eval_size=4)
    make_tokenizer(paths["train"], root / "tokenizer", vocab_size=448)
    tokenizer = load_tokenizer(root / "tokenizer")
    out = {}
    for name, seed in seeds.items():
        student = build_student(
            "tiny", vocab_size=len(tokenizer), seed=seed, **special_token_ids(tokenizer)
        )
        student.save_pretrained(root / name / "student")
        tokenizer.save_pretrained(root / name / "student")
        out[name] = export_fp32(root / name / "student", root / name / "bundle", max_new_tokens=64)
    return out


def start_server(bundles: dict[str, Path], slots: int, queue: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "moe2edge.cli", "serve", str(bundles["a"]), "--port", str(port),
        "--no-voice", "--token", TOKEN, "--slots", str(slots), "--queue", str(queue),
        "--threads", "1", "--log-level", "warning", "--set", "model_name=home",
        "--set", "rate_limit_rps=0",  # one client sends all 1000 requests: no per-client limit
        "--version-name", "a:90", "--version", f"b={bundles['b']}:10",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, lambda: proc.stderr.read().decode()[-2000:] if proc.poll() else "")
    return proc, url


async def split_phase(url: str, requests: int, sticky: int, concurrency: int) -> dict:
    import httpx

    limit = asyncio.Semaphore(concurrency)

    async def ask(client, key: str, by_header: bool) -> str:
        body = {"model": "home", "max_tokens": 1,
                "messages": [{"role": "user", "content": PROMPTS[0]}]}  # fmt: skip
        headers = dict(HEADERS)
        if by_header:
            headers["X-Session-Id"] = key
        else:
            body["user"] = key
        async with limit:
            r = await client.post(url + "/v1/chat/completions", json=body, headers=headers)
        r.raise_for_status()
        return r.json()["model"]

    keys = [f"session-{i:05d}" for i in range(requests)]
    async with httpx.AsyncClient(timeout=60) as client:
        started = time.perf_counter()
        first = await asyncio.gather(*(ask(client, k, False) for k in keys))
        seconds = time.perf_counter() - started
        again = await asyncio.gather(*(ask(client, k, True) for k in keys[:sticky]))
    counts = {name: first.count(name) for name in sorted(set(first))}
    return {
        "requests": requests,
        "split_configured": {"a": 0.9, "b": 0.1},
        "split_observed": {name: n / requests for name, n in counts.items()},
        "split_counts": counts,
        "sticky_checked": sticky,
        "sticky_violations": sum(a != b for a, b in zip(first, again, strict=False)),
        "split_requests_per_s": round(requests / seconds, 1),
    }


async def one_stream(client, url: str, key: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": "home", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "stream": True, "user": key}  # fmt: skip
    out = {"prompt": prompt, "model": None, "text": "", "finish": None, "done": False,
           "errors": [], "status": None, "started": time.perf_counter()}  # fmt: skip
    try:
        async with client.stream(
            "POST", url + "/v1/chat/completions", json=body, headers=HEADERS
        ) as r:
            out["status"] = r.status_code
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out["done"] = True
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    out["errors"].append(event["error"])
                    continue
                out["model"] = event["model"]
                choice = event["choices"][0]
                out["text"] += choice["delta"].get("content") or ""
                out["finish"] = choice["finish_reason"] or out["finish"]
    except Exception as exc:  # a dropped connection counts as a dropped stream
        out["errors"].append({"message": f"{type(exc).__name__}: {exc}"})
    out["ended"] = time.perf_counter()
    return out


async def swap_phase(
    url: str, bundles: dict[str, Path], streams: int, max_tokens: int, swaps: int
) -> dict:
    import httpx

    results: list[dict] = []
    stop = asyncio.Event()

    async def client_loop(client, i: int) -> None:
        n = 0
        while not stop.is_set():
            prompt = PROMPTS[(i + n) % len(PROMPTS)]
            results.append(await one_stream(client, url, f"swap-{i}-{n}", prompt, max_tokens))
            n += 1

    swaps_done: list[dict] = []
    async with (
        httpx.AsyncClient(timeout=120) as client,
        httpx.AsyncClient(base_url=url, headers=HEADERS, timeout=300) as admin,
    ):
        tasks = [asyncio.create_task(client_loop(client, i)) for i in range(streams)]
        await asyncio.sleep(1.0)
        old = "a"
        for _ in range(swaps):  # a -> c -> a -> ...: a retired name may be loaded again
            new = "c" if old == "a" else "a"
            t0 = time.perf_counter()
            body = {"name": new, "bundle": str(bundles[new]), "weight": 90}
            (await admin.post("/admin/versions", json=body)).raise_for_status()
            load_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            r = await admin.delete(f"/admin/versions/{old}")
            r.raise_for_status()
            while True:
                listed = (await admin.get("/admin/versions")).json()
                if {v["name"]: v["state"] for v in listed["versions"]}[old] == "retired":
                    break
                await asyncio.sleep(0.02)
            swaps_done.append({"loaded": new, "retired": old, "load_s": round(load_s, 3),
                               "in_flight_at_retire": r.json()["in_flight"],
                               "drain_s": round(time.perf_counter() - t0, 3),
                               "retire_called": t0})  # fmt: skip
            old = new
            await asyncio.sleep(0.7)
        stop.set()
        await asyncio.gather(*tasks)
        final = (await admin.get("/admin/versions")).json()

    expected = expected_texts(bundles, max_tokens)
    dropped = [r for r in results if r["status"] != 200 or not r["done"] or r["errors"]]
    corrupted = [
        r for r in results if r not in dropped and (
            r["model"] not in expected or r["text"] != expected[r["model"]][r["prompt"]]
            or r["finish"] not in ("stop", "length"))
    ]  # fmt: skip
    by_version = {n: sum(r["model"] == n for r in results) for n in ("a", "b", "c")}
    # streams of the retired version still running when its retire was called
    cut_candidates = sum(
        r["model"] == sw["retired"] and r["started"] < sw["retire_called"] < r["ended"]
        for sw in swaps_done
        for r in results
    )
    for sw in swaps_done:
        del sw["retire_called"]
    return {
        "streams_during_swap": len(results),
        "streams_by_version": by_version,
        "streams_running_on_the_retired_version_at_retire": cut_candidates,
        "dropped_streams_during_swap": len(dropped),
        "corrupted_streams_during_swap": len(corrupted),
        "failures": [
            {k: r[k] for k in ("model", "prompt", "text", "finish", "errors")}
            for r in (dropped + corrupted)[:5]
        ],  # fmt: skip
        "concurrent_clients": streams,
        "max_tokens": max_tokens,
        "swaps": swaps_done,
        "final_split": final["split"],
    }


def expected_texts(bundles: dict[str, Path], max_tokens: int) -> dict[str, dict[str, str]]:
    from moe2edge.runtime import Generator, SamplingParams

    out = {}
    for name, bundle in bundles.items():
        gen = Generator.from_bundle(bundle, threads=1)
        params = SamplingParams(max_new_tokens=max_tokens)
        out[name] = {}
        for p in PROMPTS:  # (one user message renders as generate's prompt does)
            out[name][p] = gen.generate(p, params).text
    return out


def run(args: argparse.Namespace) -> dict:
    requests = getattr(args, "requests", 1000)
    sticky = getattr(args, "sticky", 200)
    concurrency = getattr(args, "concurrency", 8)
    streams = getattr(args, "streams", 6)
    max_tokens = getattr(args, "max_tokens", 48)
    swaps = getattr(args, "swaps", 3)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_versions_") as tmp:
        bundles = tiny_bundles(Path(tmp), {"a": 0, "b": 1, "c": 2})
        proc, url = start_server(bundles, slots=4, queue=256)
        try:
            split = asyncio.run(split_phase(url, requests, sticky, concurrency))
            swap = asyncio.run(swap_phase(url, bundles, streams, max_tokens, swaps))
        finally:
            proc.terminate()
            proc.wait(30)
    return {
        **split,
        **swap,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "ort_threads": 1},
        "server": {"slots": 4, "queue": 256, "process": "moe2edge serve (separate process)"},
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1000, help="split: requests (sessions)")
    p.add_argument("--sticky", type=int, default=200, help="split: sessions asked again")
    p.add_argument("--concurrency", type=int, default=8, help="split: requests at once")
    p.add_argument("--streams", type=int, default=6, help="swap: concurrent stream clients")
    p.add_argument("--max-tokens", type=int, default=48, help="swap: tokens per stream")
    p.add_argument("--swaps", type=int, default=3, help="swap: load + retire rounds")
    p.add_argument("--out", default=str(ROOT / "bench/results/product_versions.json"))
    args = p.parse_args()
    result = run(args)
    from moe2edge.fileio import atomic_write_json

    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
