"""Helpers for the service tests: a real uvicorn server on 127.0.0.1 in a thread, speech."""

from __future__ import annotations

import math
import socket
import threading
import time
import typing
from collections.abc import Iterator

import numpy as np
import uvicorn

from moe2edge.runtime.voice import FRAME_SAMPLES, SAMPLE_RATE, EspeakSynthesizer, float32_to_pcm16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 from a background thread (a real HTTP server)."""

    def __init__(self, app) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", ws_max_size=1 << 20
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def speech(text: str, voice: str = "en-us", lead_s: float = 0.3, tail_s: float = 0.6) -> np.ndarray:
    """``text`` spoken by espeak-ng at 16 kHz with silence around it."""
    audio = EspeakSynthesizer(voice=voice).synthesize(text)
    lead, tail = np.zeros(int(lead_s * SAMPLE_RATE)), np.zeros(int(tail_s * SAMPLE_RATE))
    return np.concatenate([lead, audio, tail]).astype(np.float32)


def frames(audio: np.ndarray) -> Iterator[bytes]:
    pcm = float32_to_pcm16(audio)
    step = FRAME_SAMPLES * 2
    for i in range(0, len(pcm) - step + 1, step):
        yield pcm[i : i + step]


def numeric_fields(fields: dict) -> dict[str, type]:
    """The int and float settings among pydantic ``fields`` (name -> type), ``X | None`` too."""
    out = {}
    for name, info in fields.items():
        args = typing.get_args(info.annotation) or (info.annotation,)
        kinds = [a for a in args if a in (int, float)]
        if kinds:
            out[name] = kinds[0]
    return out


def bad_numbers(info, kind: type) -> list[tuple[str, float]]:
    """NaN, +-Infinity and a value just outside each end of the field's range (a field
    without both ends fails here: every number a user sets must have a range)."""
    bounds = {k: getattr(m, k) for m in info.metadata for k in ("ge", "gt", "le", "lt")
              if getattr(m, k, None) is not None}  # fmt: skip
    assert {"ge", "gt"} & set(bounds) and {"le", "lt"} & set(bounds), f"unbounded: {info}"
    step = 1 if kind is int else 0.5
    low = bounds["gt"] if "gt" in bounds else bounds["ge"] - step
    high = bounds["lt"] if "lt" in bounds else bounds["le"] + step
    return [("NaN", math.nan), ("Infinity", math.inf), ("-Infinity", -math.inf),
            ("below", low), ("above", high)]  # fmt: skip
