"""Distillation benchmark: training speed (cached vs live teacher), cache size, loss table.

Prints one JSON object:
  train_tok_s_cached, train_tok_s_live   student training tokens/s (same steps, same batch)
  cache_bytes_per_token                   {k: bytes} for top-k caches of the demo teacher
  loss_table                              [{loss, heldout_kl, top1_agreement, task_acc,
                                          reply_wellformed, perplexity, subsets}] at equal
                                          steps; `ce` = CE only, others pure KD; subsets:
                                          {compound, multi_turn, long: {task_acc,
                                          reply_wellformed}} of the held-out rows

    python bench/distill.py [--teacher DIR --tokenizer DIR --data DIR] [--steps 150]

Without --teacher it builds the demo data, tokenizer and demo teacher first (~2 min).
Everything runs on the CPU; timings are noisy on shared machines, so compare the numbers
of one run with each other.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from moe2edge.distill.cache import TeacherCache, build_cache  # noqa: E402
from moe2edge.distill.demo_data import write_demo_data  # noqa: E402
from moe2edge.distill.evaluate import evaluate_heldout  # noqa: E402
from moe2edge.distill.pipeline import distill_student, make_tokenizer, pretrain_demo_teacher  # noqa: E402
from moe2edge.distill.teacher import load_teacher  # noqa: E402
from moe2edge.distill.tokenizer import load_tokenizer  # noqa: E402
from moe2edge.distill.train import TrainConfig  # noqa: E402
from moe2edge.rows import read_rows  # noqa: E402

LOSSES = ["ce", "fkl", "rkl", "jsd", "skl", "srkl", "tvd"]
MAX_SEQ_LEN, MAX_NEW_TOKENS = 128, 64  # the demo's (its longest rows are ~85 tokens)
SUBSETS = {
    "compound": lambda r: r.get("kind") == "compound",
    "multi_turn": lambda r: r.get("kind") == "multi_turn",
    "long": lambda r: bool(r.get("long")),
}


def prepare(args, work: Path) -> tuple[Path, Path, Path]:
    """(data dir, tokenizer dir, teacher dir): given, or built like the demo."""
    if args.teacher:
        return Path(args.data), Path(args.tokenizer), Path(args.teacher)
    paths = write_demo_data(work / "data", seed=0, train_size=6000, eval_size=200)
    make_tokenizer(paths["train"], work / "tokenizer", 768)
    teacher = pretrain_demo_teacher(
        TrainConfig(
            run_dir=str(work / "teacher_run"),
            train_data=str(paths["train"]),
            tokenizer=str(work / "tokenizer"),
            teacher=None,
            max_steps=400,
            max_seq_len=MAX_SEQ_LEN,
            checkpoint_every=0,
            tensorboard=False,
            plot=False,
        )
    )
    return work / "data", work / "tokenizer", teacher


def tokens_per_second(run_dir: Path) -> float:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "tok_s" in r][-1]["tok_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/bench-distill")
    (
        parser.add_argument("--teacher"),
        parser.add_argument("--tokenizer"),
        parser.add_argument("--data"),
    )
    parser.add_argument("--steps", type=int, default=150, help="training steps per loss")
    parser.add_argument("--speed-steps", type=int, default=40)
    parser.add_argument("--cache-examples", type=int, default=1024)
    parser.add_argument("--eval-rows", type=int, default=100)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data, tokenizer_dir, teacher_dir = prepare(args, work)
    train_jsonl, eval_jsonl = data / "train.jsonl", data / "eval.jsonl"
    subset = work / "train_subset.jsonl"
    subset.write_text(
        "".join(json.dumps(r) + "\n" for r in read_rows(train_jsonl)[: args.cache_examples])
    )

    # Cache size per token at several k.
    cache_bytes = {}
    for k in (8, 32, 128):
        index = build_cache(
            data=subset,
            tokenizer=tokenizer_dir,
            out=work / f"cache-k{k}",
            teacher=teacher_dir,
            k=k,
            max_seq_len=MAX_SEQ_LEN,
        )
        cache_bytes[k] = round(TeacherCache(work / f"cache-k{k}", tokenizer_dir).bytes_per_token, 1)
        del index

    base = TrainConfig(
        train_data=str(subset),
        tokenizer=str(tokenizer_dir),
        teacher=str(teacher_dir),
        student_preset="demo",
        batch_size=32,
        max_seq_len=MAX_SEQ_LEN,
        max_new_tokens=MAX_NEW_TOKENS,
        checkpoint_every=0,
        resume="none",
        tensorboard=False,
        plot=False,
        log_every=5,
        warmup_steps=10,
    )
    # Training speed: the same student and steps with the teacher live vs from the k=32 cache.
    live = replace(base, run_dir=str(work / "speed-live"), max_steps=args.speed_steps)
    cached = replace(
        base,
        run_dir=str(work / "speed-cached"),
        max_steps=args.speed_steps,
        teacher=None,
        teacher_cache=str(work / "cache-k32"),
    )
    for cfg in (live, cached):
        (Path(cfg.run_dir) / "metrics.jsonl").unlink(missing_ok=True)
        distill_student(cfg)

    # Loss table at equal steps on the full training set.
    tokenizer = load_tokenizer(tokenizer_dir)
    teacher = load_teacher(teacher_dir)
    eval_rows = read_rows(eval_jsonl)[: args.eval_rows]
    table = []
    for loss in LOSSES:
        cfg = replace(
            base,
            run_dir=str(work / f"loss-{loss}"),
            train_data=str(train_jsonl),
            max_steps=args.steps,
            loss="fkl" if loss == "ce" else loss,
            ce_ratio=1.0 if loss == "ce" else 0.0,
            temperature=1.0,
        )
        (Path(cfg.run_dir) / "metrics.jsonl").unlink(missing_ok=True)
        started = time.perf_counter()
        student_dir = distill_student(cfg)
        student = AutoModelForCausalLM.from_pretrained(student_dir)
        scoring = dict(max_seq_len=MAX_SEQ_LEN, max_new_tokens=MAX_NEW_TOKENS)
        metrics = evaluate_heldout(
            student, teacher, tokenizer, eval_rows, task_limit=len(eval_rows), **scoring
        )
        subsets = {}
        for name, keep in SUBSETS.items():
            rows = [r for r in eval_rows if keep(r)]
            if rows:
                sub = evaluate_heldout(
                    student, None, tokenizer, rows, task_limit=len(rows), **scoring
                )
                subsets[name] = {k: round(sub[k], 4) for k in ("task_acc", "reply_wellformed")}
        table.append(
            {
                "loss": loss,
                **{
                    k: round(float(metrics[k]), 4)
                    for k in (
                        "heldout_kl",
                        "top1_agreement",
                        "task_acc",
                        "reply_wellformed",
                        "perplexity",
                    )
                },
                "subsets": subsets,
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        print(json.dumps(table[-1]), file=sys.stderr)
    torch.set_num_threads(torch.get_num_threads())
    print(
        json.dumps(
            {
                "train_tok_s_cached": round(tokens_per_second(Path(cached.run_dir)), 1),
                "train_tok_s_live": round(tokens_per_second(Path(live.run_dir)), 1),
                "cache_bytes_per_token": cache_bytes,
                "loss_table": table,
                "steps_per_loss": args.steps,
                "settings": "demo teacher and data; student preset demo; batch 32; KD losses pure "
                "(ce_ratio 0) at T=1; held-out KL(teacher||student) at T=1 on reply tokens",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
