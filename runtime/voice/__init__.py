"""Voice building blocks for the on-device assistant: audio helpers, VAD, ASR and TTS.

Only numpy, onnxruntime, soxr, pydantic, the stdlib, pocketsphinx (imported by its
recognizer), piper-tts (imported by the Piper voice) and the espeak-ng binary are used here: nothing from torch, transformers or
the build packages.
"""

from moe2edge.runtime.voice.asr import (
    PocketsphinxRecognizer,
    Recognizer,
    available_recognizers,
    make_recognizer,
    register_recognizer,
)
from moe2edge.runtime.voice.audio import (
    FRAME_MS,
    FRAME_SAMPLES,
    SAMPLE_RATE,
    float32_to_pcm16,
    pcm16_to_float32,
    read_wav,
    resample,
    validate_frame,
    write_wav,
)
from moe2edge.runtime.voice.piper_tts import PiperSynthesizer, piper_available
from moe2edge.runtime.voice.tts import (
    EspeakSynthesizer,
    PhraseSplitter,
    SpeechChunk,
    Synthesizer,
)
from moe2edge.runtime.voice.vad import SileroVadModel, VadEvent, VoiceActivityDetector
from moe2edge.runtime.voice.voices import make_synthesizer

__all__ = [
    "FRAME_MS",
    "FRAME_SAMPLES",
    "SAMPLE_RATE",
    "EspeakSynthesizer",
    "PhraseSplitter",
    "PiperSynthesizer",
    "PocketsphinxRecognizer",
    "Recognizer",
    "SileroVadModel",
    "SpeechChunk",
    "Synthesizer",
    "VadEvent",
    "VoiceActivityDetector",
    "available_recognizers",
    "float32_to_pcm16",
    "make_recognizer",
    "make_synthesizer",
    "pcm16_to_float32",
    "piper_available",
    "read_wav",
    "register_recognizer",
    "resample",
    "validate_frame",
    "write_wav",
]
