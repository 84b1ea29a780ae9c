"""The soak: mixed load on a server for a while, its resources sampled throughout.

Workers (each a thread, all ending at the deadline): non-streaming chat and streaming chat
(the official openai client), clients that hang up mid-stream, voice sessions speaking
espeak-ng requests with a barge-in during the reply, and bursts over the queue that must get
429s. A sampler reads the server process's RSS, threads and open files (psutil) and the
slot counters (/health) every few seconds."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

log = logging.getLogger("reliability.soak")
PROMPTS = ["turn on the kitchen lights", "lock the garage door", "what time is it",
           "dim the office lights to forty percent", "set the thermostat to twenty"]  # fmt: skip


class Soak:
    def __init__(self, served, speech: list[bytes], seconds: float, warmup_s: float) -> None:
        self.served, self.speech = served, speech
        self.seconds, self.warmup_s = seconds, warmup_s
        self.counts: Counter = Counter()
        self.samples: list[dict] = []
        self._lock = threading.Lock()
        self.proc = psutil.Process(served.proc.pid)

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    # --- workers --------------------------------------------------------------------------

    def chat(self, until: float, stream: bool, hang_up: bool) -> None:
        import openai

        with openai.OpenAI(
            base_url=f"{self.served.url}/v1", api_key="x", max_retries=0, timeout=60
        ) as client:  # fmt: skip (closed: no connection left open)
            self._chat(client, until, stream, hang_up)

    def _chat(self, client, until: float, stream: bool, hang_up: bool) -> None:
        import openai

        i = 0
        while time.monotonic() < until:
            i += 1
            messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
            try:
                if not stream:
                    client.chat.completions.create(model="m", messages=messages, max_tokens=12)
                    self.count("chat")
                    continue
                chunks = client.chat.completions.create(
                    model="m", messages=messages, max_tokens=12, stream=True
                )
                for n, _ in enumerate(chunks):
                    if hang_up and n == 1:
                        chunks.response.close()  # the client goes away mid-stream
                        self.count("hung_up")
                        break
                else:
                    self.count("chat_stream")
            except openai.RateLimitError:
                self.count("429")
                time.sleep(0.2)
            except openai.APIStatusError as exc:
                self.count(f"http_{exc.status_code}")
            except (openai.APIConnectionError, httpx.HTTPError) as exc:
                self.count("connection_errors")
                log.warning("chat: %s", exc)

    def voice(self, until: float) -> None:
        from websockets.exceptions import ConnectionClosed
        from websockets.sync.client import connect

        i = 0
        while time.monotonic() < until:
            i += 1
            try:
                with connect(self.served.ws_url, open_timeout=30, close_timeout=5) as ws:
                    first = json.loads(ws.recv(timeout=30))
                    if first["type"] != "session.created":
                        self.count("voice_busy")
                        time.sleep(0.5)
                        continue
                    self._turn(ws, self.speech[i % len(self.speech)], barge_in=i % 2 == 0)
                    self.count("voice_sessions")
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else None
                self.count("voice_abnormal" if code not in (1000, 1013) else "voice_closed")
            except (OSError, TimeoutError) as exc:
                self.count("voice_errors")
                log.warning("voice: %s", exc)

    def _turn(self, ws, pcm: bytes, barge_in: bool) -> None:
        """Speak ``pcm`` (at 4x real time), then silence until the reply ends; ``barge_in``:
        speak again as soon as the reply starts (it must be cancelled or end), then leave
        (the second turn's reply, if any, is cut off by the close)."""
        frame = 640
        self._speak(ws, pcm)
        spoke_over, deadline = False, time.monotonic() + 30
        while time.monotonic() < deadline:
            ws.send(bytes(frame * 4))
            try:
                event = json.loads(ws.recv(timeout=0.02))
            except TimeoutError:
                continue
            kind = event["type"]
            if kind == "error":
                self.count(f"voice_error_{event['error'].get('code')}")
            elif kind == "response.created" and not spoke_over:
                self.count("voice_replies")
                if barge_in:
                    self._speak(ws, pcm)
                    spoke_over = True
                    self.count("barge_ins")
            elif kind == "response.done":
                status = event.get("response", {}).get("status")
                self.count(f"voice_reply_{status}")
                return
        self.count("voice_no_reply")

    @staticmethod
    def _speak(ws, pcm: bytes) -> None:
        for k in range(0, len(pcm), 640 * 4):
            ws.send(pcm[k : k + 640 * 4])
            time.sleep(0.02)

    def overload(self, until: float) -> None:
        """Every few seconds, more requests at once than slots + queue: some must get 429."""
        body = {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 12}
        with (
            httpx.Client(base_url=self.served.url, timeout=60) as c,
            ThreadPoolExecutor(16) as pool,
        ):
            while time.monotonic() < until:
                statuses = list(pool.map(
                    lambda _: c.post("/v1/chat/completions", json=body).status_code, range(16)
                ))  # fmt: skip
                self.count("burst_429", statuses.count(429))
                self.count("burst_200", statuses.count(200))
                self.count("burst_other", len(statuses) - statuses.count(429) - statuses.count(200))
                time.sleep(5)

    # --- sampling -------------------------------------------------------------------------

    def sample(self, phase: str) -> dict:
        h = self.served.health()
        with self.proc.oneshot():
            s = {"t": round(time.monotonic() - self.t0, 1), "phase": phase,
                 "rss_mb": round(self.proc.memory_info().rss / 2**20, 1),
                 "threads": self.proc.num_threads(), "fds": self.proc.num_fds()}  # fmt: skip
        s.update({k: h.get(k) for k in ("active", "queued", "voice_sessions", "prefix_cache_mb")})
        self.samples.append(s)
        return s

    def idle(self, phase: str, timeout: float = 30.0) -> dict:
        """A sample once nothing runs (slots free, no voice session), or after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.sample(phase)
            if (
                not (s["active"] or s["queued"] or s["voice_sessions"])
                or time.monotonic() > deadline
            ):
                time.sleep(12.0)
                self._prune_thread_pool()
                s = self.sample(phase)
                s["open"], s["thread_names"] = self._open_fds(), self._thread_names()
                return s
            time.sleep(0.5)

    def _prune_thread_pool(self) -> None:
        """One request served through the server's thread pool (a static file: Starlette
        stats it in anyio's pool). anyio ends workers idle for 10 s only when a new job comes
        (anyio/_backends/_asyncio.py, run_sync), so without one the idle workers of the last
        busy moment are still counted; after it one worker is left, at baseline and after."""
        httpx.get(f"{self.served.url}/static/app.js", timeout=10).raise_for_status()

    def _thread_names(self) -> list[str]:
        """The server's threads by their kernel names (to name a leaked one)."""
        names = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            try:
                names.append((task / "comm").read_text().strip())
            except OSError:
                pass
        return sorted(names)

    def _open_fds(self) -> list[str]:
        """What the server's descriptors point at (to name a leak)."""
        fd_dir = Path(f"/proc/{self.proc.pid}/fd")
        out = []
        for fd in fd_dir.iterdir():
            try:
                out.append(os.readlink(fd))
            except OSError:
                pass
        return sorted(out)

    def run(self) -> dict:
        self.t0 = time.monotonic()
        self.sample("start")
        self._load(self.warmup_s, "warmup")
        base = self.idle("baseline")
        self._load(self.seconds - self.warmup_s, "load")
        end = self.idle("after")
        for _ in range(3):  # a socket whose peer just left closes within seconds; a leak stays
            if end["fds"] <= base["fds"] and end["threads"] <= base["threads"]:
                break
            time.sleep(5.0)
            self._prune_thread_pool()
            end = self.sample("after") | {
                "open": self._open_fds(),
                "thread_names": self._thread_names(),
            }
        requests = sum(v for k, v in self.counts.items() if not k.startswith("voice_error"))
        growth = 100.0 * (end["rss_mb"] - base["rss_mb"]) / base["rss_mb"]
        return {
            "seconds": round(time.monotonic() - self.t0, 1),
            "load_seconds": self.seconds,
            "warmup_seconds": self.warmup_s,
            "requests": requests,
            "counts": dict(sorted(self.counts.items())),
            "rss_mb": {
                "baseline": base["rss_mb"],
                "after": end["rss_mb"],
                "max": max(s["rss_mb"] for s in self.samples),
            },  # fmt: skip
            "rss_growth_pct": round(growth, 2),
            "threads": {
                "baseline": base["threads"],
                "after": end["threads"],
                "max": max(s["threads"] for s in self.samples),
            },  # fmt: skip
            "leaked_threads": max(0, end["threads"] - base["threads"]),
            "fds": {
                "baseline": base["fds"],
                "after": end["fds"],
                "max": max(s["fds"] for s in self.samples),
            },  # fmt: skip
            "leaked_fds": max(0, end["fds"] - base["fds"]),
            "fds_new": sorted(set(end["open"]) - set(base["open"])),
            "threads_new": sorted(
                (Counter(end["thread_names"]) - Counter(base["thread_names"])).elements()
            ),
            "slots_after": (end["active"] or 0) + (end["queued"] or 0),
            "voice_sessions_after": end["voice_sessions"],
            "server_alive": self.served.alive(),
            "server_errors": self.served.crashes(),
            "samples": self.samples,
        }

    def _load(self, seconds: float, phase: str) -> None:
        until = time.monotonic() + seconds
        workers = [
            threading.Thread(target=self.chat, args=(until, False, False)),
            threading.Thread(target=self.chat, args=(until, True, False)),
            threading.Thread(target=self.chat, args=(until, True, True)),
            threading.Thread(target=self.voice, args=(until,)),
            threading.Thread(target=self.voice, args=(until,)),
            threading.Thread(target=self.overload, args=(until,)),
        ]
        for w in workers:
            w.start()
        while time.monotonic() < until:
            self.sample(phase)
            time.sleep(min(5.0, max(0.1, until - time.monotonic())))
        for w in workers:
            w.join(90)
