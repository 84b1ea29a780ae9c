"""FSDP2 under real torchrun: 2 CPU ranks (gloo), initialised from the meta device, follow the
single-process loss curve and held-out metrics at the same global batch; their sharded (DCP)
checkpoint resumes in one process; SIGKILLed ranks resume bitwise; per-rank peak RSS stays
below one unsharded fp32 copy of model + Adam state."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from moe2edge.cli import build_parser
from moe2edge.distill.checkpoint import complete_checkpoints
from moe2edge.distill.cli import launch_torchrun, run_train, torchrun_command
from moe2edge.distill.data import micro_batches
from moe2edge.distill.distributed import decoder_layers, to_meta
from moe2edge.distill.errors import DistillError
from moe2edge.distill.pipeline import distill_student
from moe2edge.distill.student import build_student
from moe2edge.distill.train import TrainConfig, check_config
from tests._train_common import train_config, train_overrides, train_records, weights
from tests.conftest import ROOT, subprocess_env

RUN = dict(batch_size=8, max_steps=6, checkpoint_every=3, keep_checkpoints=0)
EVAL = dict(eval_every=3, eval_task_limit=4, max_new_tokens=8)


def _close(a: float, b: float, rel: float = 1e-4) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-8)


def test_two_ranks_fsdp2_match_one_process(tiny_run, tmp_path, capfd):
    # 2 ranks x 2 micro-batches of 2 rows vs 1 process with the whole batch of 8, launched the
    # way `moe2edge distill train --nproc 2` does (torchrun --standalone -m moe2edge.distill.train).
    # Gradients are reduce-scattered once per step (no sync on the first micro-batch), and the
    # held-out evaluation is sharded across the ranks with chunked logits.
    two = tmp_path / "two_ranks"
    run = dict(RUN, eval_data=tiny_run["eval"], **EVAL)
    status = launch_torchrun(2, None, train_overrides(tiny_run, two, grad_accum_steps=2, **run))
    err = capfd.readouterr().err
    assert status == 0, err[-4000:]
    assert "rank 0 of 2 on cpu" in err
    one = tmp_path / "one_process"
    distill_student(train_config(tiny_run, one, **run))

    rec_two, rec_one = train_records(two), train_records(one)
    assert [r["step"] for r in rec_two] == list(range(6)) == [r["step"] for r in rec_one]
    for a, b in zip(rec_one, rec_two, strict=True):
        assert a["reply_tokens"] == b["reply_tokens"]  # the same global batch
        for key in ("loss", "kd", "ce", "grad_norm"):
            assert _close(a[key], b[key]), (key, a, b)
        assert len(a["peak_rss_mb"]) == 1 and len(b["peak_rss_mb"]) == 2  # one per rank
    w_one, w_two = weights(one / "student"), weights(two / "student")
    assert w_one.keys() == w_two.keys()
    for name in w_one:
        torch.testing.assert_close(w_two[name], w_one[name], rtol=1e-4, atol=1e-5)
    ev_one, ev_two = train_records(one, "eval"), train_records(two, "eval")
    assert [r["step"] for r in ev_one] == [2, 5] == [r["step"] for r in ev_two]
    for a, b in zip(ev_one, ev_two, strict=True):
        assert a["tokens"] == b["tokens"]  # every held-out row, each on one rank
        assert _close(a["heldout_kl"], b["heldout_kl"]) and _close(a["perplexity"], b["perplexity"])
        assert abs(a["top1_agreement"] - b["top1_agreement"]) <= 1 / a["tokens"], (a, b)
        assert abs(a["task_acc"] - b["task_acc"]) <= 1 / EVAL["eval_task_limit"], (a, b)

    # Each rank wrote and hashed its own DCP shard; nothing was gathered into one file.
    manifest = json.loads((two / "checkpoints" / "step-00000003" / "manifest.json").read_text())
    owners = {name: entry["rank"] for name, entry in manifest["files"].items()}
    assert owners == {".metadata": 0, "__0_0.distcp": 0, "__1_0.distcp": 1, "training_state.pt": 0}

    # The 2-rank run's sharded checkpoint resumes in one process (DCP reshards), same curve.
    moved = tmp_path / "resumed"
    shutil.copytree(two / "checkpoints", moved / "checkpoints")
    distill_student(train_config(tiny_run, moved, **run))
    rec_moved = train_records(moved)
    assert [r["step"] for r in rec_moved] == [3, 4, 5]
    for a, b in zip(rec_two[3:], rec_moved, strict=True):
        assert _close(a["loss"], b["loss"]), (a, b)


@pytest.mark.parametrize("init", ["preset", "hf_checkpoint"])
def test_two_ranks_start_from_the_single_process_init_bit_for_bit(tiny_run, tmp_path, init):
    # Rank 0 builds (seeded preset) or loads (student_init, e.g. a merged MoE -> dense student)
    # the weights, rank 1 a meta skeleton; after sharding and gathering nothing has changed.
    run_dir = tmp_path / init
    extra = {"student_init": tiny_run["student"]} if init == "hf_checkpoint" else {}
    assert launch_torchrun(2, None, train_overrides(tiny_run, run_dir, max_steps=0, **extra)) == 0
    if init == "hf_checkpoint":
        want = weights(tiny_run["student"])
    else:
        vocab = len(weights(run_dir / "student")["model.embed_tokens.weight"])
        want = build_student("tiny", vocab_size=vocab, seed=0).state_dict()
    got = weights(run_dir / "student")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


def _rank_pids(agent: subprocess.Popen) -> list[int]:
    """The worker processes torchrun started (each in its own session)."""
    path = Path(f"/proc/{agent.pid}/task/{agent.pid}/children")
    return [int(pid) for pid in path.read_text().split()] if path.exists() else []


def test_two_ranks_sigkill_then_resume_is_bitwise_identical(tiny_run, tmp_path):
    # bf16 compute (MixedPrecisionPolicy) with fp32 reduction, 2 micro-batches per step.
    run = dict(
        batch_size=8,
        grad_accum_steps=2,
        max_steps=16,
        checkpoint_every=4,
        keep_checkpoints=2,
        log_every=4,
        param_dtype="bfloat16",
        reduce_dtype="float32",
    )

    def start(run_dir: Path, log_name: str) -> subprocess.Popen:
        return subprocess.Popen(
            torchrun_command(2, None, train_overrides(tiny_run, run_dir, **run)),
            cwd=ROOT,
            env=subprocess_env(),
            stdout=open(tmp_path / log_name, "w"),
            stderr=subprocess.STDOUT,
        )

    killed, reference = tmp_path / "killed", tmp_path / "reference"
    agent = start(killed, "killed.log")
    uninterrupted = start(reference, "reference.log")  # runs alongside, uninterrupted
    try:
        deadline = time.monotonic() + 300
        while not complete_checkpoints(killed) and agent.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        ranks = _rank_pids(agent)
        assert len(ranks) == 2, (tmp_path / "killed.log").read_text()[-3000:]
        for pid in ranks:  # both ranks die at once, as on a preempted node
            os.kill(pid, signal.SIGKILL)
        assert agent.wait(timeout=120) != 0
    finally:
        assert uninterrupted.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()
    assert not (killed / "student").exists(), "the run finished before it was killed"
    assert complete_checkpoints(killed)[-1].name < "step-00000016"

    overrides = train_overrides(tiny_run, killed, **run)
    assert launch_torchrun(2, None, overrides) == 0
    want, got = weights(reference / "student"), weights(killed / "student")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), f"{name} differs after resume"
    steps = [r["step"] for r in train_records(killed)]
    assert steps == [r["step"] for r in train_records(reference)]


def test_peak_rss_per_rank_is_below_one_unsharded_fp32_model_plus_adam(
    tiny_run, tmp_path, monkeypatch
):
    # A ~305M-parameter student: one fp32 copy of its weights + Adam moments is 12 bytes a
    # parameter, well above this process's baseline (~0.4 GB). Each of the 2 ranks holds half
    # of weights, gradients and Adam state (8 bytes a parameter) and, being initialised from
    # the meta device, never the whole model (rank 0 briefly holds the initial weights: 4).
    # glibc's adaptive mmap threshold (up to 32 MB) would keep this small model's freed
    # few-MB blocks in the heap, adding ~0.6 GB of RSS that no tensor holds; a fixed threshold
    # makes RSS count live memory, as it does anyway at 13B where tensors are above 32 MB.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    big = dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=20,
        num_attention_heads=16,
        num_key_value_heads=4,
    )
    run_dir = tmp_path / "big"
    overrides = train_overrides(
        tiny_run,
        run_dir,
        student_preset="100m",
        student_overrides=json.dumps(big),
        batch_size=2,
        max_steps=2,
        max_seq_len=32,
        log_every=1,
    )
    assert launch_torchrun(2, None, overrides) == 0
    params = sum(t.numel() for t in weights(run_dir / "student").values())
    assert params > 3e8
    one_copy_mb = params * 12 / 2**20
    peaks = train_records(run_dir)[-1]["peak_rss_mb"]
    assert len(peaks) == 2
    assert max(peaks) < one_copy_mb, (peaks, one_copy_mb)


def test_meta_skeleton_keeps_tied_weights_and_bad_dtypes_are_refused():
    model = build_student("tiny", vocab_size=64, tie_word_embeddings=True)
    to_meta(model)
    assert all(p.is_meta for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still one parameter
    with pytest.raises(DistillError, match="param_dtype='fp8'.*bfloat16"):
        check_config(TrainConfig(param_dtype="fp8"), has_teacher=True)


def test_cli_nproc_launches_torchrun():
    args = build_parser(["distill"]).parse_args(["distill", "train", "--nproc", "2", "lr=0.1"])
    assert args.nproc == 2 and args.handler is run_train
    cmd = torchrun_command(2, "recipes/x.yaml", ["lr=0.1"])
    assert cmd[1:] == [
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "moe2edge.distill.train", "--config", "recipes/x.yaml", "lr=0.1",
    ]  # fmt: skip


def test_global_batch_is_split_across_ranks_and_micro_batches():
    batch = list(range(100, 116))
    parts = [micro_batches(batch, rank, 2, 4) for rank in range(2)]
    assert all(len(p) == 4 and all(len(m) == 2 for m in p) for p in parts)
    assert [i for p in parts for m in p for i in m] == batch
    with pytest.raises(DistillError, match="not divisible by world size 3"):
        micro_batches(batch, 0, 3, 1)


def test_decoder_layers_are_found_for_fsdp_wrapping():
    model = build_student("tiny", vocab_size=64)
    assert decoder_layers(model) is model.model.layers
