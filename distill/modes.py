"""Where the training sequences come from: off-policy, sequence-level KD, on-policy (GKD).

- ``off_policy``: the data set's replies, scored by a live teacher or a top-k teacher cache.
- ``seq_kd``: sequence-level KD (Kim & Rush 2016): the teacher writes a reply to every prompt
  once (greedy or sampled, ``generate_teacher_dataset``) and the student trains on those.
- ``on_policy``: GKD (Agarwal et al. 2024): with probability ``lambda_on_policy`` per step the
  student samples replies to the batch prompts (no gradient), the teacher scores those
  sequences, and the divergence alone is taken on the student's own samples (no CE there: it
  would reinforce whatever the student sampled; TRL's GKD does the same); otherwise the data
  set's replies are used, as off-policy, with ``ce_ratio``.

Sampling is a pure function of (seed, step, row of the global batch), so runs resume exactly
and give the same samples whatever the number of ranks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from moe2edge.distill.data import (
    IGNORE_INDEX,
    Example,
    encode_prompt,
    prompt_part,
    read_data,
    row_prompt_reply,
)
from moe2edge.distill.distributed import DistInfo, barrier
from moe2edge.fileio import atomic_write, atomic_write_json, sha256_file
from moe2edge.rows import row_form

log = logging.getLogger(__name__)

MODES = ("off_policy", "seq_kd", "on_policy")


def stable_seed(*parts) -> int:
    """A 63-bit seed from any parts, the same in every process and Python version."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def use_on_policy(step: int, seed: int, lambda_on_policy: float) -> bool:
    """Whether step ``step`` trains on student samples (same answer on every rank)."""
    return random.Random(stable_seed(seed, "on_policy", step)).random() < lambda_on_policy


def _any_running(running: bool, info: DistInfo | None) -> bool:
    """True while any rank still decodes: FSDP2 ranks must run the same number of forwards."""
    if info is None or not info.enabled:
        return running
    flag = torch.tensor([1.0 if running else 0.0], device=info.device)
    dist.all_reduce(flag)
    return bool(flag.item() > 0)


@torch.no_grad()
def sample_replies(
    model: torch.nn.Module,
    prompts: list[list[int]],
    *,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    generators: list[torch.Generator] | None = None,
    info: DistInfo | None = None,
    device: torch.device | str = "cpu",
    autocast=nullcontext,
) -> list[list[int]]:
    """New token ids after each prompt (ending with ``eos_id`` when the model stopped).

    Batched, left-padded, with a KV cache. ``temperature`` 0 is greedy; otherwise each row
    samples from ``softmax(logits / temperature)`` with its own generator (on the CPU, so the
    samples do not depend on the device). Under FSDP2 pass ``info``: ranks stop together.
    """
    was_training = model.training
    model.eval()  # HF turns the KV cache off in train mode with activation checkpointing
    width = max(len(p) for p in prompts)
    batch = len(prompts)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * batch
    try:
        with autocast():
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        for t in range(max_new_tokens):
            logits = out.logits[:, -1].float().cpu()
            if temperature <= 0:
                tokens = logits.argmax(-1).tolist()
            else:
                probs = torch.softmax(logits / temperature, -1)
                tokens = [
                    int(torch.multinomial(probs[row], 1, generator=generators[row]))
                    for row in range(batch)
                ]
            for row, token in enumerate(tokens):
                if not done[row]:
                    new[row].append(token)
                    done[row] = token == eos_id
            if t == max_new_tokens - 1 or not _any_running(not all(done), info):
                break
            feed = torch.tensor(
                [[pad_id if d else tok] for d, tok in zip(done, tokens, strict=True)],
                device=device,
            )
            mask = torch.cat([mask, mask.new_ones((batch, 1))], 1)
            with autocast():
                out = model(
                    input_ids=feed,
                    attention_mask=mask,
                    position_ids=mask.sum(-1, keepdim=True) - 1,
                    past_key_values=out.past_key_values,
                    use_cache=True,
                )
    finally:
        model.train(was_training)
    return new


def on_policy_examples(
    student: torch.nn.Module,
    examples: list[Example],
    rows: list[int],
    *,
    step: int,
    seed: int,
    tokenizer,
    max_seq_len: int,
    max_new_tokens: int,
    temperature: float,
    info: DistInfo | None = None,
    device: torch.device | str = "cpu",
    autocast=nullcontext,
) -> list[Example]:
    """The examples' prompts with replies sampled from the student (the reply is learnt).

    ``rows`` are the examples' positions in the global batch: each row's sampler is seeded
    from (seed, step, row), so the samples do not depend on how the batch is split.
    """
    prompts = [prompt_part(e) for e in examples]
    generators = [
        torch.Generator().manual_seed(stable_seed(seed, "sample", step, row)) for row in rows
    ]
    replies = sample_replies(
        student,
        prompts,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        max_new_tokens=min(max_new_tokens, max_seq_len - 1),  # same on every rank
        temperature=temperature,
        generators=generators,
        info=info,
        device=device,
        autocast=autocast,
    )
    out = []
    for p, r in zip(prompts, replies, strict=True):
        out.append(((p + r)[:max_seq_len], ([IGNORE_INDEX] * len(p) + r)[:max_seq_len]))
    return out


def generate_teacher_dataset(
    teacher: torch.nn.Module,
    tokenizer,
    source: str | Path,
    out_path: str | Path,
    *,
    max_new_tokens: int = 40,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 32,
    teacher_id: str = "",
    info: DistInfo | None = None,
    device: torch.device | str = "cpu",
    autocast=nullcontext,
) -> Path:
    """Sequence-level KD data: the teacher's reply to every prompt of ``source``, as JSONL.

    Rows keep their other fields (e.g. ``action`` for the task score); the data set's reply
    moves to ``reference_reply``. Reused when ``OUT.meta.json`` shows the same source,
    teacher and settings; otherwise (re)generated, each rank taking every world_size-th
    row, and written atomically by rank 0.
    """
    info = info or DistInfo()
    out_path = Path(out_path)
    meta_path = out_path.with_name(out_path.name + ".meta.json")
    meta = {
        "source": str(source),
        "source_sha256": sha256_file(source),
        "teacher": teacher_id,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "seed": seed,
    }
    if out_path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
        log.info("reusing teacher-generated data set %s", out_path)
        return out_path
    rows = read_data(source)
    mine = list(range(info.rank, len(rows), info.world_size))
    results: dict[int, dict] = {}
    bar = tqdm(
        range(0, len(mine), batch_size),
        desc="teacher replies",
        unit="batch",
        mininterval=2.0,
        disable=not info.is_main,
    )
    for start in bar:
        chunk = mine[start : start + batch_size]
        pairs = [row_prompt_reply(tokenizer, rows[i], f"{source} row {i + 1}") for i in chunk]
        replies = sample_replies(
            teacher,
            [encode_prompt(tokenizer, p) for p, _ in pairs],
            eos_id=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            generators=[
                torch.Generator().manual_seed(stable_seed(seed, "seq_kd", i)) for i in chunk
            ],
            device=device,
            autocast=autocast,
        )
        for i, (prompt, reference), reply in zip(chunk, pairs, replies, strict=True):
            ids = reply[:-1] if reply and reply[-1] == tokenizer.eos_token_id else reply
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            extra = {k: v for k, v in rows[i].items() if k not in ("messages", "text")}
            if "messages" in rows[i]:  # a chat stays a chat, encoded on its template again
                reply_turn = {"role": "assistant", "content": text}
                extra["messages"] = rows[i]["messages"][:-1] + [reply_turn]
            if row_form(rows[i]) != "messages":  # prompt/reply (and the demo's chats with both)
                extra.update(prompt=prompt, reply=text)
            results[i] = {**extra, "reference_reply": reference}
    part = out_path.with_name(f".{out_path.name}.rank{info.rank}.part")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    part.write_text(json.dumps({str(k): v for k, v in results.items()}), encoding="utf-8")
    barrier(info)
    if info.is_main:
        merged: dict[int, dict] = {}
        for r in range(info.world_size):
            p = out_path.with_name(f".{out_path.name}.rank{r}.part")
            merged.update({int(k): v for k, v in json.loads(p.read_text()).items()})
            p.unlink()
        atomic_write(out_path, "".join(json.dumps(merged[i]) + "\n" for i in range(len(rows))))
        atomic_write_json(meta_path, meta)
        log.info("wrote %d teacher replies to %s", len(rows), out_path)
    barrier(info)
    return out_path
