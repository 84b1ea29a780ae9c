"""``moe2edge distill cache``: fill (or finish) a teacher cache from the command line."""

from __future__ import annotations

import argparse
import json

from moe2edge.distill.cache.write import build_cache


def register_cache_command(sub) -> None:
    """Add ``moe2edge distill cache`` to the distill action subparsers."""
    p = sub.add_parser(
        "cache",
        help="score a data set with the teacher once into a top-k cache (local or served)",
        description="Score a JSONL data set (prompt/reply, messages or text rows) with the "
        "teacher and write its top-k "
        "token ids and log-probs into safetensors shards + index.json. Resumable.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--teacher", help="local Hugging Face teacher checkpoint directory")
    where.add_argument("--server", help="URL of a vLLM or SGLang server serving the teacher")
    p.add_argument("--api", choices=("vllm", "sglang"), default="vllm", help="server API")
    p.add_argument("--model", help="served model name (default: ask the server)")
    p.add_argument("--data", required=True, help="JSONL data set (as `train` reads it)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (shared with student)")
    p.add_argument("--out", required=True, help="cache directory (resumed if it exists)")
    p.add_argument("--k", type=int, default=32, help="top-k entries stored per token")
    p.add_argument("--max-seq-len", type=int, default=64)
    p.add_argument("--shard-examples", type=int, default=256, help="examples per shard")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (served)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward (local)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (served)")
    p.add_argument("--retries", type=int, default=5, help="retries per request (served)")
    p.add_argument(
        "--dtype",
        default="auto",
        help="local teacher dtype: auto (the checkpoint's), bf16, fp32, fp16",
    )
    p.add_argument(
        "--device-map",
        help="local teacher placement by accelerate: auto, cuda, cpu (default: all in CPU RAM)",
    )
    p.add_argument(
        "--offload-folder",
        help="local teacher: where --device-map auto offloads weights that fit nowhere else",
    )
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(handler=run_cache)


def run_cache(args: argparse.Namespace) -> int:
    names = ("data", "tokenizer", "out", "teacher", "server", "api", "k", "max_seq_len")
    names += ("shard_examples", "concurrency", "batch_size", "timeout", "retries")
    names += ("dtype", "device_map", "offload_folder")
    opts = {name: getattr(args, name) for name in names}
    index = build_cache(model_name=args.model, trust_remote_code=args.trust_remote_code, **opts)
    keys = ("num_examples", "skipped_shards", "tokens", "bytes", "bytes_per_token")
    summary = {"cache": str(args.out), "shards": len(index["shards"])}
    print(json.dumps({**summary, **{key: index[key] for key in keys}}))
    return 0
