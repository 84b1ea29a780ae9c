"""Turning prompt/reply rows into padded training batches with the prompt masked out."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def encode_example(tokenizer, prompt: str, reply: str, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels for ``<bos> prompt reply <end>``; only the reply is learnt.

    The prompt is encoded on its own, exactly as the runtime encodes it at inference,
    so the token boundary between prompt and reply is the one the model will see.
    """
    prompt_ids = [tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)
    reply_ids = tokenizer.encode(" " + reply, add_special_tokens=False) + [tokenizer.eos_token_id]
    ids = (prompt_ids + reply_ids)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + reply_ids)[:max_len]
    return ids, labels


def encode_rows(tokenizer, rows: list[dict], max_len: int) -> list[tuple[list[int], list[int]]]:
    return [encode_example(tokenizer, r["prompt"], r["reply"], max_len) for r in rows]


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
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
