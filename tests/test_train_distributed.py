"""FSDP2 under real torchrun: 2 CPU ranks (gloo) follow the single-process loss curve at the
same global batch, and a 2-rank checkpoint resumes in one process."""

from __future__ import annotations

import shutil

import pytest
import torch

from moe2edge.cli import build_parser
from moe2edge.distill.cli import launch_torchrun, run_train, torchrun_command
from moe2edge.distill.data import micro_batches
from moe2edge.distill.distributed import decoder_layers
from moe2edge.distill.errors import DistillError
from moe2edge.distill.pipeline import distill_student
from moe2edge.distill.student import build_student
from tests._train_common import train_config, train_overrides, train_records, weights

RUN = dict(batch_size=8, max_steps=6, checkpoint_every=3, keep_checkpoints=0)


def _close(a: float, b: float, rel: float = 1e-4) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-8)


def test_two_ranks_fsdp2_match_one_process(tiny_run, tmp_path, capfd):
    # 2 ranks x 2 micro-batches of 2 rows vs 1 process with the whole batch of 8, launched the
    # way `moe2edge distill train --nproc 2` does (torchrun --standalone -m moe2edge.distill.train).
    two = tmp_path / "two_ranks"
    status = launch_torchrun(2, None, train_overrides(tiny_run, two, grad_accum_steps=2, **RUN))
    err = capfd.readouterr().err
    assert status == 0, err[-4000:]
    assert "rank 0 of 2 on cpu" in err
    one = tmp_path / "one_process"
    distill_student(train_config(tiny_run, one, **RUN))

    rec_two, rec_one = train_records(two), train_records(one)
    assert [r["step"] for r in rec_two] == list(range(6)) == [r["step"] for r in rec_one]
    for a, b in zip(rec_one, rec_two, strict=True):
        assert a["reply_tokens"] == b["reply_tokens"]  # the same global batch
        for key in ("loss", "kd", "ce", "grad_norm"):
            assert _close(a[key], b[key]), (key, a, b)
    w_one, w_two = weights(one / "student"), weights(two / "student")
    assert w_one.keys() == w_two.keys()
    for name in w_one:
        torch.testing.assert_close(w_two[name], w_one[name], rtol=1e-4, atol=1e-5)

    # The 2-rank run's checkpoint (gathered full state) resumes in one process, same curve.
    moved = tmp_path / "resumed"
    shutil.copytree(two / "checkpoints", moved / "checkpoints")
    distill_student(train_config(tiny_run, moved, **RUN))
    rec_moved = train_records(moved)
    assert [r["step"] for r in rec_moved] == [3, 4, 5]
    for a, b in zip(rec_two[3:], rec_moved, strict=True):
        assert _close(a["loss"], b["loss"]), (a, b)


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
