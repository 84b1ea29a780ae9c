"""Speech recognition backends for the voice pipeline, and a registry to pick one by name.

A backend implements `Recognizer`: `start_utterance()`, then `feed(audio)` for each frame as
it arrives (it decodes there, so `finish()` has little left to do), then `finish()` for the
final transcript. Audio is 16 kHz mono, as PCM16 little-endian bytes or a float32 array.
Two optional methods feed predictive endpointing (runtime/voice/endpoint.py):
`hypothesis()` (the current best text, unthrottled), `is_complete(text)` (whether the
text is a whole command of the backend's grammar; None when it cannot tell) and
`can_continue(text)` (whether the grammar allows more words after it; None: cannot tell).

The built-in backend is `PocketsphinxRecognizer` (pocketsphinx 5 with its bundled en-US model,
best with a JSGF grammar of the commands a device expects).

Adding another backend, e.g. sherpa-onnx (not shipped: its models cannot be downloaded here):

    class SherpaOnnxRecognizer:
        def __init__(self, model_dir: str) -> None:
            import sherpa_onnx
            self._rec = sherpa_onnx.OnlineRecognizer.from_transducer(
                tokens=f"{model_dir}/tokens.txt", encoder=..., decoder=..., joiner=...,
                sample_rate=16000)
        def start_utterance(self) -> None:
            self._stream = self._rec.create_stream()
        def feed(self, audio) -> str | None:
            self._stream.accept_waveform(16000, as_float32(audio))
            while self._rec.is_ready(self._stream):
                self._rec.decode_stream(self._stream)
            return self._rec.get_result(self._stream) or None
        def finish(self) -> str:
            self._stream.input_finished()
            while self._rec.is_ready(self._stream):
                self._rec.decode_stream(self._stream)
            return self._rec.get_result(self._stream)

    register_recognizer("sherpa-onnx", SherpaOnnxRecognizer)
    asr = make_recognizer("sherpa-onnx", model_dir="/opt/models/zipformer")
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from moe2edge.runtime.voice.audio import SAMPLE_RATE, as_pcm16
from moe2edge.runtime.voice.fsg import GrammarAutomaton

logger = logging.getLogger(__name__)

AudioInput = bytes | bytearray | memoryview | np.ndarray


@runtime_checkable
class Recognizer(Protocol):
    """What the voice service needs from a speech recognizer."""

    def start_utterance(self) -> None:
        """Begin a new utterance, discarding any unfinished one."""
        ...

    def feed(self, audio: AudioInput) -> str | None:
        """Decode a frame of 16 kHz mono audio; return a new partial hypothesis or None."""
        ...

    def finish(self) -> str:
        """End the utterance and return the final transcript ("" when nothing was heard)."""
        ...


_JSGF_NON_WORDS = re.compile(r"<[^>]*>|\{[^}]*\}|/[^/]*/|[()\[\]|*+=;]")


def grammar_words(jsgf: str) -> list[str]:
    """The words (terminals) a JSGF grammar uses, lower-cased, in first-seen order.

    A rough scan (rule names, tags, weights and operators removed) used to name the words a
    dictionary lacks when pocketsphinx rejects a grammar (pocketsphinx parses the grammar
    itself; this only has to find words for the error message, so no JSGF parser is kept).
    """
    body = re.sub(r"//[^\n]*|/\*.*?\*/", " ", jsgf, flags=re.S)
    lines = [
        line
        for line in body.split(";")
        if not re.match(r"\s*(#JSGF|grammar\s|import\s)", line, flags=re.I)
    ]
    seen: dict[str, None] = {}
    for line in lines:
        rhs = line.split("=", 1)[1] if "=" in line else ""
        for token in _JSGF_NON_WORDS.sub(" ", rhs).split():
            if token.lower() != "public":
                seen.setdefault(token.lower(), None)
    return list(seen)


class PocketsphinxRecognizer:
    """pocketsphinx 5 decoding audio as it arrives, optionally constrained by a JSGF grammar.

    grammar_path / grammar: a JSGF file or its text. Without one the bundled general en-US
    language model is used (poor on short commands; a grammar is strongly recommended).
    fwdflat and bestpath (second passes run at the end of the utterance) are off by default so
    the final result is ready within milliseconds of the last frame.
    partial_interval_ms: at most one partial hypothesis per this much audio fed.
    """

    def __init__(
        self,
        grammar_path: str | Path | None = None,
        grammar: str | None = None,
        hmm_path: str | Path | None = None,
        dict_path: str | Path | None = None,
        partial_interval_ms: float = 100.0,
        fwdflat: bool = False,
        bestpath: bool = False,
        loglevel: str = "FATAL",
        **config: Any,
    ) -> None:
        try:
            import pocketsphinx
        except ImportError as exc:
            raise ImportError(
                "the pocketsphinx recognizer needs pocketsphinx: pip install 'pocketsphinx>=5'"
            ) from exc
        if grammar_path is not None and grammar is not None:
            raise ValueError("give grammar_path or grammar, not both")
        if grammar_path is not None:
            path = Path(grammar_path)
            if not path.is_file():  # pocketsphinx crashes the process on a missing file
                raise FileNotFoundError(f"JSGF grammar file not found: {path}")
            grammar = path.read_text(encoding="utf-8")
        kwargs: dict[str, Any] = {
            "samprate": SAMPLE_RATE,
            "fwdflat": fwdflat,
            "bestpath": bestpath,
            "loglevel": loglevel,
            **config,
        }
        if hmm_path is not None:
            kwargs["hmm"] = str(hmm_path)
        if dict_path is not None:
            kwargs["dict"] = str(dict_path)
        if grammar is not None:
            kwargs["lm"] = None
        started = time.perf_counter()
        self._decoder = pocketsphinx.Decoder(**kwargs)
        self._fsg = None  # the grammar's finite-state form, for is_complete
        self._automaton: GrammarAutomaton | None = None  # the same, walkable: can_continue
        if grammar is not None:
            self._load_grammar(grammar)
        logger.info(
            "pocketsphinx ready in %.0f ms (%s)",
            1000 * (time.perf_counter() - started),
            "JSGF grammar" if grammar is not None else "general language model",
        )
        self.partial_interval_samples = int(partial_interval_ms * SAMPLE_RATE / 1000)
        self._in_utterance = False
        self._samples = 0
        self._next_partial_at = 0
        self._last_partial = ""

    def _load_grammar(self, grammar: str) -> None:
        try:
            self._decoder.add_jsgf_string("grammar", grammar)
        except ValueError as exc:
            missing = [w for w in grammar_words(grammar) if self._decoder.lookup_word(w) is None]
            if missing:
                raise ValueError(
                    f"JSGF grammar uses words missing from the pronunciation dictionary: "
                    f"{', '.join(missing)} (spell numbers as words, use lower case, or pass "
                    "dict_path= to a dictionary that has them)"
                ) from exc
            raise ValueError(f"JSGF grammar could not be parsed by pocketsphinx: {exc}") from exc
        self._decoder.activate_search("grammar")
        self._fsg = self._decoder.get_fsg("grammar")
        self._automaton = _automaton_of(grammar, self._fsg)

    @property
    def in_utterance(self) -> bool:
        return self._in_utterance

    def start_utterance(self) -> None:
        if self._in_utterance:
            logger.debug("start_utterance with one open: discarding it")
            self._decoder.end_utt()
        self._decoder.start_utt()
        self._in_utterance = True
        self._samples = 0
        self._next_partial_at = self.partial_interval_samples
        self._last_partial = ""

    def feed(self, audio: AudioInput) -> str | None:
        """Decode this frame now; every partial_interval_ms of audio, return the hypothesis if it
        changed since the last one returned (else None)."""
        if not self._in_utterance:
            raise RuntimeError("feed() before start_utterance(): start an utterance first")
        pcm = as_pcm16(audio)
        if not pcm:
            return None
        self._decoder.process_raw(pcm, False, False)
        self._samples += len(pcm) // 2
        if self._samples < self._next_partial_at:
            return None
        self._next_partial_at = self._samples + self.partial_interval_samples
        hyp = self._decoder.hyp()
        text = hyp.hypstr if hyp is not None else ""
        if not text or text == self._last_partial:
            return None
        self._last_partial = text
        return text

    def hypothesis(self) -> str:
        """The best hypothesis of the audio fed so far (not throttled; "" before any)."""
        if not self._in_utterance:
            return ""
        hyp = self._decoder.hyp()
        return hyp.hypstr if hyp is not None else ""

    def is_complete(self, text: str) -> bool | None:
        """Is ``text`` a whole sentence of the grammar (its FSG ends in a final state)?
        None without a grammar (the general language model cannot tell)."""
        if self._fsg is None:
            return None
        return bool(text.strip()) and bool(self._fsg.accept(" ".join(text.split())))

    def can_continue(self, text: str) -> bool | None:
        """Does the grammar allow more words after ``text``? False for a whole command
        nothing can follow ("... and close the window"); None without a grammar."""
        if self._automaton is None:
            return None
        return self._automaton.can_continue(" ".join(text.split()))

    def finish(self) -> str:
        if not self._in_utterance:
            raise RuntimeError("finish() without an utterance: call start_utterance() first")
        self._decoder.end_utt()
        self._in_utterance = False
        hyp = self._decoder.hyp()
        text = hyp.hypstr if hyp is not None else ""
        logger.debug("final transcript %r after %d samples", text, self._samples)
        return text


_AUTOMATA: dict[str, GrammarAutomaton] = {}  # by grammar text


def _automaton_of(grammar: str, fsg) -> GrammarAutomaton:
    """One automaton per grammar (~0.1 s to build for the demo's): the recognizers of a
    server's pool share it."""
    if grammar not in _AUTOMATA:
        if len(_AUTOMATA) >= 8:
            _AUTOMATA.clear()
        _AUTOMATA[grammar] = GrammarAutomaton.from_fsg(fsg)
    return _AUTOMATA[grammar]


RecognizerFactory = Callable[..., Recognizer]

_REGISTRY: dict[str, RecognizerFactory] = {"pocketsphinx": PocketsphinxRecognizer}


def register_recognizer(name: str, factory: RecognizerFactory) -> None:
    """Make `make_recognizer(name, **opts)` build `factory(**opts)` (a class or function)."""
    _REGISTRY[name] = factory


def available_recognizers() -> list[str]:
    return sorted(_REGISTRY)


def make_recognizer(name: str = "pocketsphinx", **opts: Any) -> Recognizer:
    """Build the recognizer registered under `name` with backend options `opts`."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown recognizer {name!r}: registered are {', '.join(available_recognizers())}; "
            "add one with moe2edge.runtime.voice.asr.register_recognizer(name, factory)"
        ) from None
    return factory(**opts)
