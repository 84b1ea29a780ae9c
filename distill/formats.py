"""Text conventions the stage shares: conversation markers and the action span of a reply.

The tokenizers ``moe2edge distill tokenizer`` trains know these markers as special tokens
and render chats with them (``tokenizer.train_tokenizer``); the demo data set is written in
this format (``demo_data``); the task-accuracy metric (``evaluate.task_accuracy``) compares
the action span a reply starts with, e.g. ``[lights.on room=kitchen]``, with a row's
``action``. Stdlib only, so the demo-data generator stays light.
"""

from __future__ import annotations

import re

BOS = "<bos>"
PAD = "<pad>"
UNK = "<unk>"
USER_PREFIX = "<|user|>"
ASSISTANT_PREFIX = "<|assistant|>"
END_OF_TURN = "<|end|>"
# The order fixes the ids (0 = pad, 1 = bos, 2 = end of turn, ...): do not reorder.
SPECIAL_TOKENS = [PAD, BOS, END_OF_TURN, USER_PREFIX, ASSISTANT_PREFIX, UNK]
# The demo tokenizer's special ids as model-config fields (a preset student's default).
DEMO_TOKEN_IDS = {
    "bos_token_id": SPECIAL_TOKENS.index(BOS),
    "eos_token_id": SPECIAL_TOKENS.index(END_OF_TURN),
    "pad_token_id": SPECIAL_TOKENS.index(PAD),
}

_ACTION = re.compile(r"\[[^\]]*\]")


def format_prompt(utterance: str) -> str:
    """The text the model sees before it replies (also stored in the bundle manifest)."""
    return f"{USER_PREFIX} {utterance} {ASSISTANT_PREFIX}"


def extract_action(reply: str) -> str | None:
    """The action part of a reply, e.g. ``[lights.on room=kitchen]``; None if absent."""
    match = _ACTION.search(reply)
    return match.group(0) if match else None


def format_context(turns: list[tuple[str, str]], utterance: str) -> str:
    """The prompt after earlier (utterance, reply) turns: what the demo tokenizer's chat
    template renders for that conversation with the generation prompt."""
    history = "".join(f"{format_prompt(u)} {r}{END_OF_TURN}" for u, r in turns)
    return history + format_prompt(utterance)


def extract_actions(reply: str) -> list[str]:
    """Every action span of a reply, in order (a compound command has several)."""
    return _ACTION.findall(reply)
