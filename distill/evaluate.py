"""Greedy replies from a PyTorch model and the demo task's accuracy."""

from __future__ import annotations

import torch
from tqdm import tqdm

from distill.demo_data import extract_action


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """``<bos> prompt``, tokenised the way training and the runtime do it."""
    return [tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)


@torch.no_grad()
def greedy_replies(
    model, tokenizer, prompts: list[str], max_new_tokens: int = 40, desc: str = "generate"
) -> list[list[int]]:
    """Greedy token ids after each prompt (batch 1, KV cache), stopping at end-of-turn.

    A plain loop over ``model(...)`` rather than ``generate``: on tiny models HF's
    generate spends most of its time in per-step bookkeeping.
    """
    model.eval()
    eos = tokenizer.eos_token_id
    outputs = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batch-1 steps on tiny models: threads only add overhead
    try:
        for prompt in tqdm(prompts, desc=desc, unit="prompt", mininterval=2.0):
            ids = torch.tensor([prompt_ids(tokenizer, prompt)])
            out = model(input_ids=ids, use_cache=True)
            new: list[int] = []
            for _ in range(max_new_tokens):
                token = int(out.logits[0, -1].argmax())
                if token == eos:
                    break
                new.append(token)
                out = model(
                    input_ids=torch.tensor([[token]]),
                    past_key_values=out.past_key_values,
                    use_cache=True,
                )
            outputs.append(new)
    finally:
        torch.set_num_threads(threads)
    return outputs


def task_accuracy(replies: list[str], rows: list[dict]) -> float:
    """Share of replies whose action part equals the reference action exactly."""
    if not rows:
        return 0.0
    hits = sum(
        extract_action(reply) == row["action"] for reply, row in zip(replies, rows, strict=True)
    )
    return hits / len(rows)


def evaluate_model(
    model, tokenizer, rows: list[dict], max_new_tokens: int = 40, desc: str = "evaluate"
) -> dict:
    ids = greedy_replies(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, desc)
    texts = [tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]
    return {"task_acc": task_accuracy(texts, rows), "token_ids": ids, "texts": texts}
