"""Wake-word spotting: pocketsphinx 5's keyphrase search over the incoming audio.

In wake mode (the ``wake_word`` setting) the voice pipeline ignores speech until this
spotter hears the phrase; the next utterance (or the rest of the same one) is the command.
The spotter runs a decoder of its own (the bundled en-US acoustic model and dictionary,
no language model) with one keyphrase; ``threshold`` is pocketsphinx's ``kws_threshold``:
smaller (1e-40) spots more often, noisy speech included, and false-wakes more, larger
(1e-5) misses more. bench/voice.py ``--sections wake`` measures both (the default, 1e-40,
was chosen there on a tuning set; see runtime/voice/settings.py and docs/service.md).
"""

from __future__ import annotations

import logging
import re
from collections import deque
from typing import Any

from moe2edge.runtime.voice.asr import AudioInput
from moe2edge.runtime.voice.audio import SAMPLE_RATE, as_pcm16

log = logging.getLogger(__name__)

FRAME_RATE = 100  # pocketsphinx's feature frames per second
MAX_UTTERANCE_S = 30.0  # the search restarts after this much audio without a detection


def normalize_phrase(phrase: str) -> str:
    """Lower-case words separated by single spaces ("Hey, Robot!" -> "hey robot")."""
    return " ".join(re.sub(r"[^\w' ]+", " ", phrase.lower()).split())


class WakeWordSpotter:
    """Spots one keyphrase in a stream of 16 kHz mono audio.

    ``feed(audio)`` returns the stream sample where the phrase ended when it has just been
    spotted, else None (the search then restarts, so one saying counts once). Samples count
    from the first one fed; ``reset()`` drops a half-heard phrase without moving the count.
    """

    def __init__(self, phrase: str, threshold: float = 1e-20, **config: Any) -> None:
        import pocketsphinx

        self.phrase = normalize_phrase(phrase)
        if not self.phrase:
            raise ValueError("the wake word is empty: give a phrase such as 'hey robot'")
        self.threshold = threshold
        self._decoder = pocketsphinx.Decoder(
            samprate=SAMPLE_RATE, lm=None, loglevel="FATAL", **config
        )
        missing = [w for w in self.phrase.split() if self._decoder.lookup_word(w) is None]
        if missing:
            raise ValueError(
                f"wake word {phrase!r} uses words missing from the pronunciation dictionary: "
                f"{', '.join(missing)} (spell numbers as words; pick a phrase of common words)"
            )
        self._decoder.config["kws_threshold"] = float(threshold)
        self._decoder.add_keyphrase("wake", self.phrase)
        self._decoder.activate_search("wake")
        self._samples = 0  # samples fed in all
        self._utt_origin = 0  # stream sample where the current search began
        self._open = False

    @property
    def samples(self) -> int:
        return self._samples

    def reset(self) -> None:
        """Forget the audio so far (the next feed starts a fresh search)."""
        if self._open:
            self._decoder.end_utt()
            self._open = False

    def feed(self, audio: AudioInput) -> int | None:
        pcm = as_pcm16(audio)
        if not pcm:
            return None
        if not self._open or self._samples - self._utt_origin > MAX_UTTERANCE_S * SAMPLE_RATE:
            self.reset()
            self._decoder.start_utt()
            self._open, self._utt_origin = True, self._samples
        self._decoder.process_raw(pcm, False, False)
        self._samples += len(pcm) // 2
        if self._decoder.hyp() is None:
            return None
        end_frame = max((seg.end_frame for seg in self._decoder.seg()), default=-1)
        end = self._utt_origin + (end_frame + 1) * SAMPLE_RATE // FRAME_RATE
        if end_frame < 0:
            end = self._samples
        self.reset()
        log.debug("wake word %r spotted, ending at sample %d", self.phrase, end)
        return min(end, self._samples)

    def spot(self, audio: AudioInput, chunk: int = 320) -> list[int]:
        """Every detection in ``audio`` (fed in ``chunk``-sample frames): end samples."""
        pcm = as_pcm16(audio)
        hits = []
        for i in range(0, len(pcm), 2 * chunk):
            end = self.feed(pcm[i : i + 2 * chunk])
            if end is not None:
                hits.append(end)
        return hits


class WakeGate:
    """The voice pipeline's gate in wake mode: closed, the audio goes to the spotter; once
    the phrase is spotted it is open (``awake``) until a command's utterance has ended or
    ``timeout_ms`` pass without one. It keeps the last ``keep_ms`` of audio, so the rest of
    the utterance the phrase was spoken in can go to the recognizer."""

    def __init__(
        self, phrase: str, threshold: float, timeout_ms: float = 5000.0, keep_ms: float = 3000.0
    ) -> None:
        self.spotter = WakeWordSpotter(phrase, threshold)
        self.timeout_samples = int(timeout_ms * SAMPLE_RATE / 1000)
        self.keep_samples = int(keep_ms * SAMPLE_RATE / 1000)
        self.awake = False
        self._until = 0
        self._recent: deque[tuple[int, bytes]] = deque()  # (stream start sample, pcm)
        self._kept = 0

    @property
    def phrase(self) -> str:
        return self.spotter.phrase

    def feed(self, pcm: bytes, end_sample: int, busy: bool) -> int | None:
        """The frame ending at stream sample ``end_sample``; ``busy``: an utterance is open.
        Returns the stream sample where the phrase ended when it was just spotted."""
        self._recent.append((end_sample - len(pcm) // 2, pcm))
        self._kept += len(pcm) // 2
        while self._kept - len(self._recent[0][1]) // 2 >= self.keep_samples:
            self._kept -= len(self._recent.popleft()[1]) // 2
        if self.awake:
            if busy:
                self._until = end_sample + self.timeout_samples
            elif end_sample > self._until:
                self.close()
            return None
        hit = self.spotter.feed(pcm)
        if hit is None:
            return None
        self.awake, self._until = True, end_sample + self.timeout_samples
        return hit + end_sample - self.spotter.samples

    def audio_since(self, sample: int) -> list[bytes]:
        """The kept audio from stream sample ``sample`` on, as frames."""
        out = []
        for start, pcm in self._recent:
            end = start + len(pcm) // 2
            if end > sample:
                out.append(pcm[2 * max(0, sample - start) :])
        return out

    def close(self) -> None:
        self.awake = False
        self.spotter.reset()
