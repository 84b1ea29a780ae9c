"""``moe2edge serve`` in a child process on 127.0.0.1, its log in a file: what the
reliability benchmark measures (from outside, as a client would)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
# what a server writes when a request or a WebSocket handler raised (uvicorn / our loggers)
_CRASH = re.compile(r"Traceback \(most recent call last\)|Exception in ASGI application")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, tail, timeout_s: float = 120.0) -> None:
    """Return once ``url``/health answers 200; RuntimeError (with ``tail()``, the server's
    last output) if ``proc`` exits or ``timeout_s`` passes (the process is then killed)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {tail()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server did not become healthy in {timeout_s:.0f} s: {tail()}")


class Served:
    """A server process for ``bundle`` with ``settings`` (config key -> value)."""

    def __init__(self, bundle: Path, log_path: Path, grammar: Path | None = None, **settings):
        self.port = free_port()
        self.log_path = Path(log_path)
        self.cmd = [sys.executable, "-m", "moe2edge.cli", "serve", str(bundle),
                    *[f"{k}={v}" for k, v in settings.items()],  # right after BUNDLE
                    "--port", str(self.port), "--log-level", "info",
                    *(["--grammar", str(grammar)] if grammar else [])]  # fmt: skip
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime"

    def __enter__(self) -> Served:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(self.proc, self.url, self.tail)
        except RuntimeError:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, n: int = 3000) -> str:
        return self.log()[-n:]

    def crashes(self) -> int:
        """Tracebacks in the server's log (a handler that raised: a server error)."""
        return len(_CRASH.findall(self.log()))

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()
