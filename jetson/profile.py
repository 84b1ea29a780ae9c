"""``moe2edge profile BUNDLE``: where a prefill and a decode step spend their time and memory.

One ONNX Runtime session runs under its profiler (``SessionOptions.enable_profiling``):
a warm-up, a prefill of the prompt, ``decode_steps`` greedy decode steps, one speculative
verify step (``verify_tokens`` positions at once), a prefill after a cached prefix (prefix
reuse), and, where the graph batches rows (``runtime.batch``), ``decode_steps`` decode
steps of ``batch`` rows at once. Each of those is one ``session.run``; ORT records it as a
``model_run`` event and every operator inside it as a ``Node`` event (name from the
exported graph, e.g. ``/model/layers.3/attn/qkv_proj/MatMul``, op type, provider, output /
activation / parameter bytes). ``moe2edge.jetson.profile_report`` turns them into per-layer
and per-operator tables, the Chrome/Perfetto trace and the PNG chart.

The same steps are then timed without the profiler (its bookkeeping between operators
costs microseconds per node), at each thread count of ``compare_threads`` and for every
``compare`` bundle: those unprofiled step times are what ``moe2edge.jetson.suggest``
compares. See docs/profiler.md.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from moe2edge.jetson.errors import JetsonError
from moe2edge.jetson.profile_report import aggregate, write_outputs
from moe2edge.runtime.batch import KVBatch, batches_rows
from moe2edge.runtime.engine import OnnxEngine
from moe2edge.runtime.errors import RuntimeUserError
from moe2edge.runtime.generate import Generator

log = logging.getLogger(__name__)

PROMPT = "turn on the kitchen lights and dim the office lights to forty percent"
MEASURED_PHASES = ("prefill", "decode", "verify", "reuse_tail", "batch_decode")


@dataclass
class ProfileConfig:
    """What to run. Ranges are checked by ``validate``."""

    prompt: str = PROMPT
    prompt_tokens: int = 0  # 0: the prompt as encoded; else repeated/cut to this many tokens
    decode_steps: int = 16  # 1..1024
    warmup_steps: int = 2  # 0..64, excluded from the tables (in the trace as "warmup")
    batch: int = 4  # rows of the batched decode (0 or 1: not measured), 0..256
    verify_tokens: int = 5  # positions of a speculative verify step (gamma + 1), 2..64
    reuse_tail_tokens: int = 8  # new tokens prefilled after a cached prefix, 1..4096
    threads: int = 0  # ORT intra-op threads (0: one per core)
    compare_threads: tuple[int, ...] = ()  # also time decode unprofiled at these counts
    timing_steps: int = 16  # unprofiled decode steps per timing, 1..4096
    device: str = "cpu"
    chart: bool = True  # write profile.png when matplotlib is importable
    acceptance: float | None = None  # speculation acceptance for --suggest (None: assumed)

    def validate(self) -> None:
        checks = {
            "decode_steps": (self.decode_steps, 1, 1024),
            "warmup_steps": (self.warmup_steps, 0, 64),
            "batch": (self.batch, 0, 256),
            "verify_tokens": (self.verify_tokens, 2, 64),
            "reuse_tail_tokens": (self.reuse_tail_tokens, 1, 4096),
            "threads": (self.threads, 0, 256),
            "timing_steps": (self.timing_steps, 1, 4096),
            "prompt_tokens": (self.prompt_tokens, 0, 1 << 20),
        }
        for name, (value, lo, hi) in checks.items():
            if not lo <= value <= hi:
                raise JetsonError(f"{name} must be in {lo}..{hi}, not {value}")
        for t in self.compare_threads:
            if not 1 <= t <= 256:
                raise JetsonError(f"compare_threads must be in 1..256, not {t}")
        if self.acceptance is not None and not 0 <= self.acceptance <= 1:
            raise JetsonError(f"acceptance must be in 0..1, not {self.acceptance}")
        if not self.prompt.strip():
            raise JetsonError("the prompt is empty; give a prompt to profile")


class StepRecorder:
    """Runs steps, one ``session.run`` each, and records (phase, wall seconds) in order."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, float]] = []

    def __call__(self, phase: str, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        out = fn()
        self.steps.append((phase, time.perf_counter() - started))
        return out


def open_profiled(bundle: str | Path, config: ProfileConfig, prefix: str | None) -> Generator:
    """A generator over an ONNX Runtime engine (profiled when ``prefix`` is given)."""
    try:
        engine = OnnxEngine(
            bundle,
            config.device,
            config.threads,
            verify=prefix is not None,
            profile_prefix=prefix,
        )
    except RuntimeUserError as exc:
        raise JetsonError(f"cannot profile {bundle}: {exc}") from exc
    tokenizer = Path(bundle) / engine.manifest["io"].get("tokenizer_file", "tokenizer.json")
    if not tokenizer.is_file():
        raise JetsonError(f"bundle {bundle} has no {tokenizer.name}; re-export it")
    return Generator(engine, Tokenizer.from_file(str(tokenizer)))


def prompt_ids(gen: Generator, config: ProfileConfig) -> list[int]:
    """The prompt's ids, repeated or cut to ``prompt_tokens``, leaving room for the steps."""
    ids = gen.encode_prompt(config.prompt)
    if config.prompt_tokens:
        body = ids[1:] if len(ids) > 1 else ids
        while len(ids) < config.prompt_tokens:
            ids = ids + body
        ids = ids[: config.prompt_tokens]
    room = gen.engine.max_length - config.decode_steps - config.verify_tokens - 2
    if room < 2:
        raise JetsonError(
            f"the bundle's context ({gen.engine.max_length}) leaves no room for "
            f"{config.decode_steps} decode steps; lower --decode-steps"
        )
    return ids[:room]


def run_steps(gen: Generator, ids: list[int], config: ProfileConfig, rec: StepRecorder) -> dict:
    """Every phase once (see the module docstring); returns the row counts it used."""
    engine = gen.engine
    warm = engine.new_cache()
    logits = rec("warmup", lambda: engine.forward(ids, warm))
    for _ in range(config.warmup_steps):
        logits = rec("warmup", lambda lg=logits: engine.forward([int(np.argmax(lg))], warm))
    cache = warm  # its KV buffers are allocated: the prefill does not pay for that
    cache.truncate(0)
    logits = rec("prefill", lambda: engine.forward(ids, cache))
    for _ in range(config.decode_steps):
        logits = rec("decode", lambda lg=logits: engine.forward([int(np.argmax(lg))], cache))
    verify = [int(np.argmax(logits))] + ids[1 : config.verify_tokens]
    rec("verify", lambda: engine.forward(verify, cache, all_logits=True))
    tail = min(config.reuse_tail_tokens, len(ids) - 1)
    reused = engine.new_cache()
    rec("warmup", lambda: engine.forward(ids, reused))
    reused.truncate(0)
    rec("reuse_prefix", lambda: engine.forward(ids[:-tail], reused))
    rec("reuse_tail", lambda: engine.forward(ids[-tail:], reused))
    rows = config.batch if config.batch > 1 and batches_rows(engine) else 0
    if rows:
        batch = KVBatch(engine, rows)
        caches = [batch.take() for _ in range(rows)]
        firsts = [rec("batch_prefill", lambda c=c: engine.forward(ids, c)) for c in caches]
        tokens = [int(np.argmax(lg)) for lg in firsts]
        for i in range(config.warmup_steps + config.decode_steps):
            phase = "warmup" if i < config.warmup_steps else "batch_decode"
            out = rec(phase, lambda t=tokens: batch.forward(caches, t))
            tokens = [int(t) for t in out.argmax(axis=1)]
    return {"batch_rows": rows, "reuse_tail_tokens": tail, "prompt_tokens": len(ids)}


def timed_steps(
    gen: Generator, ids: list[int], config: ProfileConfig, rounds: int = 4
) -> dict[str, float]:
    """Median unprofiled step times (ms) of the same phases (batched decode where it runs).

    Caches are allocated once and emptied (``truncate(0)``) between rounds, so no step
    pays for allocating KV buffers; the first round only warms up."""
    engine, n = gen.engine, config.timing_steps
    rec = StepRecorder()
    cache, reused = engine.new_cache(), engine.new_cache()
    tail = min(config.reuse_tail_tokens, len(ids) - 1)
    rows = config.batch if config.batch > 1 and batches_rows(engine) else 0
    batch = KVBatch(engine, rows) if rows else None
    caches = [batch.take() for _ in range(rows)] if batch else []
    for r in range(rounds):
        if r == 1:
            rec.steps.clear()
        cache.truncate(0)
        logits = rec("prefill", lambda: engine.forward(ids, cache))
        for _ in range(n if r in (0, rounds - 1) else 0):
            logits = rec("decode", lambda lg=logits: engine.forward([int(np.argmax(lg))], cache))
        verify = [int(np.argmax(logits))] + ids[1 : config.verify_tokens]
        rec("verify", lambda v=verify: engine.forward(v, cache, all_logits=True))
        reused.truncate(0)
        engine.forward(ids[:-tail], reused)
        rec("reuse_tail", lambda: engine.forward(ids[-tail:], reused))
        if batch and r in (0, rounds - 1):
            for c in caches:
                c.truncate(0)
            tokens = [int(np.argmax(engine.forward(ids, c))) for c in caches]
            for _ in range(n):
                out = rec("batch_decode", lambda t=tokens: batch.forward(caches, t))
                tokens = [int(t) for t in out.argmax(axis=1)]
    by_phase: dict[str, list[float]] = {}
    for phase, seconds in rec.steps:
        by_phase.setdefault(phase, []).append(seconds * 1e3)
    return {f"{phase}_ms": statistics.median(v) for phase, v in by_phase.items()}


def involuntary_switches() -> int:
    """Times this thread was preempted so far (Linux; 0 where unknown)."""
    import resource

    who = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)
    return int(resource.getrusage(who).ru_nivcsw)


def process_memory() -> dict[str, float]:
    """This process's resident memory now and at its peak, MB (psutil, else /proc)."""
    try:
        import psutil

        info = psutil.Process().memory_info()
        out = {"rss_mb": info.rss / 2**20}
        peak = getattr(info, "peak_wset", None)
        if peak:
            out["peak_rss_mb"] = peak / 2**20
    except ImportError:
        out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                name = "rss_mb" if key == "VmRSS" else "peak_rss_mb"
                out[name] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return {k: round(v, 1) for k, v in out.items()}


def profile_bundle(
    bundle: str | Path,
    out_dir: str | Path,
    config: ProfileConfig | None = None,
    compare: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """Profile ``bundle`` into ``out_dir`` (trace.json, profile.json, profile.md, profile.png)
    and return the result: phases with per-layer / per-op tables, coverage, measurements."""
    config = config or ProfileConfig()
    config.validate()
    bundle, out_dir = Path(bundle), Path(out_dir)
    if not (bundle / "manifest.json").is_file():
        raise JetsonError(f"{bundle} is not a bundle (no manifest.json); pass a bundle folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("ort_*.json"):
        old.unlink()
    gen = open_profiled(bundle, config, str(out_dir / "ort"))
    ids = prompt_ids(gen, config)
    rec = StepRecorder()
    log.info(
        "profiling %s: %d prompt tokens, %d decode steps", bundle, len(ids), config.decode_steps
    )
    switches = involuntary_switches()
    shape = run_steps(gen, ids, config, rec)
    shape["involuntary_context_switches"] = involuntary_switches() - switches
    ort_file = Path(gen.engine.session.end_profiling())
    events = json.loads(ort_file.read_text(encoding="utf-8"))
    memory = process_memory()
    result = aggregate(events, rec.steps, MEASURED_PHASES)
    manifest = gen.engine.manifest
    threads = config.threads or os.cpu_count() or 1
    measured: dict[str, Any] = {"threads": threads, **shape}
    measured["unprofiled"] = timed_steps(open_profiled(bundle, config, None), ids, config)
    measured["decode_ms_by_threads"] = decode_by_threads(bundle, ids, config)
    measured["compare"] = [compare_bundle(b, config, ids) for b in compare]
    result.update(
        bundle=str(bundle),
        model=manifest.get("model", {}),
        precision=manifest.get("precision", {}),
        graph=manifest["io"].get("graph", "optimum"),
        device=config.device,
        config={k: v for k, v in asdict(config).items() if k != "prompt"},
        measured=measured,
        memory=memory,
        ort_profile=str(ort_file),
    )
    return write_outputs(result, events, out_dir, chart=config.chart)


def decode_by_threads(bundle: Path, ids: list[int], config: ProfileConfig) -> dict[str, float]:
    """Unprofiled decode step (ms) at each of ``compare_threads``: two interleaved passes,
    the lower median of each (a burst of another process's work hits one pass)."""
    cfgs = {
        t: ProfileConfig(**{**asdict(config), "threads": t, "batch": 0})
        for t in sorted(set(config.compare_threads))
    }
    gens = {t: open_profiled(bundle, cfg, None) for t, cfg in cfgs.items()}
    out: dict[str, float] = {}
    for _ in range(2):
        for t, gen in gens.items():
            ms = timed_steps(gen, ids, cfgs[t], rounds=2)["decode_ms"]
            out[str(t)] = min(out.get(str(t), ms), ms)
    return out


def compare_bundle(bundle: str | Path, config: ProfileConfig, ids: list[int]) -> dict[str, Any]:
    """Unprofiled step times of a sibling bundle (another precision of the same model)."""
    gen = open_profiled(bundle, config, None)
    if gen.engine.max_length < len(ids) + config.timing_steps + config.verify_tokens + 2:
        raise JetsonError(f"{bundle}'s context is too short for the profiled prompt")
    times = timed_steps(gen, ids, ProfileConfig(**{**asdict(config), "batch": 0}))
    return {"bundle": str(bundle), "precision": gen.engine.manifest.get("precision", {}), **times}
