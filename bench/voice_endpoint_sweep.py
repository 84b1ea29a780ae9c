"""Endpoint settings swept offline over bench/voice.py's clips: false cut-offs and the endpoint's
delay after the true end of speech, per setting.

The same 80 clips as ``bench/voice.py --seed 0`` (the demo's held-out requests in its 6
voices, 30% with a 300-700 ms pause spliced in), each with 0.5 s of lead and 1 s of tail and
the microphone floor, go as 20 ms frames, as fast as it takes them, through a fresh
``VoiceSession`` of the predictive policy (the server's VAD and pocketsphinx with the grammar;
replies of one token, no drafts, no barge-in: only the endpoint is measured). Decisions
depend on stream positions only, so the figures do not depend on this machine's speed. The
one recognizer is shared by the clips in order, as a server's pool shares it, so a clip's
transcript depends a little on the clips before it (pocketsphinx adapts its cepstral mean).
Prints and writes one JSON object: per setting, cut-offs (an endpoint before the true end;
among all clips and the paused ones) and the endpoint's delay after the true end (p50, p95).

    python bench/voice_endpoint_sweep.py            # ~40 s per setting on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HERE = str(Path(__file__).resolve().parent)  # bench/ last: bench/gguf.py shadows `gguf`
sys.path[:] = [p for p in sys.path if p not in (HERE, "")] + [HERE]

import voice as bench_voice  # noqa: E402  (bench/voice.py: the clips)
from machine import cpu_name  # noqa: E402  (bench/machine.py)

from moe2edge.fileio import atomic_write_json  # noqa: E402
from moe2edge.runtime import Generator  # noqa: E402
from moe2edge.runtime.voice import (  # noqa: E402
    EspeakSynthesizer,
    PocketsphinxRecognizer,
    float32_to_pcm16,
    vad,
)
from moe2edge.runtime.voice.audio import FRAME_SAMPLES, SAMPLE_RATE  # noqa: E402
from moe2edge.runtime.voice.pipeline import VoiceSession  # noqa: E402
from moe2edge.runtime.voice.settings import VoiceSettings  # noqa: E402
from moe2edge.runtime.voice.turn_end import endpoint_policy  # noqa: E402

# (label, VoiceSettings overrides, vad.QUIET_UNDER_PEAK: a constant, swept here)
CLOSED_OFF = {"closed_silence_ms": 112.0}  # closed commands wait as long as any whole one
SETTINGS = [
    # before: silence counted from Silero's last voiced window
    ("silero_96", {"complete_silence_ms": 96.0, "early_silence": False, **CLOSED_OFF}, 0.02),
    ("energy_112", {"complete_silence_ms": 112.0, **CLOSED_OFF}, 0.02),
    ("energy_96", {"complete_silence_ms": 96.0, "closed_silence_ms": 96.0}, 0.02),
    ("energy_80", {"complete_silence_ms": 80.0, "closed_silence_ms": 80.0}, 0.02),
    ("energy_128", {"complete_silence_ms": 128.0, "closed_silence_ms": 128.0}, 0.02),
    ("energy_112_peak5pct", {"complete_silence_ms": 112.0, **CLOSED_OFF}, 0.05),
    ("energy_112_closed_80", {"complete_silence_ms": 112.0, "closed_silence_ms": 80.0}, 0.02),
    ("energy_112_closed_64", {"complete_silence_ms": 112.0, "closed_silence_ms": 64.0}, 0.02),
    ("energy_112_closed_48", {"complete_silence_ms": 112.0, "closed_silence_ms": 48.0}, 0.02),
    ("energy_112_closed_32", {"complete_silence_ms": 112.0, "closed_silence_ms": 32.0}, 0.02),
]
LEAD_S, TAIL_S, FLOOR = 0.5, 1.0, 0.002


def clips_of(rows: list[dict], paused_share: float, seed: int) -> list[dict]:
    """bench/voice.py's clips (run_voice_section, same seed: same voices, pauses, audio)."""
    voices = bench_voice.VOICES
    rng = np.random.default_rng(seed)
    synth = {v: bench_voice.synthesizer(v) for v in voices}
    clips = []
    for i, r in enumerate(rows):
        voice, text = voices[i % len(voices)], r.get("spoken", r["utterance"])
        pause_ms = float(rng.uniform(300, 700)) if rng.random() < paused_share else 0.0
        clip = bench_voice.make_clip(synth[voice], text, pause_ms, rng)
        clips.append({**clip, "text": text, "voice": voice})
    return clips


def endpoint_of(generator, recognizer, clip: dict, settings: VoiceSettings) -> tuple[bool, float]:
    """(cut off, ms from the true end to the endpoint after it) for one clip."""
    events: list[dict] = []
    session = VoiceSession(
        generator, recognizer, EspeakSynthesizer(), events.append, settings=settings
    ).start()
    lead = np.zeros(int(LEAD_S * SAMPLE_RATE), np.float32)
    audio = np.concatenate([lead, clip["audio"], np.zeros(int(TAIL_S * SAMPLE_RATE), np.float32)])
    audio = audio + np.random.default_rng(1).normal(0, FLOOR, len(audio)).astype(np.float32)
    pcm, step = float32_to_pcm16(audio), 2 * FRAME_SAMPLES
    try:
        for i in range(0, len(pcm) - step + 1, step):
            session.push_audio(pcm[i : i + step])
        session.wait_idle(60)
    finally:
        session.close()
    end_ms = 1000 * (len(lead) + clip["end"]) / SAMPLE_RATE
    stops = [e["endpoint_ms"] for e in events if e["type"] == "input_audio_buffer.speech_stopped"]
    after = [t - end_ms for t in stops if t >= end_ms]
    return any(t < end_ms for t in stops), (after[0] if after else float("nan"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=str(ROOT / "runs/demo"), help="a `make demo` run directory")
    p.add_argument("--n", type=int, default=80)
    p.add_argument("--paused", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="", help="comma-separated labels of SETTINGS to run")
    p.add_argument("--json", default=str(ROOT / "bench/results/voice_endpoint_sweep.json"))
    args = p.parse_args()
    chosen = [x for x in SETTINGS if not args.only or x[0] in args.only.split(",")]
    run = Path(args.run)
    rows = [json.loads(x) for x in (run / "data/eval.jsonl").read_text().splitlines() if x]
    rows = [r for r in rows if r.get("kind") != "multi_turn"][: args.n]
    clips = clips_of(rows, args.paused, args.seed)
    paused = [c["paused_text"] is not None for c in clips]
    generator = Generator.from_bundle(run / "bundles/fp32", threads=1)
    recognizer = PocketsphinxRecognizer(grammar_path=str(run / "data/commands.jsgf"))
    out: dict = {"clips": len(clips), "paused": sum(paused), "settings": {}}
    started = time.time()
    default_peak = vad.QUIET_UNDER_PEAK
    for label, overrides, peak in chosen:
        vad.QUIET_UNDER_PEAK = peak
        # barge_in off: whether a reply is still playing when the tail arrives (a race with
        # the reply's thread) would change how the next speech is cut, and so what the shared
        # recognizer hears (its cepstral mean adapts across utterances, as in the server)
        settings = VoiceSettings(
            max_new_tokens=1, speculate=False, history_turns=0, barge_in=False, **overrides
        )
        results = [endpoint_of(generator, recognizer, c, settings) for c in clips]
        delays = np.array([d for _, d in results])
        cuts = [c["text"] for c, (cut, _) in zip(clips, results, strict=True) if cut]
        out["settings"][label] = {
            "complete_silence_ms": settings.complete_silence_ms,
            "closed_silence_ms": endpoint_policy(settings, recognizer).closed_silence_ms,
            "early_silence": settings.early_silence,
            "quiet_under_peak": peak,
            "cutoffs": len(cuts),
            "cutoffs_paused": sum(cut and pz for (cut, _), pz in zip(results, paused, strict=True)),
            "endpoint_after_end_ms": {
                "p50": round(float(np.nanpercentile(delays, 50)), 1),
                "p95": round(float(np.nanpercentile(delays, 95)), 1),
            },
            "cut": cuts,
        }
        print(json.dumps({label: out["settings"][label]}), file=sys.stderr, flush=True)
    vad.QUIET_UNDER_PEAK = default_peak
    out |= {"cpu": cpu_name(), "seconds": round(time.time() - started, 1)}
    if args.json:
        atomic_write_json(Path(args.json), out, indent=1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
