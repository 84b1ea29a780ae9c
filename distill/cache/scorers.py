"""Scorers: the teacher's top-k log-probs of token sequences, from a local model.

A ``Scorer`` maps token-id sequences (each T tokens) to per-sequence (ids [T-1, k], logprobs
[T-1, k]) arrays: row t is the teacher's top-k for the token after token t. ``local_scorer``
runs an HF causal LM; ``moe2edge.distill.served.ServedTeacher`` asks a vLLM / SGLang server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from moe2edge.distill.data import encode_rows
from moe2edge.distill.errors import DistillError
from moe2edge.distill.teacher import teacher_device

Scorer = Callable[[list[list[int]]], list[tuple[np.ndarray, np.ndarray]]]


def topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k log-probs and ids of ``logits`` [..., V] in float32, precise near 0.

    ``values - logsumexp`` would round the top log-prob to the ulp of the logits (~1e-6), which
    is more than a trained teacher's tail mass; here it is ``-log1p(sum of the other probs)``.
    """
    logits = logits.float()
    values, ids = logits.topk(k, dim=-1)
    top = values[..., :1]
    rest = (logits - top).exp().scatter_(-1, ids[..., :1], 0.0).sum(-1, keepdim=True)
    return (values - top) - torch.log1p(rest), ids


def local_scorer(model: torch.nn.Module, k: int, batch_size: int = 8) -> Scorer:
    """A Scorer running an HF causal LM: right-padded batches, no grad, float32 top-k."""
    vocab = model.config.vocab_size
    if not 1 <= k <= vocab:
        raise DistillError(f"k={k} must be between 1 and the teacher's vocabulary size {vocab}")
    device = teacher_device(model)

    @torch.no_grad()
    def score(seqs: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for a in range(0, len(seqs), batch_size):
            chunk = seqs[a : a + batch_size]
            width = max(len(s) for s in chunk)
            input_ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, s in enumerate(chunk):
                input_ids[row, : len(s)] = torch.tensor(s)
                mask[row, : len(s)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            for row, s in enumerate(chunk):
                lps, ids = topk_logprobs(logits[row, : len(s) - 1], k)
                out.append((ids.cpu().numpy().astype(np.int32), lps.cpu().numpy()))
        return out

    return score


def score_local(
    model: torch.nn.Module,
    tokenizer,
    rows: Sequence[dict | list[int]],
    k: int,
    max_seq_len: int = 64,
    batch_size: int = 8,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Top-k (ids int32 [T-1, k], logprobs float32 [T-1, k]) for data set rows or id lists."""
    seqs = [
        r if isinstance(r, list) else encode_rows(tokenizer, [r], max_seq_len)[0][0] for r in rows
    ]
    return local_scorer(model, k, batch_size)(seqs)
