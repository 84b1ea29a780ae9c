"""Exact resume: SIGKILL mid-run then resume gives bitwise-identical weights; half-written or
damaged checkpoints are never used; a different config refuses to resume and changes nothing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time

import pytest
import torch

from moe2edge.cli import main as cli_main
from moe2edge.distill.checkpoint import complete_checkpoints, find_checkpoint, verify_checkpoint
from moe2edge.distill.errors import DistillError
from moe2edge.distill.pipeline import distill_student
from tests._train_common import train_config, train_overrides, train_records, tree_digest, weights
from tests.conftest import PYTHON, ROOT, subprocess_env

# On-policy with GKD mixing: exercises sampling RNG and the data position as well as the weights.
KILL_RUN = dict(
    max_steps=40,
    checkpoint_every=5,
    keep_checkpoints=2,
    mode="on_policy",
    lambda_on_policy=0.3,
    max_new_tokens=8,
    log_every=5,
)


def test_sigkill_mid_run_then_resume_is_bitwise_identical(tiny_run, tmp_path):
    run_dir = tmp_path / "killed"
    log = open(tmp_path / "child.log", "w")
    child = subprocess.Popen(
        [PYTHON, "-m", "moe2edge.distill.train", *train_overrides(tiny_run, run_dir, **KILL_RUN)],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def kill_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 180
        while not complete_checkpoints(run_dir) and child.poll() is None:
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)

    # The uninterrupted reference runs here while the child starts up and trains.
    killer = threading.Thread(target=kill_after_first_checkpoint)
    killer.start()
    try:
        reference = distill_student(train_config(tiny_run, tmp_path / "reference", **KILL_RUN))
    finally:
        killer.join()
        log.close()
    assert child.wait(timeout=30) == -signal.SIGKILL, (tmp_path / "child.log").read_text()
    assert not (run_dir / "student").exists(), "the run finished before it was killed"
    killed_at = complete_checkpoints(run_dir)[-1].name
    assert killed_at < "step-00000040"

    resumed = distill_student(train_config(tiny_run, run_dir, resume="auto", **KILL_RUN))
    want, got = weights(reference), weights(resumed)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), f"{name} differs after resume"
    steps = [r["step"] for r in train_records(run_dir)]
    assert steps == [r["step"] for r in train_records(tmp_path / "reference")]
    assert any(r["on_policy"] for r in train_records(run_dir))  # samples were trained on


def test_half_written_and_damaged_checkpoints_are_never_used(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    cfg = train_config(tiny_run, run_dir, max_steps=4, checkpoint_every=2)
    distill_student(cfg)
    root = run_dir / "checkpoints"
    good = root / "step-00000002"
    verify_checkpoint(good)
    # A writer killed mid-copy leaves a .tmp dir (even a full-looking one) ...
    shutil.copytree(good, root / ".step-00000003.tmp")
    # ... or, copied by hand, a dir without the manifest that is written last.
    shutil.copytree(good, root / "step-00000004")
    (root / "step-00000004" / "manifest.json").unlink()
    # A complete-looking checkpoint whose weights changed after the manifest was written.
    damaged = root / "step-00000005"
    shutil.copytree(good, damaged)
    blob = bytearray((damaged / "__0_0.distcp").read_bytes())  # rank 0's DCP shard
    blob[-1] ^= 0xFF
    (damaged / "__0_0.distcp").write_bytes(bytes(blob))

    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-00000002", "step-00000005"]
    cfg.resume = "auto"
    assert find_checkpoint(cfg) == good  # the damaged one is skipped with a warning
    cfg.resume = str(damaged)
    with pytest.raises(DistillError, match="sha256"):
        find_checkpoint(cfg)
    cfg.resume = str(root / ".step-00000003.tmp")
    with pytest.raises(DistillError, match="not a complete checkpoint"):
        find_checkpoint(cfg)

    # Resuming with all of that lying around continues from step 2 and matches a clean run.
    cfg.resume, cfg.max_steps = "auto", 4
    resumed = distill_student(cfg)
    clean = distill_student(train_config(tiny_run, tmp_path / "clean", max_steps=4))
    for name, tensor in weights(clean).items():
        assert torch.equal(tensor, weights(resumed)[name])


def test_resume_with_a_different_config_stops_and_changes_nothing(tiny_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    distill_student(train_config(tiny_run, run_dir, max_steps=4, checkpoint_every=2))
    before = tree_digest(run_dir)
    capsys.readouterr()
    args = train_overrides(tiny_run, run_dir, max_steps=4, checkpoint_every=2, lr=0.001, loss="rkl")
    assert cli_main(["distill", "train", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe2edge: error: cannot resume from")
    assert "differing keys: loss, lr" in err
    assert "0.003 in the checkpoint, 0.001 now" in err
    assert "run_dir=" in err and "resume=none" in err
    assert tree_digest(run_dir) == before  # checkpoints, weights, metrics: all untouched

    # resume=none starts over but keeps the old checkpoints, moved aside.
    assert cli_main(["distill", "train", *args, "resume=none"]) == 0
    moved = list(run_dir.glob("checkpoints-superseded-*"))
    assert len(moved) == 1
    old = {k: v for k, v in before.items() if k.startswith("checkpoints/")}
    assert tree_digest(moved[0]) == {k.split("/", 1)[1]: v for k, v in old.items()}
    assert train_records(run_dir)[0]["step"] == 0


def test_killed_run_left_metrics_are_rewritten_not_duplicated(tiny_run, tmp_path):
    """metrics.jsonl lines written after the last checkpoint are dropped on resume."""
    run_dir = tmp_path / "run"
    distill_student(train_config(tiny_run, run_dir, max_steps=4, checkpoint_every=2))
    os.replace(run_dir / "student", tmp_path / "first_student")
    distill_student(train_config(tiny_run, run_dir, max_steps=4, checkpoint_every=2))
    assert [r["step"] for r in train_records(run_dir)] == [0, 1, 2, 3]
