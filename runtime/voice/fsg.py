"""A JSGF grammar's finite-state form, walked word by word: can a transcript go on?

pocketsphinx compiles the grammar to an FSG (``FsgModel``); its Python API can tell whether
a whole sentence is accepted but not whether more words may follow. The endpoint needs the
latter: "turn on the kitchen lights" is a whole command that may still go on ("... and
close the window"), while "... and close the window" is a whole command after which the
grammar allows nothing, so the turn can end after a shorter silence. This module reads the
FSG text pocketsphinx writes (``TRANSITION from to prob [word]``; no word: a null
transition) and walks it as a nondeterministic automaton.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path


def _is_filler(word: str) -> bool:
    return word.startswith(("<", "[", "+"))  # <sil>, [NOISE], +SPN+: not words of the grammar


class GrammarAutomaton:
    """The word transitions of a pocketsphinx FSG (``from_fsg``) or of FSG text."""

    def __init__(self, fsg_text: str) -> None:
        self.start = 0
        self.final: set[int] = set()
        self._words: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        self._nulls: dict[int, list[int]] = defaultdict(list)
        for line in fsg_text.splitlines():
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "START_STATE":
                self.start = int(parts[1])
            elif parts[0] == "FINAL_STATE":
                self.final.add(int(parts[1]))
            elif parts[0] == "TRANSITION" and len(parts) == 4:
                self._nulls[int(parts[1])].append(int(parts[2]))
            elif parts[0] == "TRANSITION" and len(parts) == 5 and not _is_filler(parts[4]):
                self._words[int(parts[1])][parts[4]].append(int(parts[2]))
        if not self.final:
            raise ValueError("the FSG has no FINAL_STATE: not a grammar pocketsphinx wrote")

    @classmethod
    def from_fsg(cls, fsg) -> GrammarAutomaton:
        """From a pocketsphinx ``FsgModel`` (it can only write itself to a file)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "grammar.fsg"
            fsg.writefile(str(path))
            return cls(path.read_text(encoding="utf-8"))

    def _closure(self, states: set[int]) -> set[int]:
        todo, seen = list(states), set(states)
        while todo:
            for nxt in self._nulls.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    def states_after(self, text: str) -> set[int]:
        """The states ``text``'s words lead to (empty: not a prefix of any sentence)."""
        states = self._closure({self.start})
        for word in text.split():
            states = self._closure(
                {n for s in states for n in self._words.get(s, {}).get(word, ())}
            )
            if not states:
                break
        return states

    def accepts(self, text: str) -> bool:
        return bool(self.states_after(text) & self.final)

    def can_continue(self, text: str) -> bool:
        """Whether some sentence of the grammar starts with ``text`` and goes on."""
        return any(self._words.get(s) for s in self.states_after(text))
