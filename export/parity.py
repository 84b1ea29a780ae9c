"""Parity between the PyTorch student and its ONNX Runtime bundle.

For each prompt the runtime decodes greedily through its KV cache, keeping the logits of
every step; PyTorch then scores the same token sequence in one forward pass. Comparing
the two gives the largest logit difference (prefill and decode positions alike) and an
exact greedy-match test: the runtime's output equals PyTorch's greedy output token for
token iff PyTorch's argmax agrees at every step, including where the runtime stopped.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from moe2edge.runtime.generate import Generator


def decode_room(engine, prompt_ids: list[int]) -> int:
    """How many tokens a greedy decode can choose after ``prompt_ids`` in ``engine``'s
    context (the last one chosen is never fed back, so one more than the free positions)."""
    return engine.max_length - len(prompt_ids) + 1


def runtime_greedy_with_logits(
    generator: Generator, prompt_ids: list[int], max_new_tokens: int
) -> tuple[list[int], np.ndarray, bool]:
    """Greedy tokens, the logits before each choice ([steps, vocab]), and whether it hit eos;
    at most as many tokens as the context has room for after the prompt."""
    engine = generator.engine
    max_new_tokens = min(max_new_tokens, decode_room(engine, prompt_ids))
    cache = engine.new_cache()
    logits = engine.forward(prompt_ids, cache)
    steps, tokens = [], []
    for _ in range(max_new_tokens):
        steps.append(logits)
        token = int(np.argmax(logits))
        if token in generator.eos_token_ids:
            return tokens, np.stack(steps), True
        tokens.append(token)
        if len(tokens) == max_new_tokens:
            break
        logits = engine.forward([token], cache)
    return tokens, np.stack(steps), False


def check_parity(
    model, generator: Generator, prompts: list[str], max_new_tokens: int | None = None
) -> dict:
    """Compare ``model`` (PyTorch, fp32) with ``generator``'s bundle on ``prompts``."""
    import torch  # only here: the greedy loop above is shared with the torch-free report

    model.eval()
    max_new_tokens = max_new_tokens or generator.default_max_new_tokens
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    max_diff, matches, per_prompt = 0.0, 0, []
    try:
        for prompt in tqdm(prompts, desc="parity", unit="prompt", mininterval=2.0):
            prompt_ids = generator.encode_prompt(prompt)
            tokens, ort_logits, hit_eos = runtime_greedy_with_logits(
                generator, prompt_ids, max_new_tokens
            )
            sequence = torch.tensor([prompt_ids + tokens])
            with torch.no_grad():
                torch_logits = model(input_ids=sequence).logits[0].float().numpy()
            # logits that chose token i sit at position len(prompt) - 1 + i
            start = len(prompt_ids) - 1
            aligned = torch_logits[start : start + len(ort_logits)]
            max_diff = max(max_diff, float(np.abs(aligned - ort_logits).max()))
            chosen = tokens + ([int(np.argmax(ort_logits[-1]))] if hit_eos else [])
            torch_choice = aligned.argmax(-1)[: len(chosen)]
            same = bool((torch_choice == np.asarray(chosen)).all())
            matches += same
            per_prompt.append({"prompt": prompt, "tokens": tokens, "greedy_match": same})
    finally:
        torch.set_num_threads(threads)
    return {
        "max_abs_logit_diff": max_diff,
        "greedy_match_rate": matches / max(1, len(prompts)),
        "prompts": len(prompts),
        "per_prompt": per_prompt,
    }
