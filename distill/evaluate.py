"""Evaluation: greedy replies and the task's accuracy; held-out distillation metrics.

The task accuracy is the demo task's: rows with an ``action`` field, scored by exact match
of the reply's sequence of action spans (``formats.extract_actions``; a compound command has
several); other data sets have no ``action`` and get ``task_acc`` None. Next to it,
``reply_wellformed``: the share of replies whose spoken part is one the demo domain allows
for the reply's own actions (``demo_domain.is_wellformed``), i.e. what the user hears is a
proper confirmation of what was done.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import torch
from tqdm import tqdm

from moe2edge.distill.data import IGNORE_INDEX, collate, encode_prompt, encode_rows, prompt_part
from moe2edge.distill.demo_domain import is_wellformed
from moe2edge.distill.distributed import all_reduce_sum
from moe2edge.distill.formats import extract_actions
from moe2edge.distill.losses import dense_divergence, sparse_divergence
from moe2edge.distill.modes import sample_replies


def greedy_replies(
    model, tokenizer, prompts: list[str], max_new_tokens: int = 40, desc: str = "generate"
) -> list[list[int]]:
    """Greedy token ids after each prompt, one prompt at a time, end-of-turn dropped.

    ``modes.sample_replies`` at temperature 0 on batches of one: no padding at all, the
    reference the batched evaluation is checked against (tests/test_train_modes.py).
    """
    eos = tokenizer.eos_token_id
    outputs = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batch-1 steps on tiny models: threads only add overhead
    try:
        for prompt in tqdm(prompts, desc=desc, unit="prompt", mininterval=2.0):
            (reply,) = sample_replies(
                model,
                [encode_prompt(tokenizer, prompt)],
                eos_id=eos,
                pad_id=tokenizer.pad_token_id,
                max_new_tokens=max_new_tokens,
            )
            outputs.append(reply[:-1] if reply and reply[-1] == eos else reply)
    finally:
        torch.set_num_threads(threads)
    return outputs


def task_hits(replies: list[str], rows: list[dict]) -> int:
    """How many replies' actions equal the row's reference actions exactly, in order."""
    return sum(
        extract_actions(reply) == extract_actions(row["action"])
        for reply, row in zip(replies, rows, strict=True)
    )


def task_accuracy(replies: list[str], rows: list[dict]) -> float:
    """Share of replies whose actions equal the reference actions exactly, in order."""
    return task_hits(replies, rows) / len(rows) if rows else 0.0


def wellformed_hits(replies: list[str], rows: list[dict]) -> int:
    """How many replies are well formed (``demo_domain.is_wellformed``)."""
    return sum(is_wellformed(reply) for reply, _ in zip(replies, rows, strict=True))


def reply_wellformed(replies: list[str], rows: list[dict]) -> float:
    """Share of replies whose spoken part is one of the domain's reply forms for the reply's
    own (predicted) actions, with their rooms and values; right or wrong actions alike."""
    return wellformed_hits(replies, rows) / len(rows) if rows else 0.0


def evaluate_model(
    model, tokenizer, rows: list[dict], max_new_tokens: int = 40, desc: str = "evaluate"
) -> dict:
    ids = greedy_replies(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, desc)
    texts = [tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]
    return {
        "task_acc": task_accuracy(texts, rows),
        "reply_wellformed": reply_wellformed(texts, rows),
        "token_ids": ids,
        "texts": texts,
    }


def _head_chunks(model, ids: torch.Tensor, valid: torch.Tensor, chunk_size: int, each) -> None:
    """Run ``model`` on ``ids`` and call ``each(start, logits)`` for consecutive chunks of at
    most ``chunk_size`` of the ``valid`` positions (row-major), never holding [B, T, V] logits.

    The model's output embedding (``get_output_embeddings``, the LM head: logits = head(final
    hidden state) in every causal LM we train or distil from) is applied per chunk inside the
    forward, by a pre-hook on the head, where FSDP2 has the head's weights gathered; the head
    itself then computes one position per row.
    """
    head = model.get_output_embeddings()
    inside = False

    def per_chunk(module, args):
        nonlocal inside
        if inside:  # our own calls of the head below
            return None
        inside = True
        try:
            hidden = args[0][valid]
            for start in range(0, hidden.shape[0], chunk_size):
                each(start, module(hidden[start : start + chunk_size]))
        finally:
            inside = False
        return (args[0][:, :1],)

    handle = head.register_forward_pre_hook(per_chunk)
    try:
        model(input_ids=ids, use_cache=False)  # right-padded: no mask needed
    finally:
        handle.remove()


def _final_hidden(model, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The final hidden states [N, H] at the ``valid`` positions (the LM head's input)."""
    hidden = []
    head = model.get_output_embeddings()

    def grab(module, args):
        hidden.append(args[0][valid])
        return (args[0][:, :1],)

    handle = head.register_forward_pre_hook(grab)
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return hidden[0]


def _score_chunk(sums: torch.Tensor, labels, teacher, start: int, logits: torch.Tensor) -> None:
    """Add one chunk's KL, top-1 agreements, CE and token count to ``sums`` (in place).

    ``teacher``: None, (teacher head, its final hidden states) or the cache's (ids, logprobs,
    tail), all at the batch's valid positions; the chunk is ``start:start + len(logits)``.
    """
    z = logits.float()
    end = start + z.shape[0]
    s_logp = torch.log_softmax(z, -1)
    sums[2] += -s_logp.gather(-1, labels[start:end, None]).sum()
    sums[3] += z.shape[0]
    if teacher is None:
        return
    if len(teacher) == 2:  # a live teacher: its logits for the same chunk
        head, hidden = teacher
        t = head(hidden[start:end]).float()
        sums[0] += dense_divergence(s_logp, torch.log_softmax(t, -1)).sum()
        teacher_top1 = t.argmax(-1)
    else:
        top_ids, top_lp, tail = (x[start:end] for x in teacher)
        top_lp = top_lp.float()
        sums[0] += sparse_divergence(z, top_ids, top_lp, "fkl", tail_logprob=tail).sum()
        teacher_top1 = top_ids.gather(-1, top_lp.argmax(-1, keepdim=True)).squeeze(-1)
    sums[1] += (z.argmax(-1) == teacher_top1).sum()


def _my_batches(count: int, batch_size: int, info) -> list[list[int]]:
    """This rank's share of ``range(count)`` (every world_size-th) in batches, padded with empty
    batches so that every rank runs the same number of forwards (FSDP2's collectives)."""
    rank, world = (info.rank, info.world_size) if info is not None else (0, 1)
    mine = list(range(rank, count, world))
    per_rank = -(-count // world)
    return [mine[i : i + batch_size] for i in range(0, per_rank, batch_size)]


@torch.no_grad()
def evaluate_heldout(
    student: torch.nn.Module,
    teacher_or_cache,
    tokenizer,
    rows: list[dict],
    *,
    max_seq_len: int = 64,
    batch_size: int = 16,
    task_limit: int = 50,
    max_new_tokens: int = 40,
    chunk_size: int = 1024,
    cache_indices: list[int] | None = None,
    info=None,
    device: torch.device | str = "cpu",
    autocast=nullcontext,
) -> dict:
    """``{heldout_kl, top1_agreement, perplexity, task_acc, reply_wellformed}`` on ``rows``.

    All token metrics are over the reply tokens of the reference replies (teacher forcing):
    KL(teacher || student) at T = 1, the share of positions where the student's argmax is
    the teacher's, and exp(mean CE). ``teacher_or_cache`` is a teacher model, a
    ``TeacherCache`` made on exactly these rows (``cache_indices`` picks its rows; default
    0..n-1; the KL is then over the top-k + tail buckets), or None (KL and agreement are
    None). ``task_acc``: greedy replies to the first ``task_limit`` rows scored with
    ``task_accuracy`` (None when the rows have no ``action`` or task_limit is 0), and
    ``reply_wellformed`` on the same replies (None likewise).
    Logits are computed ``chunk_size`` positions at a time (one [chunk, vocab] fp32 tensor,
    never [batch, seq, vocab]). Under FSDP2 every rank must call this with the same rows
    (pass ``info``): each rank evaluates every world_size-th row and the sums are all-reduced.
    """
    was_training = student.training
    student.eval()
    examples = encode_rows(tokenizer, rows, max_seq_len)
    indices = list(range(len(rows))) if cache_indices is None else list(cache_indices)
    is_model = isinstance(teacher_or_cache, torch.nn.Module)
    # kl, agreement, ce, tokens (float64: the sums of many fp32 chunk sums); task hits,
    # well-formed replies
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    pad = torch.tensor([[tokenizer.pad_token_id]], device=device)
    try:
        for part in _my_batches(len(examples), batch_size, info):
            if not part:  # this rank's share ran out: a token-long forward keeps step
                with autocast():
                    student(input_ids=pad, use_cache=False)
                continue
            batch = collate([examples[i] for i in part], tokenizer.pad_token_id)
            ids = batch["input_ids"].to(device)
            valid = batch["labels"].to(device) != IGNORE_INDEX
            labels = batch["labels"].to(device)[valid]
            teacher = None
            if is_model:
                with autocast():
                    hidden = _final_hidden(teacher_or_cache, ids, valid)
                teacher = (teacher_or_cache.get_output_embeddings(), hidden)
            elif teacher_or_cache is not None:
                top = teacher_or_cache.batch([indices[i] for i in part], pad_to=ids.shape[1])
                teacher = tuple(x.to(device)[valid] for x in top)  # ids, logprobs, tail
            score = partial(_score_chunk, sums, labels, teacher)
            with autocast():
                _head_chunks(student, ids, valid, chunk_size, score)
        scored = rows[:task_limit] if task_limit else []
        has_task = bool(scored) and all("action" in r for r in scored)
        if has_task:
            eos = tokenizer.eos_token_id
            for part in _my_batches(len(scored), batch_size, info):
                prompts = [prompt_part(examples[i]) for i in (part or [0])]  # row 0: keep step
                replies = sample_replies(
                    student,
                    prompts,
                    eos_id=eos,
                    pad_id=tokenizer.pad_token_id,
                    max_new_tokens=max_new_tokens,
                    info=info,
                    device=device,
                    autocast=autocast,
                )
                texts = [
                    tokenizer.decode([t for t in r if t != eos], skip_special_tokens=True).strip()
                    for r in replies
                ]
                if part:
                    sums[4] += task_hits(texts, [scored[i] for i in part])
                    sums[5] += wellformed_hits(texts, [scored[i] for i in part])
    finally:
        student.train(was_training)
    if info is not None:
        all_reduce_sum(sums, info)
    kl_sum, agree, ce_sum, count, hits, wellformed = sums.tolist()
    n = max(count, 1)
    has_teacher = teacher_or_cache is not None
    return {
        "heldout_kl": kl_sum / n if has_teacher else None,
        "top1_agreement": agree / n if has_teacher else None,
        "perplexity": float(torch.tensor(ce_sum / n).exp()),
        "task_acc": hits / len(scored) if has_task else None,
        "reply_wellformed": wellformed / len(scored) if has_task else None,
        "tokens": int(count),
    }
