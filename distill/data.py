"""Data sets to training batches: prompt/reply, chat and plain-text rows, indexed or streamed.

Rows (one JSON object per JSONL line, or a Parquet row; read by ``moe2edge.rows``):

- ``{"prompt": ..., "reply": ...}`` -- raw text (the demo's): ``[bos] prompt " " reply <eos>``,
  only the reply and its end are learnt;
- ``{"messages": [{"role": ..., "content": ...}, ...]}`` -- a chat, rendered by the
  tokenizer's chat template as one text and tokenised once, as the runtime renders and
  tokenises a conversation; every assistant turn is learnt (its text and the template's
  end-of-turn token), nothing else;
- ``{"text": ...}`` -- plain text; every token is learnt, then eos.

A BOS is put first only when the tokenizer has one and the text does not already start with
it (templates such as Llama-3's and DeepSeek-V3's write it themselves). eos is the token a
reply ends with: the chat template's end of turn (``tokenizer.chat_ready``).

Indexed training (``encode_rows`` + ``batch_indices``): batches are a pure function of
(seed, step), which makes resume exact and lets every rank pick its slice without talking to
the others. Streaming (``ExampleStream``, for data sets too large to hold): rows are read and
encoded as they come, in file order; a rank's share of step s is a fixed slice of its rows,
so resume is exact too. ``step_examples`` gives the training loop either.

Packing (``pack`` + ``collate_packed``, ``TrainConfig.packing``): a micro-batch's examples
are laid end to end in rows of at most ``max_len`` tokens, in order; their
``position_ids`` restart at 0 at every example and neither an attention mask nor a KV cache
is passed, from which transformers builds the block-diagonal causal mask
(``find_packed_sequence_indices``; flash-attention's varlen path on GPUs), so no token
attends across an example boundary.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from moe2edge.distill.errors import DistillError
from moe2edge.rows import RowError, iter_rows, row_form

IGNORE_INDEX = -100

Example = tuple[list[int], list[int]]  # (token ids, labels with IGNORE_INDEX where not learnt)


def read_data(path: str | Path, limit: int | None = None) -> list[dict]:
    """The rows of a JSONL or Parquet data set (``moe2edge.rows``); bad data is a DistillError."""
    return list(iter_data(path, limit))


def iter_data(path: str | Path, limit: int | None = None) -> Iterator[dict]:
    """``read_data`` one row at a time (constant memory)."""
    try:
        yield from iter_rows(path, limit)
    except RowError as exc:
        raise DistillError(str(exc)) from exc


# --- encoding ---------------------------------------------------------------------------------


def with_bos(tokenizer, ids: list[int]) -> list[int]:
    """``ids`` with the tokenizer's BOS first, unless it has none or ``ids`` start with it."""
    bos = tokenizer.bos_token_id
    return ids if bos is None or ids[:1] == [bos] else [bos] + ids


def encode_text(tokenizer, text: str) -> list[int]:
    """``text`` as the runtime encodes it: special tokens in it recognised, BOS by ``with_bos``."""
    return with_bos(tokenizer, tokenizer.encode(text, add_special_tokens=False))


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """``<bos> prompt``, tokenised on its own exactly as the runtime encodes it at inference
    (an empty prompt is ``<bos>`` alone)."""
    return encode_text(tokenizer, prompt)


def encode_example(tokenizer, prompt: str, reply: str, max_len: int) -> Example:
    """Token ids and labels for ``<bos> prompt reply <eos>``; only the reply is learnt.

    The prompt is encoded on its own, so the token boundary between prompt and reply is the
    one the model will see at inference. An empty prompt (plain text) learns every token.
    """
    prompt_ids = encode_prompt(tokenizer, prompt) if prompt else with_bos(tokenizer, [])
    sep = " " if prompt else ""
    reply_ids = tokenizer.encode(sep + reply, add_special_tokens=False) + [tokenizer.eos_token_id]
    ids = (prompt_ids + reply_ids)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + reply_ids)[:max_len]
    return ids, labels


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool, where: str) -> str:
    """``messages`` rendered by the tokenizer's chat template (what the runtime renders)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DistillError(
            f"{where} is a chat row but the tokenizer has no chat template; add one to "
            "tokenizer_config.json or convert the data to prompt/reply rows"
        )
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # jinja2 raises many types (raise_exception, undefined, ...)
        raise DistillError(
            f"{where}: the chat template cannot render it ({type(exc).__name__}: {exc})"
        ) from exc


def _stop_ids(tokenizer) -> set[int]:
    return set(getattr(tokenizer, "stop_token_ids", None) or [tokenizer.eos_token_id])


def encode_chat(tokenizer, messages: list[dict], max_len: int, where: str = "chat row") -> Example:
    """A conversation's ids (its whole rendering, tokenised once) and labels: every assistant
    turn's tokens up to and including the template's end-of-turn token, nothing else.

    Assistant turn i spans from the rendering of ``messages[:i]`` with the generation prompt
    (what the runtime sends the model to reply to) to that of ``messages[:i+1]``; both must be
    prefixes of the whole, in text and in tokens, or training would not see the ids serving
    sends: that is checked, and a template or tokenizer that breaks it is an error.
    """
    if messages[-1].get("role") != "assistant":
        raise DistillError(f"{where}: a chat row must end with an assistant message")
    whole = render_chat(tokenizer, messages, False, where)
    ids = encode_text(tokenizer, whole)
    labels = [IGNORE_INDEX] * len(ids)
    stops = _stop_ids(tokenizer)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], True, where) if i else ""
        upto = render_chat(tokenizer, messages[: i + 1], False, where)
        head, through = encode_text(tokenizer, before), encode_text(tokenizer, upto)
        if not (whole.startswith(upto) and upto.startswith(before)) or (
            ids[: len(head)] != head or ids[: len(through)] != through
        ):
            raise DistillError(
                f"{where}: the chat template's rendering up to assistant message {i + 1} is "
                "not a prefix of the whole conversation's (in text or in tokens), so the "
                "prompt served for that turn would not be the one trained on; fix the "
                "template or the row"
            )
        for t in range(len(head), len(through)):
            labels[t] = ids[t]
            if ids[t] in stops:
                break
    return ids[:max_len], labels[:max_len]


def row_prompt_reply(tokenizer, row: dict, where: str = "row") -> tuple[str, str]:
    """(prompt, reply) of a data set row in any of the supported forms; a chat's prompt is
    its rendering up to the last assistant turn, with the generation prompt."""
    form = _form(row, where)
    if form == "prompt+reply":
        return str(row["prompt"]), str(row["reply"])
    if form == "messages":
        messages = row["messages"]
        if messages[-1].get("role") != "assistant":
            raise DistillError(f"{where}: a chat row must end with an assistant message")
        prompt = render_chat(tokenizer, messages[:-1], True, where)
        return prompt, str(messages[-1]["content"])
    return "", str(row["text"])


def _form(row: dict, where: str) -> str:
    try:
        return row_form(row, where)
    except RowError as exc:
        raise DistillError(str(exc)) from exc


def encode_row(tokenizer, row: dict, max_len: int, where: str = "row") -> Example:
    """One row of any form as (ids, labels)."""
    form = _form(row, where)
    if form == "messages":
        return encode_chat(tokenizer, row["messages"], max_len, where)
    if form == "prompt+reply":
        return encode_example(tokenizer, str(row["prompt"]), str(row["reply"]), max_len)
    return encode_example(tokenizer, "", str(row["text"]), max_len)


def encode_rows(tokenizer, rows: Iterable[dict], max_len: int) -> list[Example]:
    """Every row encoded (the training, evaluation and teacher-cache encoding)."""
    return [
        encode_row(tokenizer, row, max_len, f"data set row {n + 1}") for n, row in enumerate(rows)
    ]


def prompt_part(example: Example) -> list[int]:
    """The prompt ids of an encoded example (the leading positions that are not learnt)."""
    ids, labels = example
    n = 0
    while n < len(labels) and labels[n] == IGNORE_INDEX:
        n += 1
    return ids[: max(n, 1)]


# --- batches ----------------------------------------------------------------------------------


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


def pack(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Example indices per packed row: in order, a new row when the next would not fit."""
    rows: list[list[int]] = []
    used = max_len
    for i, n in enumerate(lengths):
        if n > max_len:
            raise DistillError(f"example {i} has {n} tokens, more than max_len={max_len}")
        if used + n > max_len:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def collate_packed(
    examples: Sequence[Example], rows: list[list[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Packed rows (``pack``) as a batch: ``input_ids``, ``labels`` (shifted within each
    example: no example's last token predicts the next one's first), ``position_ids``
    restarting at every example and at the padding, and ``attention_mask`` (1 on real tokens,
    for counting them). Give the model ``position_ids``, ``use_cache=False`` and NO attention
    mask: it then attends within each example only (transformers looks for packing in the
    position ids only without a 2D mask and without a KV cache).
    """
    width = max(sum(len(examples[i][0]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            ids, lab = examples[i]
            n = len(ids)
            input_ids[r, at : at + n] = torch.tensor(ids)
            labels[r, at : at + n - 1] = torch.tensor(lab[1:])
            position_ids[r, at : at + n] = torch.arange(n)
            at += n
        position_ids[r, at:] = torch.arange(width - at)
        attention_mask[r, :at] = 1
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": attention_mask,
    }


def packed_attention_mask(
    position_ids: torch.Tensor, attn_implementation: str, dtype: torch.dtype
) -> torch.Tensor | None:
    """The block-diagonal causal mask of packed rows ([B, 1, T, T]; an example starts where
    its position is 0) in the form ``attn_implementation`` takes: bool for sdpa, additive for
    eager; None for the rest (flash attention reads the boundaries from ``position_ids``).

    transformers derives the same mask from ``position_ids`` when given none, through
    vmapped mask functions whose cost cancelled packing's gain on the demo student (a 2-core
    CPU: packed live-teacher steps 0.77x the padded time with its mask, 0.70x with this one).
    """
    if attn_implementation not in ("sdpa", "eager"):
        return None
    width = position_ids.shape[-1]
    example = (position_ids == 0).cumsum(-1)  # which example of its row each position is
    causal = torch.ones(width, width, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (example[:, :, None] == example[:, None, :]) & causal
    allowed = allowed[:, None]
    if attn_implementation == "sdpa":
        return allowed
    blocked = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return blocked.masked_fill_(~allowed, torch.finfo(dtype).min)


def packed_like(
    values: torch.Tensor, lengths: Sequence[int], rows: list[list[int]], width: int
) -> torch.Tensor:
    """Per-example values (``[examples, T, ...]``, e.g. a teacher cache's top-k) laid out as
    ``collate_packed`` lays out the examples: ``[len(rows), width, ...]``, zeros elsewhere."""
    out = values.new_zeros((len(rows), width, *values.shape[2:]))
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            out[r, at : at + lengths[i]] = values[i, : lengths[i]]
            at += lengths[i]
    return out


class ExampleStream:
    """A data set encoded as it is read (``TrainConfig.streaming``): constant memory, any size.

    Rank r of ``world_size`` reads rows r, r + world_size, ... in file order, epoch after
    epoch; its share of step s is its examples [s * per_rank, (s + 1) * per_rank) -- a pure
    function of the step, as ``batch_indices`` is for indexed data, so a resumed run skips
    the rows before its step (read, not encoded) and continues exactly. Rows are not
    shuffled: shuffle a large data set once, when writing it.
    """

    def __init__(
        self,
        tokenizer,
        path: str | Path,
        max_len: int,
        per_rank: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.tokenizer, self.path, self.max_len = tokenizer, Path(path), max_len
        self.per_rank, self.rank, self.world_size = per_rank, rank, world_size
        self._rows: Iterator[tuple[int, dict]] | None = None
        self._position = 0  # examples of this rank read so far

    def _rank_rows(self) -> Iterator[tuple[int, dict]]:
        while True:
            seen = False
            for n, row in enumerate(iter_data(self.path)):
                if n % self.world_size == self.rank:
                    seen = True
                    yield n, row
            if not seen:
                raise DistillError(
                    f"training data {self.path} has no rows for rank {self.rank} of "
                    f"{self.world_size}"
                )

    def step(self, step: int) -> tuple[list[int], dict[int, Example]]:
        """This rank's rows of ``step`` (data set row numbers, in order) and their examples."""
        want = step * self.per_rank
        if self._rows is None or want < self._position:
            self._rows, self._position = self._rank_rows(), 0
        for _ in range(want - self._position):
            next(self._rows)
        rows, examples = [], {}
        for _ in range(self.per_rank):
            n, row = next(self._rows)
            rows.append(n)
            if n not in examples:
                examples[n] = encode_row(
                    self.tokenizer, row, self.max_len, f"{self.path} row {n + 1}"
                )
        self._position = want + self.per_rank
        return rows, examples

    def lengths(self) -> list[int]:
        """Every row's token count, in order (one pass; a teacher cache is checked on it)."""
        return [
            len(encode_row(self.tokenizer, row, self.max_len, f"{self.path} row {n + 1}")[0])
            for n, row in enumerate(iter_data(self.path))
        ]


def step_examples(
    examples: list[Example] | ExampleStream,
    step: int,
    batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    grad_accum_steps: int,
) -> tuple[list[list[int]], list[Example] | dict[int, Example]]:
    """This rank's micro-batches of ``step`` as example numbers, and what they index: the
    data set's examples (``batch_indices`` + ``micro_batches``) or a stream's (its rows)."""
    if isinstance(examples, ExampleStream):
        rows, pool = examples.step(step)
        size = len(rows) // grad_accum_steps
        return [rows[i * size : (i + 1) * size] for i in range(grad_accum_steps)], pool
    indices = batch_indices(step, batch_size, len(examples), seed)
    return micro_batches(indices, rank, world_size, grad_accum_steps), examples


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
