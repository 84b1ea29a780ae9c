"""Evaluation: greedy replies and the task's accuracy; held-out distillation metrics.

The task accuracy is the demo task's: rows with an ``action`` field, scored by exact match
of the reply's action span (``formats.extract_action``); other data sets have no ``action``
and get ``task_acc`` None.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from tqdm import tqdm

from moe2edge.distill.data import IGNORE_INDEX, collate, encode_prompt, encode_rows, prompt_part
from moe2edge.distill.formats import extract_action
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
    cache_indices: list[int] | None = None,
    info=None,
    device: torch.device | str = "cpu",
    autocast=nullcontext,
) -> dict:
    """``{heldout_kl, top1_agreement, perplexity, task_acc}`` on held-out ``rows``.

    All token metrics are over the reply tokens of the reference replies (teacher forcing):
    KL(teacher || student) at T = 1, the share of positions where the student's argmax is
    the teacher's, and exp(mean CE). ``teacher_or_cache`` is a teacher model, a
    ``TeacherCache`` made on exactly these rows (``cache_indices`` picks its rows; default
    0..n-1; the KL is then over the top-k + tail buckets), or None (KL and agreement are
    None). ``task_acc``: greedy replies to the first ``task_limit`` rows scored with
    ``task_accuracy`` (None when the rows have no ``action`` or task_limit is 0).
    Under FSDP2 every rank must call this with the same rows (pass ``info``).
    """
    was_training = student.training
    student.eval()
    examples = encode_rows(tokenizer, rows, max_seq_len)
    indices = list(range(len(rows))) if cache_indices is None else list(cache_indices)
    is_model = isinstance(teacher_or_cache, torch.nn.Module)
    kl_sum = agree = ce_sum = 0.0
    count = 0
    try:
        for start in range(0, len(examples), batch_size):
            part = list(range(start, min(start + batch_size, len(examples))))
            batch = collate([examples[i] for i in part], tokenizer.pad_token_id)
            ids = batch["input_ids"].to(device)
            labels = batch["labels"].to(device)
            valid = labels != IGNORE_INDEX
            with autocast():
                logits = student(input_ids=ids, use_cache=False).logits  # right-padded: no mask
            z = logits[valid].float()
            s_logp = torch.log_softmax(z, -1)
            ce_sum += float(-s_logp.gather(-1, labels[valid][:, None]).sum())
            count += int(valid.sum())
            if teacher_or_cache is None:
                continue
            if is_model:
                with autocast():
                    t_logits = teacher_or_cache(input_ids=ids, use_cache=False).logits
                t = t_logits[valid].float()
                kl_sum += float(dense_divergence(s_logp, torch.log_softmax(t, -1)).sum())
                teacher_top1 = t.argmax(-1)
            else:
                top_ids, top_lp = teacher_or_cache.batch(
                    [indices[i] for i in part], pad_to=ids.shape[1]
                )
                top_ids, top_lp = top_ids.to(device)[valid], top_lp.to(device)[valid].float()
                kl_sum += float(sparse_divergence(z, top_ids, top_lp, "fkl").sum())
                teacher_top1 = top_ids.gather(-1, top_lp.argmax(-1, keepdim=True)).squeeze(-1)
            agree += float((z.argmax(-1) == teacher_top1).sum())
        task_acc = None
        scored = rows[:task_limit] if task_limit else []
        if scored and all("action" in r for r in scored):
            replies: list[list[int]] = []
            for start in range(0, len(scored), batch_size):
                prompts = [prompt_part(e) for e in examples[start : len(scored)][:batch_size]]
                replies += sample_replies(
                    student,
                    prompts,
                    eos_id=tokenizer.eos_token_id,
                    pad_id=tokenizer.pad_token_id,
                    max_new_tokens=max_new_tokens,
                    info=info,
                    device=device,
                    autocast=autocast,
                )
            eos = tokenizer.eos_token_id
            texts = [
                tokenizer.decode([t for t in r if t != eos], skip_special_tokens=True).strip()
                for r in replies
            ]
            task_acc = task_accuracy(texts, scored)
    finally:
        student.train(was_training)
    n = max(count, 1)
    has_teacher = teacher_or_cache is not None
    return {
        "heldout_kl": kl_sum / n if has_teacher else None,
        "top1_agreement": agree / n if has_teacher else None,
        "perplexity": float(torch.tensor(ce_sum / n).exp()),
        "task_acc": task_acc,
        "tokens": count,
    }
