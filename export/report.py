"""Accuracy of quantized bundles against their FP32 parent, run through the runtime itself.

For every evaluation row the FP32 bundle decodes greedily (KV cache, step by step), keeping
the logits before each choice. Each variant then scores that same FP32 path in one prefill:

- ``kl``: mean KL(FP32 || variant) of the next-token distributions along the FP32 path;
- ``top1_agreement``: share of those steps where the variant's argmax is the FP32 choice;
- ``task_acc``: the variant's own greedy replies (step by step, to end of turn), exact match
  of their action sequence (every ``[...]`` span, in order: a compound command has several);
  ``exact_greedy=False`` reconstructs them from the teacher-forced pass and decodes only
  from the first disagreement on (``own_greedy_reply``): faster, and equal up to
  prefill-vs-decode near-ties;
- ``reply_wellformed``: the share of those replies that ``reply_check`` accepts (the caller's
  domain rule, e.g. the demo's ``demo_domain.is_wellformed``; None without one);
- ``perplexity``: on the reference replies (``" " + reply`` + end-of-turn, as in training);
- ``weight_bytes``: initializer + constant bytes of the graph (``file_bytes``: the files);
- ``load_s``: ``Generator.from_bundle`` (sha256 of every file + session creation).

The actions of a reply are its ``[...]`` spans, the demo data's format (distill is not
imported here: export stands apart from it, hence ``reply_check`` is passed in).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from tqdm import tqdm

from moe2edge.export.bundle import update_manifest
from moe2edge.export.calibration import PromptEncoder, read_rows
from moe2edge.export.derived import model_weight_bytes
from moe2edge.export.errors import ExportError
from moe2edge.export.parity import decode_room, runtime_greedy_with_logits
from moe2edge.fileio import sha256_file
from moe2edge.runtime.generate import Generator
from moe2edge.runtime.manifest import read_manifest

log = logging.getLogger(__name__)

ACTION = re.compile(r"\[[^\]]*\]")
JSON_KEYS = (
    "bundle",
    "target",
    "precision",
    "method",
    "weight_bytes",
    "kl",
    "top1_agreement",
    "task_acc",
    "reply_wellformed",
    "perplexity",
)


def extract_action(reply: str) -> str | None:
    match = ACTION.search(reply)
    return match.group(0) if match else None


def extract_actions(reply: str) -> list[str]:
    return ACTION.findall(reply)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def greedy_path(gen: Generator, prompt_ids: list[int], max_new_tokens: int):
    """FP32 greedy choices (eos included when reached) and the logits before each."""
    tokens, steps, hit_eos = runtime_greedy_with_logits(gen, prompt_ids, max_new_tokens)
    return tokens + ([int(np.argmax(steps[-1]))] if hit_eos else []), steps


def scored_logits(gen: Generator, prompt_ids: list[int], continuation: list[int]) -> np.ndarray:
    """Logits predicting each token of ``continuation`` after the prompt, in one prefill."""
    ids = prompt_ids + continuation[:-1]
    logits = gen.engine.forward(ids, gen.engine.new_cache(), all_logits=True)
    start = len(prompt_ids) - 1
    return logits[start : start + len(continuation)]


def reference_paths(gen: Generator, rows: list[dict], enc: PromptEncoder, max_new: int) -> list:
    paths = []
    for row in tqdm(rows, desc="fp32 greedy paths", unit="prompt", mininterval=2.0):
        prompt = enc.prompt(row)
        chosen, logits = greedy_path(gen, prompt, max_new)
        paths.append((prompt, chosen, log_softmax(logits)))
    return paths


def greedy_reply(
    gen: Generator, prompt_ids: list[int], max_new: int, start: list[int] | None = None
) -> str:
    """The bundle's own greedy reply (after ``start``, its known first tokens), decoded step
    by step to end of turn, ``max_new`` tokens or the end of the context."""
    engine = gen.engine
    max_new = min(max_new, decode_room(engine, prompt_ids))
    tokens = list(start or [])
    if len(tokens) < max_new:
        cache = engine.new_cache()
        logits = engine.forward(prompt_ids + tokens, cache)
        while len(tokens) < max_new:
            token = int(np.argmax(logits))
            if token in gen.eos_token_ids:
                break
            tokens.append(token)
            if len(tokens) < max_new:
                logits = engine.forward([token], cache)
    return gen.tokenizer.decode(tokens)


def own_greedy_reply(
    gen: Generator, prompt: list[int], chosen: list[int], argmax: np.ndarray, max_new: int
) -> str:
    """The variant's greedy reply, reusing the teacher-forced pass.

    Along the FP32 path, the variant's argmax ``argmax[t]`` is its own greedy choice as long
    as every earlier choice agreed (the runtime's logits do not depend on how the tokens are
    split into forward calls). So its reply is the FP32 path up to the first disagreement,
    then its own choice there, then step-by-step decoding: only diverging prompts decode.
    """
    differ = np.nonzero(argmax != np.asarray(chosen))[0]
    if not len(differ):  # the same reply as FP32, eos included
        return gen.tokenizer.decode([t for t in chosen if t not in gen.eos_token_ids])
    j = int(differ[0])
    own = int(argmax[j])
    if own in gen.eos_token_ids:
        return gen.tokenizer.decode(chosen[:j])
    return greedy_reply(gen, prompt, max_new, chosen[:j] + [own])


def evaluate(
    gen: Generator,
    rows: list[dict],
    enc: PromptEncoder,
    paths: list,
    max_new: int,
    desc: str,
    is_reference: bool = False,
    exact_greedy: bool = False,
    reply_check: Callable[[str], bool] | None = None,
) -> dict[str, Any]:
    """Metrics of one bundle over ``rows`` (see the module docstring)."""
    kl_sum, agree, steps, nll, reply_tokens, hits, scored = 0.0, 0, 0, 0.0, 0, 0, 0
    wellformed = 0
    for row, (prompt, chosen, ref_logp) in tqdm(
        list(zip(rows, paths, strict=True)), desc=desc, unit="prompt", mininterval=2.0
    ):
        logp = log_softmax(scored_logits(gen, prompt, chosen))
        argmax = logp.argmax(-1)
        kl_sum += float((np.exp(ref_logp) * (ref_logp - logp)).sum())
        agree += int((argmax == np.asarray(chosen)).sum())
        steps += len(chosen)
        # the reference reply's tokens that the context holds after the prompt (a long chat's
        # may not all fit, as training truncates it at max_seq_len)
        reply = enc.reply(row)[: decode_room(gen.engine, prompt)] if row.get("reply") else []
        if reply:
            reply_logp = log_softmax(scored_logits(gen, prompt, reply))
            nll -= float(reply_logp[np.arange(len(reply)), reply].sum())
            reply_tokens += len(reply)
        if row.get("action"):
            if is_reference:  # the FP32 greedy reply is the path itself
                text = gen.tokenizer.decode([t for t in chosen if t not in gen.eos_token_ids])
            elif exact_greedy:
                text = greedy_reply(gen, prompt, max_new)
            else:
                text = own_greedy_reply(gen, prompt, chosen, argmax, max_new)
            text = text.strip()
            hits += extract_actions(text) == extract_actions(row["action"])
            wellformed += bool(reply_check and reply_check(text))
            scored += 1
    return {
        "kl": kl_sum / max(1, steps),
        "top1_agreement": agree / max(1, steps),
        "task_acc": hits / scored if scored else None,
        "reply_wellformed": wellformed / scored if scored and reply_check else None,
        "perplexity": float(np.exp(nll / reply_tokens)) if reply_tokens else None,
        "steps": steps,
        "prompts": len(rows),
    }


def bundle_sizes(bundle_dir: Path, manifest: dict[str, Any]) -> tuple[int, int]:
    model_file = manifest["io"]["model_file"]
    model = onnx.load(str(bundle_dir / model_file), load_external_data=False)
    files = sum(
        meta["bytes"]
        for name, meta in manifest["files"].items()
        if name == model_file or name.startswith(model_file)
    )
    return model_weight_bytes(model), files


def find_reference(bundles: list[Path], reference: str | Path | None) -> Path:
    """The FP32 bundle: given, among the bundles, or the parent the variants name."""
    if reference is not None:
        return Path(reference)
    for b in bundles:
        m = read_manifest(b)
        p = m["precision"]
        if p.get("weights") == "fp32" and not p.get("parent") and m.get("target") == "onnxruntime":
            return b
    for b in bundles:
        parent = read_manifest(b)["precision"].get("parent")
        if parent:
            return (b.resolve().parent / parent["path"]).resolve()
    raise ExportError("no FP32 bundle among the bundles and none named as parent: pass --reference")


def check_lineage(variant: Path, manifest: dict[str, Any], reference: Path, ref_manifest: dict):
    parent = manifest["precision"].get("parent")
    if not parent:
        return
    ref_model = ref_manifest["files"][ref_manifest["io"]["model_file"]]["sha256"]
    if parent.get("model_sha256") != ref_model:
        raise ExportError(
            f"{variant} was made from another FP32 model than {reference} (model sha256 "
            f"{parent.get('model_sha256', '?')[:12]} vs {ref_model[:12]}); pass its own "
            "parent with --reference"
        )


def report(
    bundles: list[str | Path],
    eval_jsonl: str | Path | None = None,
    reference: str | Path | None = None,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    write: bool = True,
    exact_greedy: bool = True,
    reply_check: Callable[[str], bool] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate every bundle against the FP32 reference; rows in the order given.
    ``reply_check``: the domain's well-formed-reply rule (``reply_wellformed``), if any."""
    bundles = [Path(b) for b in bundles]
    ref_dir = find_reference(bundles, reference)
    t0 = time.perf_counter()
    ref = Generator.from_bundle(ref_dir)
    ref_load = time.perf_counter() - t0
    ref_manifest = ref.engine.manifest
    if eval_jsonl is None:
        eval_jsonl = (ref_manifest.get("accuracy") or {}).get("eval", {}).get("file")
        if not eval_jsonl:
            raise ExportError(
                "pass --eval JSONL (rows with 'utterance'/'prompt', 'reply', 'action')"
            )
    rows = read_rows(eval_jsonl, limit)
    enc = PromptEncoder(ref_dir, ref_manifest)
    max_new = max_new_tokens or ref.default_max_new_tokens
    paths = reference_paths(ref, rows, enc, max_new)
    eval_info = {
        "file": str(Path(eval_jsonl).resolve()),
        "sha256": sha256_file(eval_jsonl),
        "prompts": len(rows),
        "max_new_tokens": max_new,
        "task_acc_mode": "greedy" if exact_greedy else "teacher-forced, greedy from divergence",
    }
    results = []
    order = [ref_dir] + [b for b in bundles if b.resolve() != ref_dir.resolve()]
    for b in order:
        if b.resolve() == ref_dir.resolve():
            gen, load_s, manifest = ref, ref_load, ref_manifest
        else:
            t0 = time.perf_counter()
            gen = Generator.from_bundle(b)
            load_s = time.perf_counter() - t0
            manifest = gen.engine.manifest
            check_lineage(b, manifest, ref_dir, ref_manifest)
        is_ref = b.resolve() == ref_dir.resolve()
        metrics = evaluate(
            gen, rows, enc, paths, max_new, f"eval {b.name}", is_ref, exact_greedy, reply_check
        )
        weight_bytes, file_bytes = bundle_sizes(b, manifest)
        prec = manifest["precision"]
        row = {
            "bundle": str(b),
            "target": manifest.get("target", "onnxruntime"),
            "precision": prec.get("weights"),
            "method": prec.get("method"),
            "block_size": prec.get("block_size"),
            "weight_bytes": weight_bytes,
            "file_bytes": file_bytes,
            **metrics,
            "load_s": round(load_s, 4),
        }
        results.append(row)
    ref_row = results[0]
    for row in results:
        row["weight_ratio"] = round(row["weight_bytes"] / ref_row["weight_bytes"], 4)
        row["task_acc_delta"] = (
            row["task_acc"] - ref_row["task_acc"]
            if row["task_acc"] is not None and ref_row["task_acc"] is not None
            else None
        )
    if write:
        ref_model = ref_manifest["files"][ref_manifest["io"]["model_file"]]["sha256"]
        for b, row in zip(order, results, strict=True):
            acc = {
                k: v for k, v in row.items() if k not in ("bundle", "target", "precision", "method")
            }
            acc["reference"] = {"path": str(ref_dir.resolve()), "model_sha256": ref_model}
            acc["eval"] = eval_info
            update_manifest(b, "accuracy", acc)
    position = {b.resolve(): i for i, b in enumerate(order)}
    wanted = [position[b.resolve()] for b in bundles]
    if ref_dir.resolve() not in {b.resolve() for b in bundles}:
        wanted = [0] + wanted
    return [results[i] for i in wanted]


def json_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The documented ``--json`` keys first, then the extras (block_size, sizes, load time)."""
    return [{**{k: r.get(k) for k in JSON_KEYS}, **r} for r in rows]


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| bundle | target | precision | method | block | weight MB | x FP32 | KL | top-1 "
        "| task acc | well-formed | perplexity | load s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {Path(r['bundle']).name} | {r['target']} | {r['precision']} | {r['method']} "
        f"| {r.get('block_size') or '-'} | {r['weight_bytes'] / 1e6:.3f} | {r['weight_ratio']:.3f} "
        f"| {_fmt(r['kl'], '.5f')} | {_fmt(r['top1_agreement'], '.4f')} "
        f"| {_fmt(r['task_acc'], '.3f')} | {_fmt(r.get('reply_wellformed'), '.3f')} "
        f"| {_fmt(r['perplexity'], '.4f')} | {r['load_s']:.3f} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"
