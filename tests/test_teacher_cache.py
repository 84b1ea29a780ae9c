"""Teacher cache: exact top-k from the local teacher, resume after SIGKILL, verification."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from moe2edge.distill.cache import TeacherCache, build_cache, register_cache_command, write_cache
from moe2edge.distill.data import collate, encode_example, encode_rows
from moe2edge.distill.demo_data import write_jsonl
from moe2edge.distill.errors import DistillError
from moe2edge.distill.losses import distillation_loss
from moe2edge.distill.pipeline import distill_student, make_tokenizer
from moe2edge.distill.teacher import load_teacher
from moe2edge.distill.teacher_server import Faults, TeacherServer
from moe2edge.distill.tokenizer import load_tokenizer, tokenizer_hash
from moe2edge.fileio import seal, sha256_file
from moe2edge.rows import read_rows
from tests._train_common import train_config
from tests.conftest import PYTHON, ROOT, subprocess_env

K = 16
SHARD = 8
N_EXAMPLES = 40
SEQ = 64


@pytest.fixture(scope="module")
def setup(tiny_run, tmp_path_factory):
    """A 40-row data set and its cache from the local tiny teacher (5 shards of 8 examples)."""
    root = tmp_path_factory.mktemp("teacher_cache")
    data = root / "data.jsonl"
    write_jsonl(read_rows(tiny_run["train"])[:N_EXAMPLES], data)
    common = dict(data=data, tokenizer=tiny_run["tokenizer"], k=K, max_seq_len=SEQ)
    # batch_size=1: the same forward as the test server's, so served caches must be identical.
    index = build_cache(
        out=root / "local",
        teacher=tiny_run["teacher"],
        shard_examples=SHARD,
        batch_size=1,
        **common,
    )
    return {**tiny_run, "root": root, "data": data, "index": index, "common": common}


def _hashes(cache_dir):
    return {p.name: sha256_file(p) for p in sorted(cache_dir.glob("shard-*.safetensors"))}


def test_local_cache_equals_direct_topk(setup, tmp_path):
    """Rows equal log_softmax + topk of an unbatched forward: the same ids, fp16 logprobs, and
    a tail (1 - sum exp) equal to the exact mass outside the top k. Batched scoring too."""
    tok = load_tokenizer(setup["tokenizer"])
    teacher = load_teacher(setup["teacher"])
    batched = build_cache(out=tmp_path / "b5", teacher=setup["teacher"], shard_examples=SHARD,
                          batch_size=5, **setup["common"])  # fmt: skip
    assert batched["skipped_shards"] == 0
    rows = read_rows(setup["data"])
    for cache_dir in (setup["root"] / "local", tmp_path / "b5"):
        cache = TeacherCache(cache_dir, tokenizer_dir=setup["tokenizer"])
        assert len(cache) == N_EXAMPLES and cache.k == K and len(cache.shards) == 5
        for i, row in enumerate(rows):
            ids, _ = encode_example(tok, row["prompt"], row["reply"], SEQ)
            with torch.no_grad():
                logits = teacher(input_ids=torch.tensor([ids])).logits[0, :-1].double()
            logp = torch.log_softmax(logits, -1)
            want_lp, want_ids = logp.topk(K, -1)
            got_ids, got_lp, got_tail = cache.topk(i)
            assert got_ids.shape == (len(ids), K) and got_lp.dtype == torch.float32
            assert got_tail.shape == (len(ids),) and got_tail.dtype == torch.float32
            # The last position predicts nothing the labels use: a padding row.
            assert got_ids[-1].eq(0).all() and got_lp[-1].eq(0).all() and got_tail[-1] == 0
            got_ids, got_lp, got_tail = got_ids[:-1], got_lp[:-1].double(), got_tail[:-1].double()
            # Same top-k set (rows are stored sorted by fp16 logprob, then id) ...
            assert torch.equal(got_ids.sort(-1).values, want_ids.sort(-1).values), i
            # ... each logprob is that id's logprob to fp16 precision, in descending order ...
            torch.testing.assert_close(got_lp, logp.gather(-1, got_ids), rtol=1e-3, atol=1e-4)
            assert torch.equal(got_lp.sort(-1, descending=True).values, got_lp)
            # ... the stored tail is the exact mass outside the top k (fp16 rounding of its log) ...
            exact_tail = 1 - want_lp.exp().sum(-1)
            torch.testing.assert_close(got_tail.exp(), exact_tail, rtol=2e-3, atol=0.0)
            # ... and the log-probs are rescaled to agree with it (not fp16 rounding noise).
            tail = 1 - got_lp.exp().sum(-1)
            torch.testing.assert_close(tail, exact_tail, rtol=2e-3, atol=1e-6)

    cache = TeacherCache(setup["root"] / "local", tokenizer_dir=setup["tokenizer"])
    # batch() pads like collate: same width, and every labelled position has a teacher row.
    picks = [3, 0, 17, 39]
    encoded = [encode_example(tok, rows[i]["prompt"], rows[i]["reply"], SEQ) for i in picks]
    b = collate(encoded, tok.pad_token_id)
    ids, lps, tails = cache.batch(picks, pad_to=b["input_ids"].shape[1])
    assert ids.shape == (*b["input_ids"].shape, K) and lps.shape == ids.shape
    assert tails.shape == b["input_ids"].shape
    for row, i in enumerate(picks):
        n = len(encoded[row][0])
        assert torch.equal(ids[row, :n], cache.topk(i)[0]) and ids[row, n:].eq(0).all()
        assert torch.equal(tails[row, :n], cache.topk(i)[2]) and tails[row, n:].eq(0).all()
    # The labelled token t+1 is usually among the teacher's top-k at position t.
    labelled = b["labels"] != -100
    hit = (ids == b["labels"][..., None]).any(-1)[labelled].float().mean()
    assert hit > 0.2


def test_bytes_per_token_reported(setup, capsys):
    """int32 ids + fp16 logprobs = 6 bytes x k per token, plus offsets and header."""
    index = setup["index"]
    assert index["bytes"] == sum(
        (setup["root"] / "local" / s["file"]).stat().st_size for s in index["shards"]
    )
    tok = load_tokenizer(setup["tokenizer"])
    lengths = [
        len(encode_example(tok, r["prompt"], r["reply"], SEQ)[0]) for r in read_rows(setup["data"])
    ]
    assert index["tokens"] == sum(n - 1 for n in lengths)  # scored positions
    # + 2: the fp16 tail; + ~1: offsets and header of these small 8-example shards
    assert 6 * K + 2 <= index["bytes_per_token"] < 6 * K + 4
    on_disk = json.loads((setup["root"] / "local" / "index.json").read_text())
    assert on_disk["bytes_per_token"] == index["bytes_per_token"]

    # The CLI action prints it too (a finished cache: every shard is skipped).
    parser = argparse.ArgumentParser()
    register_cache_command(parser.add_subparsers())
    args = parser.parse_args(
        ["cache", "--teacher", str(setup["teacher"]), "--data", str(setup["data"]),
         "--tokenizer", str(setup["tokenizer"]), "--out", str(setup["root"] / "local"),
         "--k", str(K), "--max-seq-len", str(SEQ), "--shard-examples", str(SHARD)]
    )  # fmt: skip
    assert args.handler(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["bytes_per_token"] == index["bytes_per_token"]
    assert printed["skipped_shards"] == 5


def test_resume_after_sigkill(setup, tmp_path):
    """SIGKILL a cache run mid-way; the re-run skips finished shards and ends byte-identical."""
    out = tmp_path / "cache"
    with TeacherServer(setup["teacher"], faults=Faults(delay_s=0.04)) as server:
        code = (
            "from moe2edge.distill.cache import build_cache\n"
            f"build_cache(data={str(setup['data'])!r}, tokenizer={str(setup['tokenizer'])!r}, "
            f"out={str(out)!r}, server={server.url!r}, api='vllm', k={K}, max_seq_len={SEQ}, "
            f"shard_examples={SHARD}, concurrency=1)\n"
        )
        proc = subprocess.Popen([PYTHON, "-c", code], cwd=ROOT, env=subprocess_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        deadline = time.monotonic() + 60
        index_file = out / "index.json"
        while time.monotonic() < deadline and proc.poll() is None:
            if index_file.exists() and len(json.loads(index_file.read_text())["shards"]) >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        index = json.loads(index_file.read_text())
        assert not index["complete"] and 2 <= len(index["shards"]) < 5
        done = {
            s["file"]: (os.stat(out / s["file"]).st_mtime_ns, s["sha256"]) for s in index["shards"]
        }
        with pytest.raises(DistillError, match="incomplete"):
            TeacherCache(out)
        # A half-written shard from a crash is never picked up.
        (out / "shard-00004.safetensors.tmp").write_bytes(b"half a shard")

        resumed = build_cache(
            out=out,
            server=server.url,
            api="vllm",
            shard_examples=SHARD,
            concurrency=2,
            **setup["common"],
        )
    assert resumed["complete"] and resumed["skipped_shards"] == len(done)
    for name, (mtime, digest) in done.items():
        assert os.stat(out / name).st_mtime_ns == mtime and sha256_file(out / name) == digest
    assert not list(out.glob("*.tmp"))
    # Identical to the uninterrupted cache (served and local teachers agree bit for bit).
    assert _hashes(out) == _hashes(setup["root"] / "local")


def test_corrupted_shard_is_refused_and_repaired(setup, tmp_path):
    cache_dir = tmp_path / "cache"
    shutil.copytree(setup["root"] / "local", cache_dir)
    shard = cache_dir / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(DistillError, match="shard-00001.safetensors is corrupted"):
        TeacherCache(cache_dir)
    lazy = TeacherCache(cache_dir, verify="lazy")  # checked on first access of each shard
    lazy.topk(0)
    with pytest.raises(DistillError, match="shard-00001.safetensors is corrupted"):
        lazy.topk(SHARD)
    # The message says re-run the same command: only the damaged shard is re-scored.
    index = build_cache(
        out=cache_dir, teacher=setup["teacher"], shard_examples=SHARD, **setup["common"]
    )
    assert index["skipped_shards"] == 4
    assert _hashes(cache_dir) == _hashes(setup["root"] / "local")
    TeacherCache(cache_dir)


def test_other_tokenizer_or_settings_are_refused(setup, tmp_path):
    other = make_tokenizer(setup["data"], tmp_path / "other_tok", vocab_size=300)
    with pytest.raises(DistillError) as err:
        TeacherCache(setup["root"] / "local", tokenizer_dir=other)
    want = json.loads((setup["root"] / "local" / "index.json").read_text())["tokenizer_sha256"]
    message = str(err.value)
    assert want in message and tokenizer_hash(other) in message
    assert "rebuild the cache" in message

    # Resuming a cache with other settings changes nothing and says which setting differs.
    before = _hashes(setup["root"] / "local")
    index_before = (setup["root"] / "local" / "index.json").read_bytes()
    with pytest.raises(DistillError, match="k=16.*k=8"):
        build_cache(out=setup["root"] / "local", teacher=setup["teacher"], shard_examples=SHARD,
                    **{**setup["common"], "k": 8})  # fmt: skip
    assert _hashes(setup["root"] / "local") == before
    assert (setup["root"] / "local" / "index.json").read_bytes() == index_before


def test_sparse_loss_with_k_equal_to_vocab_matches_dense(setup, tmp_path):
    """Cached top-k with k = vocabulary gives the dense loss (moe2edge.distill.losses, sparse form)."""
    tok = load_tokenizer(setup["tokenizer"])
    teacher = load_teacher(setup["teacher"])
    vocab = teacher.config.vocab_size
    rows = read_rows(setup["data"])[:6]
    data = tmp_path / "six.jsonl"
    write_jsonl(rows, data)
    index = build_cache(data=data, tokenizer=setup["tokenizer"], out=tmp_path / "full", teacher=setup["teacher"],
                        k=vocab, max_seq_len=SEQ, shard_examples=4)  # fmt: skip
    assert 6 * vocab + 2 <= index["bytes_per_token"] < 6 * vocab + 7  # few tokens: header shows
    cache = TeacherCache(tmp_path / "full", tokenizer_dir=setup["tokenizer"])
    batch = collate(
        [encode_example(tok, r["prompt"], r["reply"], SEQ) for r in rows], tok.pad_token_id
    )
    with torch.no_grad():
        dense_teacher = teacher(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    ids, lps, tails = cache.batch(range(6), pad_to=batch["input_ids"].shape[1])
    # k = vocabulary: the stored tails are float32 rounding (-inf or < 1e-6); the loss drops them.
    assert (tails[batch["labels"] != -100].exp() < 1e-6).all()
    student = torch.randn(
        *batch["input_ids"].shape, vocab, generator=torch.Generator().manual_seed(0)
    )
    for loss in ("fkl", "rkl", "jsd", "tvd"):
        for temperature in (1.0, 2.0):
            opts = dict(loss=loss, temperature=temperature, ce_ratio=0.25)
            dense = distillation_loss(
                student, batch["labels"], teacher_logits=dense_teacher, **opts
            )
            sparse = distillation_loss(
                student,
                batch["labels"],
                teacher_topk_ids=ids,
                teacher_topk_logprobs=lps,
                teacher_topk_tail=tails,
                **opts,
            )
            torch.testing.assert_close(
                sparse["kd"], dense["kd"], rtol=2e-3, atol=1e-4, msg=f"{loss} T={temperature}"
            )
            torch.testing.assert_close(sparse["loss"], dense["loss"], rtol=2e-3, atol=1e-4)


def test_rows_follow_the_training_encoding(setup, tmp_path):
    """Chat and plain-text rows are cached exactly as moe2edge.distill.data.encode_rows encodes them."""
    rows = [
        {"prompt": "turn on the kitchen lights", "reply": "[lights_on kitchen] done"},
        {
            "messages": [
                {"role": "user", "content": "dim the office"},
                {"role": "assistant", "content": "ok"},
            ]
        },
        {"text": "open the garage door"},
    ]
    data = tmp_path / "mixed.jsonl"
    write_jsonl(rows, data)
    build_cache(data=data, tokenizer=setup["tokenizer"], out=tmp_path / "c", teacher=setup["teacher"], k=4, max_seq_len=SEQ, shard_examples=2)  # fmt: skip
    cache = TeacherCache(tmp_path / "c", tokenizer_dir=setup["tokenizer"])
    examples = encode_rows(load_tokenizer(setup["tokenizer"]), rows, SEQ)
    assert [len(cache.topk(i)[0]) for i in range(3)] == [len(ids) for ids, _ in examples]
    cache.check_data(data, SEQ)
    with pytest.raises(DistillError, match="not from .* with max_seq_len=32"):
        cache.check_data(data, 32)


def test_vllm_style_rows_train_finite_from_the_cache(setup, tmp_path):
    """A served teacher's float32 rows whose top log-prob is exactly 0.0 (vLLM, confident
    positions) store a tail of log(0) = -inf; the reader hands it to the loss, which floors it."""
    tok = load_tokenizer(setup["tokenizer"])
    examples = encode_rows(tok, read_rows(setup["data"])[:4], SEQ)
    seqs = [ids for ids, _ in examples]
    row = np.array([0.0, -20.0, -21.0, -22.0], dtype=np.float32)

    def confident(chunk):
        return [
            (np.tile(np.array([5, 6, 7, 8], np.int32), (len(s) - 1, 1)), np.tile(row, (len(s) - 1, 1)))
            for s in chunk
        ]  # fmt: skip

    header = {"teacher": {"kind": "served", "api": "vllm", "model": "m"}, "k": 4,
              "tokenizer_sha256": tokenizer_hash(setup["tokenizer"]), "max_seq_len": SEQ,
              "dataset": {"path": "x", "sha256": "0"}, "shard_examples": 2}  # fmt: skip
    write_cache(tmp_path / "c", seqs, confident, header)
    cache = TeacherCache(tmp_path / "c", tokenizer_dir=setup["tokenizer"])
    batch = collate(examples, tok.pad_token_id)
    ids, lps, tails = cache.batch(range(4), pad_to=batch["input_ids"].shape[1])
    valid = batch["labels"] != -100
    assert torch.isinf(tails[valid]).all() and (lps[valid][:, 0].abs() < 1e-8).all()
    student = torch.randn(*ids.shape[:2], len(tok), generator=torch.Generator().manual_seed(0))
    for loss in ("fkl", "rkl", "jsd", "skl", "srkl", "tvd"):
        x = student.clone().requires_grad_()
        out = distillation_loss(
            x, batch["labels"], teacher_topk_ids=ids, teacher_topk_logprobs=lps,
            teacher_topk_tail=tails, loss=loss, beta=1.0,
        )  # fmt: skip
        (grad,) = torch.autograd.grad(out["loss"], x)
        assert out["kd"] < 100 and torch.isfinite(grad).all(), (loss, out)
        assert grad.abs().max() * int(valid.sum()) < 10, loss  # per token


def test_cached_lengths_must_match_the_tokenized_examples(setup, tmp_path):
    """A cache whose index matches the data (sha256, count, max_seq_len) but whose rows were
    made for other token sequences is refused, naming the first example that differs."""
    tok = load_tokenizer(setup["tokenizer"])
    cache = TeacherCache(setup["root"] / "local", tokenizer_dir=setup["tokenizer"])
    lengths = [len(ids) for ids, _ in encode_rows(tok, read_rows(setup["data"]), SEQ)]
    assert cache.example_lengths() == lengths
    cache.check_lengths(lengths, "data.jsonl")
    with pytest.raises(DistillError, match=r"example 17 of data.jsonl encodes to \d+ tokens"):
        cache.check_lengths(lengths[:17] + [lengths[17] + 1] + lengths[18:], "data.jsonl")
    with pytest.raises(DistillError, match="holds 40 examples but data.jsonl has 39"):
        cache.check_lengths(lengths[:-1], "data.jsonl")

    # Through training: other rows, same count, and an index claiming they are its data.
    other = tmp_path / "other.jsonl"
    write_jsonl(read_rows(setup["train"])[N_EXAMPLES : 2 * N_EXAMPLES], other)
    other_lengths = [len(ids) for ids, _ in encode_rows(tok, read_rows(other), SEQ)]
    first = next(i for i, (a, b) in enumerate(zip(lengths, other_lengths, strict=True)) if a != b)
    stale = tmp_path / "stale"
    shutil.copytree(setup["root"] / "local", stale)
    index = json.loads((stale / "index.json").read_text())
    index["dataset"]["sha256"] = sha256_file(other)
    (stale / "index.json").write_text(json.dumps(seal(index)))  # a forged, resealed index
    cfg = train_config(setup, tmp_path / "run", teacher=None, teacher_cache=stale, train_data=other)
    with pytest.raises(DistillError, match=rf"example {first} of .*other.jsonl encodes to"):
        distill_student(cfg)


def test_tokenizer_fingerprint_covers_config_and_chat_template(setup, tmp_path):
    """tokenizer.json alone misses changes that re-tokenize rows: the chat template (in
    chat_template.jinja or tokenizer_config.json) and the special-token settings."""
    base = tmp_path / "base"
    shutil.copytree(setup["tokenizer"], base)
    assert tokenizer_hash(base) == tokenizer_hash(setup["tokenizer"])  # the bytes, not the path
    seen = {tokenizer_hash(base)}
    chat = {"messages": [{"role": "user", "content": "dim the office"},
                         {"role": "assistant", "content": "ok"}]}  # fmt: skip
    ids = encode_rows(load_tokenizer(base), [chat], SEQ)[0][0]

    template = tmp_path / "template"
    shutil.copytree(base, template)
    jinja = template / "chat_template.jinja"
    jinja.write_text(jinja.read_text().replace("{{ m['content'] }}", "{{ m['content'] }} ."))
    assert encode_rows(load_tokenizer(template), [chat], SEQ)[0][0] != ids  # re-tokenized ...
    assert (template / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    seen.add(tokenizer_hash(template))  # ... and the fingerprint says so

    config = tmp_path / "config"
    shutil.copytree(base, config)
    settings = json.loads((config / "tokenizer_config.json").read_text())
    settings["bos_token"] = "<|user|>"
    (config / "tokenizer_config.json").write_text(json.dumps(settings))
    seen.add(tokenizer_hash(config))

    extra = tmp_path / "extra"
    shutil.copytree(base, extra)
    (extra / "additional_chat_templates").mkdir()
    (extra / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages }}")
    seen.add(tokenizer_hash(extra))
    assert len(seen) == 4
    with pytest.raises(DistillError, match="fingerprint"):
        TeacherCache(setup["root"] / "local", tokenizer_dir=template)
