"""bench/voice.py's ``noise`` and ``wake`` sections: the voice pipeline in white and babble
noise, and the wake-word spotter's success and false wakes. Both run offline, faster than
real time, through the objects the server uses.

noise: each held-out request is spoken (espeak-ng voices), padded with 0.4 s before and 1 s
after, and noise is mixed over the whole clip with ``mix_at_snr`` (the SNR is over the
speech's active frames), plus the microphone floor bench/voice.py sends under everything.
White noise is Gaussian; babble is four other espeak-ng voices saying other sentences (the
training requests), summed. Every clip goes, as 20 ms frames pushed as fast as the session
takes them, into a fresh ``VoiceSession`` (the server's VAD, pocketsphinx with the grammar,
the student, espeak-ng reply speech) with the server's default settings, except that reply
audio is not paced (``audio_lead_ms`` at its maximum, so no one waits for it to play). The
scores are bench/voice.py's: WER of the joined transcripts against the spoken text
(jiwer) and reply task accuracy (the last reply's action sequence is the reference's).

wake: clips "<phrase>" + 0.2 s + a command, with 0.5 s before and after, in white or
babble noise at each SNR (and clean). A clip succeeds when the spotter's first detection
ends inside the phrase's window (its start to 0.5 s after its end). False wakes are
counted over non-wake speech: requests and other sentences (a few near misses such as
"hey Robert" among them) in several voices, concatenated with 0.25 s gaps, fed in 20 ms
frames to one ``WakeWordSpotter`` (as ``WakeGate`` feeds it). The threshold is chosen on a
tuning set (other sentences, voices and seeds) and then measured on the test set.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from machine import cpu_name  # bench/machine.py

from moe2edge.runtime.voice import SAMPLE_RATE, EspeakSynthesizer, float32_to_pcm16
from moe2edge.runtime.voice.audio import FRAME_SAMPLES, mix_at_snr, speech_bounds
from moe2edge.runtime.voice.wake import WakeWordSpotter

log = logging.getLogger("bench.noise")

FLOOR = 0.002  # the microphone floor (bench/voice.py NOISE); pocketsphinx needs no digital zeros
SPEAKERS = ["en-us", "en-us+f3", "en-us+m1", "en-us+f2", "en-us+m3"]
BABBLE_VOICES = ["en-us+m2", "en-us+f4", "en-us+m4", "en-us+f1"]  # other voices than the speakers
TUNE_SPEAKERS = ["en-us+m5", "en-us+f5", "en-us+m6", "en-us+m7"]
OTHER_SENTENCES = [  # not commands of the grammar; a few sound like the phrase
    "hey there, how was your day",
    "the robot vacuum is stuck under the sofa again",
    "hey Robert, can you pass me the salt",
    "I read a story about a robot who learned to paint",
    "hey, are you coming to dinner tonight",
    "robots are building cars in that factory",
    "we should buy a new kettle for the kitchen",
    "please remember to call your grandmother on sunday",
    "the weather will be cold and rainy tomorrow morning",
    "hey, hold on a second, I am on the phone",
    "my brother bought a toy robot for his son",
    "the train to the city leaves at half past eight",
]


def trimmed(tts: EspeakSynthesizer, text: str) -> np.ndarray:
    audio = tts.synthesize(text)
    start, end = speech_bounds(audio)
    return audio[start:end]


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)


def babble_bank(sentences: list[str], voices: list[str], seconds: float, seed: int) -> np.ndarray:
    """``len(voices)`` talkers, each saying shuffled ``sentences`` for ``seconds``, summed."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    bank = np.zeros(n, dtype=np.float32)
    for voice in voices:
        tts, parts, have = EspeakSynthesizer(voice=voice), [], 0
        for i in rng.permutation(len(sentences)):
            part = np.concatenate([trimmed(tts, sentences[i]), silence(rng.uniform(0.05, 0.3))])
            parts.append(part)
            have += len(part)
            if have >= n:
                break
        talker = np.resize(np.concatenate(parts), n)
        bank += np.roll(talker, int(rng.integers(n))) / max(1e-6, float(np.std(talker)))
    return bank / float(np.std(bank))


class NoiseSource:
    """White or babble noise of any length (babble: a random stretch of the bank)."""

    def __init__(self, babble: np.ndarray, seed: int) -> None:
        self.babble, self.rng = babble, np.random.default_rng(seed)

    def __call__(self, kind: str, n: int) -> np.ndarray:
        if kind == "white":
            return self.rng.normal(0, 1, n).astype(np.float32)
        start = int(self.rng.integers(len(self.babble) - n)) if len(self.babble) > n else 0
        return np.resize(self.babble[start:], n)


def noisy(
    clip: np.ndarray, kind: str | None, snr: float | None, noise: NoiseSource, rng
) -> np.ndarray:
    """``clip`` with ``kind`` noise at ``snr`` dB over its speech, and the microphone floor."""
    out = clip if kind is None else mix_at_snr(clip, noise(kind, len(clip)), snr)
    return (out + rng.normal(0, FLOOR, len(out))).astype(np.float32)


def conditions(snrs: list[float]) -> list[tuple[str, str | None, float | None]]:
    """(label, kind, snr): clean first, then white and babble at each SNR."""
    return [("clean", None, None)] + [(f"{s:g}", k, s) for s in snrs for k in ("white", "babble")]


# --- noise: the voice pipeline ------------------------------------------------------------


def pipeline_turn(generator, recognizer, audio: np.ndarray, settings) -> tuple[str, str]:
    """One clip through a fresh VoiceSession: (joined transcripts, the last reply text)."""
    from moe2edge.runtime.voice.pipeline import VoiceSession

    events: list[dict] = []
    session = VoiceSession(
        generator, recognizer, EspeakSynthesizer(), events.append, settings=settings
    ).start()
    try:
        pcm = float32_to_pcm16(np.concatenate([audio, silence(0.8)]))
        step = 2 * FRAME_SAMPLES
        for i in range(0, len(pcm) - step + 1, step):
            session.push_audio(pcm[i : i + step])
        if not session.wait_idle(60):
            log.warning("a noisy turn did not finish in 60 s")
    finally:
        session.close()
    kind = "conversation.item.input_audio_transcription.completed"
    transcripts = [e["transcript"] for e in events if e["type"] == kind and e["transcript"]]
    replies = [e["text"] for e in events if e["type"] == "response.text.done"]
    return " ".join(transcripts), (replies[-1] if replies else "")


def run_noise(
    bundle: str,
    grammar: str,
    rows: list[dict],
    snrs: list[float],
    n: int,
    seed: int,
    babble_text: list[str],
    scorer,
) -> dict:
    """The ``noise`` section. ``scorer(turns) -> {wer, reply_task_acc}`` is bench/voice.py's."""
    from moe2edge.runtime import Generator
    from moe2edge.runtime.voice import PocketsphinxRecognizer
    from moe2edge.runtime.voice.settings import VoiceSettings

    started = time.time()
    rng = np.random.default_rng(seed)
    generator = Generator.from_bundle(bundle, threads=1)
    recognizer = PocketsphinxRecognizer(grammar_path=grammar)
    settings = VoiceSettings(
        max_new_tokens=min(generator.default_max_new_tokens, 64), audio_lead_ms=10_000.0
    )
    synth = {v: EspeakSynthesizer(voice=v) for v in SPEAKERS}
    clips = []
    for i, r in enumerate(rows[:n]):
        text, voice = r.get("spoken", r["utterance"]), SPEAKERS[i % len(SPEAKERS)]
        audio = np.concatenate([silence(0.4), trimmed(synth[voice], text), silence(1.0)])
        clips.append({"audio": audio, "text": text, "action": r["action"], "voice": voice})
    source = NoiseSource(babble_bank(babble_text, BABBLE_VOICES, 120.0, seed + 1), seed + 2)
    by: dict[str, dict] = {}
    for label, kind, snr in conditions(snrs):
        turns = []
        for clip in clips:
            audio = noisy(clip["audio"], kind, snr, source, rng)
            transcript, reply = pipeline_turn(generator, recognizer, audio, settings)
            turns.append(
                {
                    **{k: clip[k] for k in ("text", "action", "voice")},
                    "transcript": transcript,
                    "reply": reply,
                }
            )
        by.setdefault(label, {})[kind or "all"] = turns
        log.info("noise %s %s: %s", label, kind, scorer(turns))
    out: dict = {"clean": {**scorer(by["clean"]["all"]), "n": len(clips)}}
    for label in (f"{s:g}" for s in snrs):
        kinds = by[label]
        out[label] = {
            **scorer(kinds["white"] + kinds["babble"]),
            "n": 2 * len(clips),
            **{k: {**scorer(t), "n": len(t)} for k, t in kinds.items()},
        }
    out["setup"] = {
        "utterances_per_snr_per_kind": len(clips),
        "speakers": SPEAKERS,
        "babble": f"{len(BABBLE_VOICES)} other espeak-ng voices saying training requests",
        "path": "in-process VoiceSession per clip (VAD, pocketsphinx+grammar, student), "
        "server default settings, frames pushed faster than real time",
        "seconds": round(time.time() - started, 1),
    }
    return out


# --- wake: the spotter ------------------------------------------------------------------------


def wake_clips(phrase: str, commands: list[str], voices: list[str], n: int) -> list[dict]:
    """``n`` clips: 0.5 s, the phrase, 0.2 s, a command, 0.5 s; the phrase's window."""
    synth = {v: EspeakSynthesizer(voice=v) for v in voices}
    clips = []
    for i in range(n):
        tts = synth[voices[i % len(voices)]]
        said = trimmed(tts, phrase)
        lead = silence(0.5)
        audio = np.concatenate(
            [lead, said, silence(0.2), trimmed(tts, commands[i % len(commands)]), silence(0.5)]
        )
        clips.append({"audio": audio, "window": (len(lead), len(lead) + len(said))})
    return clips


def non_wake_audio(
    sentences: list[str], voices: list[str], minutes: float, seed: int
) -> np.ndarray:
    """At least ``minutes`` of ``sentences`` in ``voices`` (cycled), 0.25 s apart, with the floor."""
    rng = np.random.default_rng(seed)
    synth = {v: EspeakSynthesizer(voice=v) for v in voices}
    parts, have, i, need = [], 0, 0, int(minutes * 60 * SAMPLE_RATE)
    order = rng.permutation(len(sentences))
    while have < need:
        sentence = sentences[order[i % len(order)]]
        part = np.concatenate([trimmed(synth[voices[i % len(voices)]], sentence), silence(0.25)])
        parts.append(part)
        have, i = have + len(part), i + 1
    audio = np.concatenate(parts)
    return (audio + rng.normal(0, FLOOR, len(audio))).astype(np.float32)


def success_rate(spotter: WakeWordSpotter, clips: list[dict], kind, snr, source, rng) -> float:
    hits = 0
    for clip in clips:
        spotter.reset()
        origin = spotter.samples
        found = spotter.spot(noisy(clip["audio"], kind, snr, source, rng))
        start, end = clip["window"]
        first = found[0] - origin if found else None
        hits += first is not None and start <= first <= end + SAMPLE_RATE // 2
    return hits / len(clips)


def measure(phrase: str, threshold: float, clips, non_wake: np.ndarray, snrs, source, seed) -> dict:
    """Success per condition and false wakes per hour at ``threshold``."""
    rng = np.random.default_rng(seed)
    spotter = WakeWordSpotter(phrase, threshold)
    out: dict = {}
    for label, kind, snr in conditions(snrs):
        rate = success_rate(spotter, clips, kind, snr, source, rng)
        if kind is None:
            out[label] = {"success_rate": round(rate, 3)}
        else:
            out.setdefault(label, {})[kind] = round(rate, 3)
    for label in (f"{s:g}" for s in snrs):
        out[label]["success_rate"] = round((out[label]["white"] + out[label]["babble"]) / 2, 3)
    spotter = WakeWordSpotter(phrase, threshold)  # a fresh stream, as a session's gate
    started = time.perf_counter()
    false = len(spotter.spot(non_wake, chunk=FRAME_SAMPLES))
    hours = len(non_wake) / SAMPLE_RATE / 3600
    out["false_wakes"] = false
    out["false_wakes_per_hour"] = round(false / hours, 2)
    out["non_wake_minutes"] = round(hours * 60, 1)
    out["spot_real_time_factor"] = round((time.perf_counter() - started) / (hours * 3600), 4)
    return out


def choose(curve: list[dict], goal_snr: str, max_per_hour: float) -> dict:
    """The tuning point with the best success at ``goal_snr`` among those within the false-wake
    goal (ties: the larger threshold, fewer false wakes), else the fewest false wakes."""
    within = [p for p in curve if p["false_wakes_per_hour"] <= max_per_hour]
    if within:
        return max(within, key=lambda p: (p[goal_snr]["success_rate"], p["threshold"]))
    return min(curve, key=lambda p: (p["false_wakes_per_hour"], -p[goal_snr]["success_rate"]))


def run_wake(
    phrase: str,
    rows: list[dict],
    other: list[str],
    snrs: list[float],
    n: int,
    minutes: float,
    tune_minutes: float,
    thresholds: list[float],
    seed: int,
) -> dict:
    """The ``wake`` section: tune on one set, report the chosen threshold on another.

    ``rows``: the eval requests (test commands and non-wake speech); ``other``: further
    sentences (training requests), split in two halves: tuning and test."""
    started = time.time()
    half = len(other) // 2
    tune_text, test_text = other[:half], other[half:]
    eval_text = [r.get("spoken", r["utterance"]) for r in rows]
    goal = f"{min(snrs):g}"
    tune = {
        "clips": wake_clips(phrase, tune_text, TUNE_SPEAKERS, n),
        "non_wake": non_wake_audio(
            tune_text + OTHER_SENTENCES[::2], TUNE_SPEAKERS, tune_minutes, seed + 10
        ),
        "source": NoiseSource(babble_bank(test_text, BABBLE_VOICES, 60.0, seed + 11), seed + 12),
    }
    curve = []
    for threshold in thresholds:
        point = {
            "threshold": threshold,
            **measure(
                phrase, threshold, tune["clips"], tune["non_wake"], snrs, tune["source"], seed + 13
            ),
        }
        curve.append(point)
        log.info("wake tuning %g: %s", threshold, point)
    chosen = choose(curve, goal, 1.0)["threshold"]
    test_clips = wake_clips(phrase, eval_text, SPEAKERS, n)
    test_non_wake = non_wake_audio(
        eval_text + test_text + OTHER_SENTENCES[1::2], SPEAKERS, minutes, seed + 20
    )
    test_source = NoiseSource(
        babble_bank(tune_text, BABBLE_VOICES[::-1], 60.0, seed + 21), seed + 22
    )
    result = measure(phrase, chosen, test_clips, test_non_wake, snrs, test_source, seed + 23)
    hours = len(test_non_wake) / SAMPLE_RATE / 3600
    test_curve = {  # after the choice, for the record: how the tuning set's counts carried over
        f"{t:g}": round(len(WakeWordSpotter(phrase, t).spot(test_non_wake)) / hours, 2)
        for t in thresholds
    }
    return {
        **result,
        "threshold": chosen,
        "test_false_wakes_per_hour": test_curve,
        "phrase": phrase,
        "tuning": [
            {
                k: (p[k]["success_rate"] if isinstance(p.get(k), dict) else p[k])
                for k in p
                if k not in ("non_wake_minutes", "spot_real_time_factor")
            }
            for p in curve
        ],
        "setup": {
            "clips_per_snr_per_kind": n,
            "success": "first detection ends between the phrase's start and 0.5 s after its end",
            "tuning_set": f"{n} clips, {TUNE_SPEAKERS}, {tune_minutes:g} min of non-wake "
            "speech (training requests, other sentences)",
            "test_set": f"{n} clips, {SPEAKERS}, eval requests; {minutes:g} min of non-wake "
            "speech (eval and other training requests, other sentences)",
            "seconds": round(time.time() - started, 1),
        },
    }


def run_sections(args, rows: list[dict], sections: set[str], data_dir: Path, scorer) -> dict:
    """The sections asked for by bench/voice.py's ``args``; ``scorer`` as in run_noise."""
    out: dict = {}
    snrs = [float(x) for x in args.noise.split(",")]
    train = data_dir / "train.jsonl"
    lines = train.read_text().splitlines() if train.is_file() else []
    other = [json.loads(x) for x in lines if x.strip()]
    other = [r.get("spoken", r["utterance"]) for r in other if r.get("kind") != "multi_turn"]
    other = other or [r.get("spoken", r["utterance"]) for r in rows[args.noise_n :]]
    machine = {"cpu": cpu_name(), "cores": os.cpu_count()}
    if "noise" in sections:
        out["noise"] = run_noise(
            args.bundle, args.grammar, rows, snrs, args.noise_n, args.seed, other, scorer
        )
        out["noise"]["setup"] |= machine
    if "wake" in sections:
        thresholds = [float(x) for x in args.wake_thresholds.split(",")]
        out["wake"] = run_wake(
            args.wake_phrase,
            rows,
            other,
            snrs,
            args.wake_n,
            args.wake_minutes,
            args.wake_tune_minutes,
            thresholds,
            args.seed,
        )
        out["wake"]["setup"] |= machine
    return out
