"""Data sets through the one reader: JSONL or Parquet, prompt/reply, messages or text rows,
indexed or streamed, and sequence packing that keeps every example to itself."""

from __future__ import annotations

import json

import pytest
import torch

from moe2edge.distill.data import (
    IGNORE_INDEX,
    ExampleStream,
    collate,
    collate_packed,
    encode_rows,
    pack,
    packed_attention_mask,
    packed_like,
    read_data,
    step_examples,
)
from moe2edge.distill.errors import DistillError
from moe2edge.distill.student import build_student
from moe2edge.distill.templates import build_family_tokenizer, corpus
from moe2edge.distill.tokenizer import load_tokenizer, train_tokenizer
from moe2edge.rows import RowError, read_rows
from tests.conftest import require_module

needs_datasets = require_module("datasets", install="pip install 'moe2edge[distill]'")

ROWS = [
    {"prompt": "<|user|> turn on the kitchen lights <|assistant|>", "reply": "[lights.on] done"},
    {
        "messages": [
            {"role": "system", "content": "You are a helpful home assistant."},
            {"role": "user", "content": "dim the office"},
            {"role": "assistant", "content": "[lights.dim room=office] dimmed."},
            {"role": "user", "content": "and the garage door?"},
            {"role": "assistant", "content": "[door.lock room=garage] locked."},
        ],
        "action": "[door.lock room=garage]",
    },
    {"text": "open the garage door and turn the heating up"},
    {
        "messages": [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi, what should I switch?"},
        ]
    },
]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return load_tokenizer(build_family_tokenizer("qwen2.5", tmp_path_factory.mktemp("qwen")))


@pytest.fixture(scope="module")
def demo_tokenizer(tmp_path_factory):
    """The demo's tokenizer format (its turn-by-turn chat template, <bos>)."""
    return load_tokenizer(train_tokenizer(corpus(), tmp_path_factory.mktemp("demo"), 320))


def write_jsonl(rows, path):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(rows, path):
    import datasets

    keys = list(dict.fromkeys(k for row in rows for k in row))  # from_list reads row 0's keys
    datasets.Dataset.from_list([{k: row.get(k) for k in keys} for row in rows]).to_parquet(path)
    return path


@needs_datasets
def test_jsonl_and_parquet_give_the_same_rows_and_examples(tmp_path, qwen, demo_tokenizer):
    jsonl = write_jsonl(ROWS, tmp_path / "data.jsonl")
    parquet = write_parquet(ROWS, tmp_path / "data.parquet")
    assert read_rows(parquet) == read_rows(jsonl) == ROWS  # Arrow's null columns dropped
    assert read_rows(parquet, limit=2) == ROWS[:2]
    for tokenizer in (qwen, demo_tokenizer):
        examples = encode_rows(tokenizer, read_data(parquet), 128)
        assert examples == encode_rows(tokenizer, read_data(jsonl), 128)
        assert all(any(label != IGNORE_INDEX for label in lab) for _, lab in examples)


@needs_datasets
def test_bad_data_files_are_clear_errors(tmp_path):
    with pytest.raises(RowError, match="does not exist"):
        read_rows(tmp_path / "missing.parquet")
    bad = write_parquet([{"question": "x"}], tmp_path / "bad.parquet")
    with pytest.raises(DistillError, match=r"bad.parquet row 1 has keys \['question'\]"):
        read_data(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DistillError, match="broken.jsonl:2: not valid JSON"):
        read_data(broken)


@pytest.mark.parametrize("suffix", ["jsonl", pytest.param("parquet", marks=needs_datasets)])
def test_streaming_yields_the_indexed_examples(tmp_path, qwen, suffix):
    rows = ROWS * 3
    path = tmp_path / f"data.{suffix}"
    (write_jsonl if suffix == "jsonl" else write_parquet)(rows, path)
    indexed = encode_rows(qwen, read_data(path), 96)
    stream = ExampleStream(qwen, path, 96, per_rank=len(rows))
    for step in (0, 1):  # epoch after epoch, in file order
        numbers, pool = stream.step(step)
        assert numbers == list(range(len(rows))) and [pool[n] for n in numbers] == indexed
    assert stream.lengths() == [len(ids) for ids, _ in indexed]
    # rank r of 3 takes rows r, r + 3, ...; a stream opened at a later step (a resumed run)
    # continues where the first one is at that step
    ranks = [ExampleStream(qwen, path, 96, per_rank=2, rank=r, world_size=3) for r in range(3)]
    taken = [ranks[r].step(s) for s in range(2) for r in range(3)]
    assert sorted(n for numbers, _ in taken for n in numbers) == list(range(len(rows)))
    assert taken[1][0] == [1, 4] and taken[4][0] == [7, 10]
    resumed = ExampleStream(qwen, path, 96, per_rank=2, rank=1, world_size=3).step(1)
    assert resumed == taken[4]
    assert step_examples(stream, 0, 99, 0, 0, 1, 3)[0] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9, 10, 11],
    ]


def test_pack_keeps_order_and_fits_rows():
    assert pack([3, 4, 2, 5, 7, 1], 7) == [[0, 1], [2, 3], [4], [5]]
    with pytest.raises(DistillError, match="more than max_len=7"):
        pack([3, 8], 7)


def examples_of(lengths, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        prompt = n // 3
        out.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def test_collate_packed_boundaries():
    examples = examples_of([3, 4, 5])
    rows = pack([3, 4, 5], 8)
    batch = collate_packed(examples, rows, pad_id=0)
    assert rows == [[0, 1], [2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 0, 1]]
    assert batch["input_ids"][0, :7].tolist() == examples[0][0] + examples[1][0]
    assert batch["attention_mask"].sum(-1).tolist() == [7, 5]
    labels = batch["labels"][0].tolist()
    assert labels[2] == IGNORE_INDEX  # example 0's last token does not predict example 1's first
    assert labels[:2] == examples[0][1][1:]
    assert labels[3:6] == examples[1][1][1:] and labels[6:] == [IGNORE_INDEX]
    assert batch["input_ids"][1, 5:].tolist() == [0, 0]  # padding
    per_example = torch.arange(3 * 5).reshape(3, 5, 1)  # e.g. a teacher cache's top-k rows
    laid = packed_like(per_example, [3, 4, 5], rows, 7)[..., 0]
    assert laid.tolist() == [[0, 1, 2, 5, 6, 7, 8], [10, 11, 12, 13, 14, 0, 0]]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_batch_gives_the_per_token_loss_of_separate_examples(attn):
    torch.manual_seed(0)
    model = build_student("tiny", vocab_size=64).eval()
    model.set_attn_implementation(attn)
    lengths = [5, 9, 3, 12, 7, 2]
    examples = examples_of(lengths)

    def token_losses(logits, labels):
        losses = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), reduction="none"
        )
        return losses[labels.flatten() != IGNORE_INDEX]

    with torch.no_grad():
        alone = torch.cat(
            [
                token_losses(model(input_ids=b["input_ids"]).logits, b["labels"])
                for b in (collate([e], pad_id=0) for e in examples)
            ]
        )
        batch = collate_packed(examples, pack(lengths, 16), pad_id=0)
        assert batch["input_ids"].shape[0] < len(examples)  # several examples share a row
        positions = batch["position_ids"]
        logits = model(input_ids=batch["input_ids"], position_ids=positions, use_cache=False).logits
        packed = token_losses(logits, batch["labels"])
        # the mask the training loop builds itself (transformers' own derivation is slower)
        mask = packed_attention_mask(positions, attn, torch.float32)
        assert mask is not None and mask.shape[-2:] == (positions.shape[1],) * 2
        masked = model(
            input_ids=batch["input_ids"], position_ids=positions, attention_mask=mask
        ).logits
        masked = token_losses(masked, batch["labels"])
        # the control: the same rows without the boundaries attend across examples
        crossed = model(input_ids=batch["input_ids"], use_cache=False).logits
        crossed = token_losses(crossed, batch["labels"])
    assert packed.shape == alone.shape
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(masked, alone, rtol=0, atol=1e-5)
    assert (crossed - alone).abs().max() > 1e-3


def test_packed_training_steps_are_the_unpacked_ones(tiny_run, tmp_path):
    """``packing=True`` in the training loop: the same losses, step by step, and weights, with
    a live teacher (its forward packed too), with attention transfer (eager attention: the
    additive mask, and maps compared within each example) and from a teacher cache (re-laid
    per row)."""
    from moe2edge.distill.cache import build_cache
    from moe2edge.distill.train import distill_student
    from tests._train_common import train_config, train_records, weights

    singles = [r for r in read_rows(tiny_run["train"]) if r["kind"] == "single"]
    data = write_jsonl(singles[:64], tmp_path / "train64.jsonl")
    cache = tmp_path / "cache"
    build_cache(data=data, tokenizer=tiny_run["tokenizer"], out=cache, teacher=tiny_run["teacher"], k=8, max_seq_len=160)  # fmt: skip
    lengths = [len(ids) for ids, _ in encode_rows(load_tokenizer(tiny_run["tokenizer"]), read_data(data), 160)]  # fmt: skip
    assert len(pack(lengths, 160)) < len(lengths) * 0.6  # most rows hold several examples
    sources = {
        "live": {},
        "attention": {"attention_weight": 1.0},
        "cached": {"teacher": None, "teacher_cache": str(cache)},
    }
    for name, source in sources.items():
        runs = {}
        for packing in (False, True):
            run = tmp_path / f"{name}-{packing}"
            common = dict(train_data=str(data), max_steps=3, max_seq_len=160, packing=packing)
            common.update(source)
            runs[packing] = distill_student(train_config(tiny_run, run, **common))
            runs[f"records-{packing}"] = train_records(run)
        for a, b in zip(runs["records-False"], runs["records-True"], strict=True):
            for key in ("loss", "kd", "ce"):
                assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (name, key, a, b)
        for tensor_name, tensor in weights(runs[False]).items():
            torch.testing.assert_close(weights(runs[True])[tensor_name], tensor, rtol=0, atol=1e-4)


def test_streaming_training_resumes_exactly_and_reads_the_cache_by_row(tiny_run, tmp_path):
    """``streaming=True`` (with packing): a run stopped at a checkpoint and resumed ends with
    the weights of the uninterrupted run; from a teacher cache at full k it trains as with
    the live teacher, so the stream's rows find their cached scores."""
    import shutil

    from moe2edge.distill.cache import build_cache
    from moe2edge.distill.train import distill_student
    from tests._train_common import train_config, train_records, weights

    data = write_jsonl(read_rows(tiny_run["train"])[:40], tmp_path / "train40.jsonl")
    common = dict(train_data=str(data), max_steps=4, max_seq_len=160, streaming=True, packing=True)
    run = tmp_path / "live"
    live = weights(distill_student(train_config(tiny_run, run, checkpoint_every=2, **common)))
    # the run's only checkpoint is after step 2: run again, it resumes there
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]
    shutil.rmtree(run / "student")
    resumed = weights(distill_student(train_config(tiny_run, run, checkpoint_every=2, **common)))
    assert all(torch.equal(resumed[name], tensor) for name, tensor in live.items())

    vocab = len(load_tokenizer(tiny_run["tokenizer"]))
    cache = tmp_path / "cache"
    build_cache(data=data, tokenizer=tiny_run["tokenizer"], out=cache, teacher=tiny_run["teacher"], k=vocab, max_seq_len=160)  # fmt: skip
    cached_run = tmp_path / "cached"
    distill_student(train_config(tiny_run, cached_run, teacher=None, teacher_cache=cache, **common))
    for a, b in zip(train_records(run)[-2:], train_records(cached_run)[-2:], strict=True):
        assert abs(a["kd"] - b["kd"]) <= 1e-3 * a["kd"], (a, b)  # fp16 log-probs in the cache
