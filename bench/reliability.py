"""Reliability benchmark: the service tried as an outsider would, as a whole.

One run, each part against a real ``moe2edge serve`` process on 127.0.0.1 (the tiny test
bundle unless --bundle is given: the service is measured, not the model):

- http_fuzz {cases, server_errors}: schemathesis over the server's own /openapi.json, every
  operation, data that fits the schema and data that does not; a 5xx is a server error;
- ws_fuzz {sequences, abnormal_closes, server_errors}: hypothesis-made voice WebSocket event
  sequences (wrong types, NaN/Infinity, huge values, binary garbage, wrong sample rates,
  out-of-order events, speech, graceful and abrupt closes), each ended by a probe the
  server must still answer;
- soak {seconds, requests, rss_growth_pct, leaked_threads, slots_after}: mixed load
  (bench/_soak.py) with RSS, threads, open files and slot counters sampled throughout;
  growth is measured between idle moments after a warm-up and at the end;
- faults, disk_full, corruption: bench/reliability_artifacts.py when present;
- security {checks, failed}: bench/_security.py (tokens, Origin, CORS, rate limit, control
  tokens per chat template, field limits).

    python bench/reliability.py                       # the run of record (10-minute soak)
    python bench/reliability.py --http-cases 1000 --ws-sequences 300 --soak-seconds 60
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# bench/ last: its gguf.py (the llama.cpp benchmark) must not shadow the gguf package
sys.path.append(str(Path(__file__).resolve().parent))

from _served import Served  # noqa: E402
from machine import cpu_name  # noqa: E402

from moe2edge.fileio import atomic_write  # noqa: E402

log = logging.getLogger("reliability")
SPOKEN = ["turn on the kitchen lights", "lock the garage door", "stop"]


def speech_clips() -> list[bytes]:
    """espeak-ng speech (16 kHz PCM16) with silence around it, as a microphone sends it."""
    import numpy as np

    from moe2edge.runtime.voice import SAMPLE_RATE, EspeakSynthesizer, float32_to_pcm16

    tts, pad = EspeakSynthesizer(), np.zeros(int(0.3 * SAMPLE_RATE), np.float32)
    return [float32_to_pcm16(np.concatenate([pad, tts.synthesize(t), pad])) for t in SPOKEN]


def fuzz(paths: dict, work: Path, http_cases: int, ws_sequences: int, seed: int) -> dict:
    from _fuzz import http_fuzz, ws_fuzz

    settings = dict(rate_limit_rps=0, max_voice_sessions=8)  # the fuzzers are one client
    with Served(paths["bundle"], work / "fuzz.log", paths["grammar"], **settings) as srv:
        http = http_fuzz(srv.url, http_cases, seed)
        crashes = srv.crashes()
        ws = ws_fuzz(srv.ws_url, ws_sequences, speech_clips(), seed, concurrency=4)
        ws["server_errors"] += srv.crashes() - crashes
        http["server_errors"] += crashes
        http["server_alive"] = ws["server_alive"] = srv.alive()
        ws["slots_after"] = _slots_settled(srv)
    return {"http_fuzz": http, "ws_fuzz": ws}


def _slots_settled(srv: Served, timeout_s: float = 10.0) -> int:
    """Slots in use or queued once the last clients' replies have wound down (a reply
    cancelled by its socket's close gives its slot back at its next step): a leaked slot
    stays counted."""
    deadline = time.monotonic() + timeout_s
    while True:
        health = srv.health()
        busy = health["active"] + health["queued"]
        if busy == 0 or time.monotonic() > deadline:
            return busy
        time.sleep(0.2)


def soak(paths: dict, work: Path, seconds: float) -> dict:
    from _soak import Soak

    settings = dict(rate_limit_rps=500, rate_limit_burst=500, queue=4, slots=2)
    with Served(paths["bundle"], work / "soak.log", paths["grammar"], **settings) as srv:
        warmup = min(120.0, max(10.0, seconds / 5))  # the prefix cache and ORT arenas fill
        result = Soak(srv, speech_clips(), seconds, warmup).run()
    return result


def security(paths: dict, work: Path) -> dict:
    import _security as sec

    from moe2edge.runtime import Generator

    results: list[dict] = []
    sec.control_token_checks(results, Generator.from_bundle(paths["bundle"], threads=1))
    sec.field_limit_checks(results)
    with Served(paths["bundle"], work / "security.log", paths["grammar"], token=sec.TOKEN) as srv:
        sec.server_checks(results, srv)
    kiosk = '["http://kiosk.local"]'
    settings = dict(ws_origins=kiosk, cors_origins=kiosk, rate_limit_rps=2, rate_limit_burst=5)
    with Served(paths["bundle"], work / "security2.log", paths["grammar"], **settings) as srv:
        sec.configured_checks(results, srv)
    failed = [r["check"] for r in results if not r["passed"]]
    return {"checks": len(results), "failed": len(failed), "failed_checks": failed,
            "results": results}  # fmt: skip


def artifacts(faults_trials: int, disk_trials: int, mutations: int) -> dict:
    """bench/reliability_artifacts.py's sections (faults, disk full, corruption)."""
    try:
        import reliability_artifacts as ra
    except ImportError as exc:
        missing = {"error": f"bench/reliability_artifacts.py is not here ({exc})"}
        return {"faults": missing, "disk_full": missing, "corruption": missing}
    out = {}
    for key, call in (("faults", lambda: ra.faults(faults_trials)),
                      ("disk_full", lambda: ra.disk_full(disk_trials)),
                      ("corruption", lambda: ra.corruption(mutations))):  # fmt: skip
        try:
            out[key] = call()
        except Exception as exc:  # noqa: BLE001 (reported, the other sections go on)
            log.exception("%s failed", key)
            out[key] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def run(args: argparse.Namespace) -> dict:
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        work = Path(tmp)
        if args.bundle:
            paths = {"bundle": Path(args.bundle), "grammar": args.grammar and Path(args.grammar)}
        else:
            from _tiny_bundle import build_tiny_bundle

            paths = build_tiny_bundle(args.work or work / "tiny")
        out: dict = {}
        if "fuzz" in args.parts:
            out.update(fuzz(paths, work, args.http_cases, args.ws_sequences, args.seed))
        if "soak" in args.parts:
            out["soak"] = soak(paths, work, args.soak_seconds)
        if "artifacts" in args.parts:
            out.update(artifacts(args.fault_trials, args.disk_trials, args.mutations))
        if "security" in args.parts:
            out["security"] = security(paths, work)
    out["machine"] = {"cpu": cpu_name(), "cores": os.cpu_count(), "server_threads": 1}
    out["seconds"] = round(time.time() - started, 1)
    return out


def summary(out: dict) -> dict:
    """The keys the issue names, from the full result."""
    pick = {
        "http_fuzz": ("cases", "server_errors"),
        "ws_fuzz": ("sequences", "abnormal_closes", "server_errors"),
        "soak": ("seconds", "requests", "rss_growth_pct", "leaked_threads", "slots_after"),
        "faults": ("trials", "corrupt_loaded"),
        "disk_full": ("trials", "corrupt_left"),
        "corruption": ("mutations", "refused", "tracebacks"),
        "security": ("checks", "failed"),
    }
    return {
        k: {f: out[k].get(f) for f in fields} if "error" not in out[k] else out[k]
        for k, fields in pick.items()
        if k in out
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bundle", help="bundle to serve (default: the tiny test bundle, built)")
    p.add_argument("--grammar", help="JSGF grammar for --bundle")
    p.add_argument("--work", help="where to build/keep the tiny bundle (default: a temp dir)")
    p.add_argument("--http-cases", type=int, default=10_000)
    p.add_argument("--ws-sequences", type=int, default=5_000)
    p.add_argument("--soak-seconds", type=float, default=600.0)
    p.add_argument("--fault-trials", type=int, default=50)
    p.add_argument("--disk-trials", type=int, default=20)
    p.add_argument("--mutations", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", nargs="+", default=["fuzz", "soak", "artifacts", "security"],
                   choices=["fuzz", "soak", "artifacts", "security"])  # fmt: skip
    p.add_argument("--json", default=str(ROOT / "bench/results/reliability.json"),
                   help="'' : print only")  # fmt: skip
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = run(args)
    out = {"summary": summary(out), **out}
    text = json.dumps(out, indent=2, default=str)
    print(json.dumps(out["summary"], indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(args.json), text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
