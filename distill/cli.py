"""``moe2edge distill ...``: demo data, tokenizer, demo teacher, distillation."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from moe2edge.distill.cache.cli import register_cache_command
from moe2edge.distill.config import load_config
from moe2edge.distill.train import TrainConfig, check_config, distill_student


def register(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=help_text)
    sub = p.add_subparsers(dest="distill_command", required=True, metavar="ACTION")
    register_cache_command(sub)

    data = sub.add_parser("demo-data", help="write the built-in demo data set and grammar")
    data.add_argument("out_dir")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--train-size", type=int, default=6000)
    data.add_argument("--eval-size", type=int, default=200)
    data.set_defaults(handler=run_demo_data)

    tok = sub.add_parser("tokenizer", help="train a BPE tokenizer on a JSONL data set")
    tok.add_argument("train_jsonl")
    tok.add_argument("out_dir")
    tok.add_argument("--vocab-size", type=int, default=384)
    tok.set_defaults(handler=run_tokenizer)

    inspect = sub.add_parser(
        "inspect-teacher",
        help="size a local HF teacher from its config (meta device: no weights read)",
        description="Build the teacher from config.json on the meta device and print its "
        "parameters and active parameters per token as JSON; weight files may be absent.",
    )
    inspect.add_argument("teacher")
    inspect.add_argument("--trust-remote-code", action="store_true")
    inspect.set_defaults(handler=run_inspect)

    merge = sub.add_parser(
        "merge",
        help="dense student initialised by merging the teacher's "
        "experts (weighted by router usage on calibration data)",
    )
    merge.add_argument("teacher")
    merge.add_argument("out_dir")
    merge.add_argument("--tokenizer", required=True)
    merge.add_argument("--calib-data", required=True, help="JSONL with prompt/reply rows")
    merge.add_argument("--keep-experts", type=int, default=None, help="most-used experts kept")
    merge.add_argument("--calib-examples", type=int, default=64)
    merge.set_defaults(handler=run_merge)

    merged = sub.add_parser(
        "merge-adapters",
        help="merge the peft adapters of a `finetune merge_adapters=false` run into its base",
    )
    merged.add_argument("model_dir", help="the finetuned dir (base + adapter/)")
    merged.add_argument("out_dir")
    merged.set_defaults(handler=run_merge_adapters)

    for action, help_line, handler in (
        ("train", "distil a teacher into a student (config YAML + key=value)", run_train),
        ("draft", "distil a small draft model for speculative decoding of a student", run_draft),
        ("finetune", "domain fine-tuning of a distilled student with peft adapters", run_finetune),
        ("demo-teacher", "DEMO ONLY: pre-train the tiny DeepSeek-V3 teacher", run_demo_teacher),
    ):
        t = sub.add_parser(action, help=help_line)
        t.add_argument("--config", help="YAML recipe (see recipes/)")
        t.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
        if action == "train":
            t.add_argument(
                "--nproc",
                type=int,
                default=1,
                help="processes (GPUs) on this machine: > 1 launches torchrun with FSDP2",
            )
        t.set_defaults(handler=handler)


def run_demo_data(args: argparse.Namespace) -> int:
    from moe2edge.distill.demo_data import write_demo_data

    paths = write_demo_data(args.out_dir, args.seed, args.train_size, args.eval_size)
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


def run_tokenizer(args: argparse.Namespace) -> int:
    from moe2edge.distill.pipeline import make_tokenizer

    print(f"wrote {make_tokenizer(args.train_jsonl, args.out_dir, args.vocab_size)}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from moe2edge.distill.teacher import inspect_teacher

    print(json.dumps(inspect_teacher(args.teacher, trust_remote_code=args.trust_remote_code)))
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from moe2edge.distill.pipeline import merge_teacher_into_dense

    out = merge_teacher_into_dense(
        args.teacher,
        args.tokenizer,
        args.calib_data,
        args.out_dir,
        args.keep_experts,
        args.calib_examples,
    )
    print(f"wrote {out}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    cfg = load_config(TrainConfig, args.config, args.overrides)
    check_config(cfg, has_teacher=cfg.teacher is not None)  # fail here, not in N ranks
    if args.nproc > 1:
        return launch_torchrun(args.nproc, args.config, args.overrides)
    print(f"wrote {distill_student(cfg)}")
    return 0


def run_draft(args: argparse.Namespace) -> int:
    from moe2edge.distill.draft import DraftConfig, train_draft

    print(f"wrote {train_draft(load_config(DraftConfig, args.config, args.overrides))}")
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    from moe2edge.distill.finetune import FinetuneConfig, finetune_student

    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    check_config(cfg, has_teacher=cfg.teacher is not None)
    print(f"wrote {finetune_student(cfg)}")
    return 0


def run_merge_adapters(args: argparse.Namespace) -> int:
    from moe2edge.distill.finetune import merge_adapter_dir

    print(f"wrote {merge_adapter_dir(args.model_dir, args.out_dir)}")
    return 0


def torchrun_command(nproc: int, config: str | None, overrides: list[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m moe2edge.distill.train``
    plus the recipe and overrides: every rank runs ``moe2edge.distill.train.main``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", str(nproc), "-m", "moe2edge.distill.train"]
    if config:
        cmd += ["--config", config]
    return cmd + list(overrides)


def launch_torchrun(nproc: int, config: str | None, overrides: list[str]) -> int:
    """Run training in ``nproc`` ranks on this machine: 0 on success, 2 if any rank failed
    (rank 0 has printed a user error's message; a crash shows its traceback)."""
    proc = subprocess.run(torchrun_command(nproc, config, overrides))
    return 2 if proc.returncode else 0


def run_demo_teacher(args: argparse.Namespace) -> int:
    from moe2edge.distill.pipeline import pretrain_demo_teacher

    print(f"wrote {pretrain_demo_teacher(load_config(TrainConfig, args.config, args.overrides))}")
    return 0
