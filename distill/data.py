"""Data sets to training batches: prompt/reply, chat and plain-text JSONL rows.

Row formats (one JSON object per line, read by ``moe2edge.rows.read_rows``):

- ``{"prompt": ..., "reply": ...}`` -- the demo format; only the reply is learnt.
- ``{"messages": [{"role": "user", "content": ...}, ..., {"role": "assistant", ...}]}`` --
  chat; everything before the last assistant turn is rendered with the tokenizer's chat
  template as the prompt, and the last assistant turn is learnt.
- ``{"text": ...}`` -- plain text; every token is learnt.

Batches are a pure function of (seed, step): see ``batch_indices``. That is what makes resume
exact and lets every rank of a distributed run pick its slice without talking to the others.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moe2edge.distill.errors import DistillError
from moe2edge.rows import RowError, read_rows, row_form

IGNORE_INDEX = -100

Example = tuple[list[int], list[int]]  # (token ids, labels with IGNORE_INDEX on the prompt)


def read_data(path: str | Path, limit: int | None = None) -> list[dict]:
    """The rows of a JSONL data set (``moe2edge.rows.read_rows``); bad data is a DistillError."""
    try:
        return read_rows(path, limit)
    except RowError as exc:
        raise DistillError(str(exc)) from exc


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """``<bos> prompt``, tokenised on its own exactly as the runtime encodes it at inference
    (an empty prompt is ``<bos>`` alone)."""
    return [tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)


def encode_example(tokenizer, prompt: str, reply: str, max_len: int) -> Example:
    """Token ids and labels for ``<bos> prompt reply <end>``; only the reply is learnt.

    The prompt is encoded on its own, so the token boundary between prompt and reply is the
    one the model will see at inference. An empty prompt (plain text) learns every token.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    sep = " " if prompt else ""
    reply_ids = tokenizer.encode(sep + reply, add_special_tokens=False) + [tokenizer.eos_token_id]
    ids = (prompt_ids + reply_ids)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + reply_ids)[:max_len]
    return ids, labels


def row_prompt_reply(tokenizer, row: dict, where: str = "row") -> tuple[str, str]:
    """(prompt, reply) of a data set row in any of the supported formats."""
    try:
        form = row_form(row, where)
    except RowError as exc:
        raise DistillError(str(exc)) from exc
    if form == "prompt+reply":
        return str(row["prompt"]), str(row["reply"])
    if form == "messages":
        messages = row["messages"]
        if messages[-1].get("role") != "assistant":
            raise DistillError(f"{where}: a chat row must end with an assistant message")
        if not getattr(tokenizer, "chat_template", None):
            raise DistillError(
                f"{where} is a chat row but the tokenizer has no chat template; add one to "
                "tokenizer_config.json or convert the data to prompt/reply rows"
            )
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False)
        return prompt, str(messages[-1]["content"])
    return "", str(row["text"])


def encode_rows(tokenizer, rows: list[dict], max_len: int) -> list[Example]:
    out = []
    for n, row in enumerate(rows):
        prompt, reply = row_prompt_reply(tokenizer, row, f"data set row {n + 1}")
        out.append(encode_example(tokenizer, prompt, reply, max_len))
    return out


def prompt_part(example: Example) -> list[int]:
    """The prompt ids of an encoded example (the leading positions that are not learnt)."""
    ids, labels = example
    n = 0
    while n < len(labels) and labels[n] == IGNORE_INDEX:
        n += 1
    return ids[: max(n, 1)]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; labels are aligned to logits (already shifted)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab) - 1] = torch.tensor(lab[1:])  # target for position t is token t+1
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def batch_indices(step: int, batch_size: int, num_examples: int, seed: int) -> list[int]:
    """The examples of global step ``step``: a seeded permutation per epoch.

    The data position is therefore just the step number, which makes resume exact.
    """
    start = step * batch_size
    indices = []
    while len(indices) < batch_size:
        epoch, offset = divmod(start + len(indices), num_examples)
        order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch))
        take = min(batch_size - len(indices), num_examples - offset)
        indices.extend(order[offset : offset + take].tolist())
    return indices


def micro_batches(
    indices: list[int], rank: int, world_size: int, grad_accum_steps: int
) -> list[list[int]]:
    """This rank's share of a global batch, split into ``grad_accum_steps`` micro-batches.

    Rank r takes the r-th contiguous block of the global batch; the global batch size must
    divide evenly so every rank does the same number of forward/backward passes.
    """
    parts = world_size * grad_accum_steps
    if len(indices) % parts:
        raise DistillError(
            f"batch_size={len(indices)} is not divisible by world size {world_size} x "
            f"grad_accum_steps {grad_accum_steps}; pick a batch_size that is a multiple of "
            f"{parts}"
        )
    per_rank = len(indices) // world_size
    mine = indices[rank * per_rank : (rank + 1) * per_rank]
    size = per_rank // grad_accum_steps
    return [mine[i * size : (i + 1) * size] for i in range(grad_accum_steps)]
