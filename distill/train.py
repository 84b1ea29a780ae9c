"""The training recipe: distil a teacher into a student (or pre-train the demo teacher).

One readable loop in the style of torchtune's recipes, driven by ``TrainConfig`` (YAML +
``key=value`` overrides): AdamW, linear warmup + cosine decay, gradient clipping, tqdm.

- modes (distill/modes.py): off-policy on a data set with a live teacher or a top-k teacher
  cache, sequence-level KD, on-policy (GKD);
- scale (distill/distributed.py): the same loop under ``torchrun --nproc_per_node N`` with
  FSDP2 (meta-device init, ``MixedPrecisionPolicy``, gradients reduced once per step); the
  global batch ``batch_size`` is split across ranks and ``grad_accum_steps``, and the loss is a
  mean over the reply tokens of the whole global batch, so N ranks x M micro-batches compute
  the same step as one process; activation checkpointing, bf16 autocast on GPUs, peft adapters;
- exact resume (distill/checkpoint.py): ``resume=auto`` continues from the latest complete,
  verified, sharded (DCP) checkpoint, bit for bit;
- evaluation and logging (distill/evaluate.py, distill/metrics.py): held-out KL, top-1
  agreement, perplexity, task accuracy; ``metrics.jsonl``, TensorBoard, ``curves.png``.

Run it as ``python -m moe2edge.distill.train --config recipes/x.yaml key=value`` or under torchrun
(``main``); ``moe2edge distill train --nproc N`` launches torchrun for you. ``main`` imports
nothing that imports this module, so ``-m`` runs it once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from moe2edge.distill.adapters import (
    adapter_method,
    add_adapters,
    make_optimizer,
    set_stage,
    stage_at,
)
from moe2edge.distill.attention_transfer import (
    attention_transfer_loss,
    eager_attention,
    set_attention,
)
from moe2edge.distill.checkpoint import (
    load_checkpoint,
    save_checkpoint,
    save_final,
    select_checkpoint,
)
from moe2edge.distill.config import load_config, to_dict
from moe2edge.distill.data import (
    IGNORE_INDEX,
    ExampleStream,
    collate,
    collate_packed,
    encode_rows,
    micro_batches,
    pack,
    packed_attention_mask,
    packed_like,
    read_data,
    step_examples,
)
from moe2edge.distill.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    cleanup,
    full_tensor,
    gather_objects,
    init_distributed,
    peak_rss_mb,
    shard_model,
)
from moe2edge.distill.errors import DistillError
from moe2edge.distill.evaluate import evaluate_heldout
from moe2edge.distill.losses import distillation_loss
from moe2edge.distill.metrics import RunLogger, plot_curves
from moe2edge.distill.modes import (
    generate_teacher_dataset,
    on_policy_examples,
    use_on_policy,
)
from moe2edge.distill.student import build_student, load_student
from moe2edge.distill.teacher import is_placed, load_teacher
from moe2edge.distill.tokenizer import apply_special_ids, check_vocab_matches, load_tokenizer
from moe2edge.distill.train_config import TrainConfig, check_config, lr_at
from moe2edge.fileio import sha256_file

log = logging.getLogger(__name__)


def _autocast(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16:
        return partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    return nullcontext


def prepare_model(model: torch.nn.Module, cfg: TrainConfig, info: DistInfo) -> torch.nn.Module:
    """Adapters (peft), activation checkpointing, device placement and FSDP2 sharding.

    Under torchrun only rank 0's ``model`` needs real weights (the others' may be on the meta
    device): ``shard_model`` broadcasts them into every rank's shards.
    """
    model = add_adapters(model, cfg)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if info.enabled:
        return shard_model(model, info, cfg.param_dtype, cfg.reduce_dtype)
    return model.to(info.device)


def _open_cache(path: str, cfg: TrainConfig, data_path: str | None, lengths: list[int]):
    """The verified cache for the examples of ``data_path`` (``lengths``: their token counts)."""
    from moe2edge.distill.cache import TeacherCache

    cache = TeacherCache(path, tokenizer_dir=cfg.tokenizer, verify=True)
    meta = cache.meta
    if data_path is not None:
        want = meta.get("dataset", {}).get("sha256")
        if want and want != sha256_file(data_path):
            raise DistillError(
                f"the teacher cache {path} was made on another data set than {data_path} "
                f"(sha256 differs); train on the data the cache was made from, or rebuild it"
            )
    if len(cache) != len(lengths) or meta.get("max_seq_len") != cfg.max_seq_len:
        raise DistillError(
            f"the teacher cache {path} holds {len(cache)} examples at max_seq_len="
            f"{meta.get('max_seq_len')}, the data set has {len(lengths)} at max_seq_len="
            f"{cfg.max_seq_len}; use the same max_seq_len and data set as the cache"
        )
    cache.check_lengths(lengths, str(data_path))  # rows line up with the tokens, example by example
    return cache


def train_step(step, model, teacher, cache, examples, tokenizer, cfg, info, autocast) -> dict:
    """One optimizer step's forward/backward over this rank's micro-batches; returns sums."""
    parts, pool = step_examples(
        examples, step, cfg.batch_size, cfg.seed, info.rank, info.world_size, cfg.grad_accum_steps
    )
    warming_up = step < cfg.ce_warmup_steps  # CE only, on the data set's replies
    on_policy = (
        cfg.mode == "on_policy"
        and not warming_up
        and use_on_policy(step, cfg.seed, cfg.lambda_on_policy)
    )
    first_row = info.rank * (cfg.batch_size // info.world_size)
    batches = []
    for m, part in enumerate(parts):
        exs = [pool[i] for i in part]
        if on_policy:  # the student's own replies, sampled without gradient
            row0 = first_row + m * len(part)
            exs = on_policy_examples(
                model,
                exs,
                list(range(row0, row0 + len(part))),
                step=step,
                seed=cfg.seed,
                tokenizer=tokenizer,
                max_seq_len=cfg.max_seq_len,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.sample_temperature,
                info=info,
                device=info.device,
                autocast=autocast,
            )
        if cfg.packing:
            lengths = [len(ids) for ids, _ in exs]
            batch = collate_packed(exs, pack(lengths, cfg.max_seq_len), tokenizer.pad_token_id)
        else:
            batch = collate(exs, tokenizer.pad_token_id)
        batches.append((part, batch))
    # The loss is a mean over the reply tokens of the whole global batch.
    local = sum(int((b["labels"] != IGNORE_INDEX).sum()) for _, b in batches)
    total = all_reduce_sum(torch.tensor([float(local)], device=info.device), info)
    total_tokens = max(float(total.item()), 1.0)
    sums = torch.zeros(4, dtype=torch.float64, device=info.device)
    from_cache = cache is not None and not on_policy
    attend = cfg.attention_weight > 0 and not warming_up and teacher is not None
    ce_ratio = 1.0 if (teacher is None and cache is None) or warming_up else cfg.ce_ratio
    if on_policy:  # no CE on the student's own samples: it would reinforce them (as TRL's GKD)
        ce_ratio = 0.0
    for m, (part, batch) in enumerate(batches):
        if info.enabled:  # FSDP2: reduce-scatter the gradients after the last micro-batch only
            last = m == len(batches) - 1
            model.set_requires_gradient_sync(last or cfg.sync_every_micro_batch)
        batch = {k: v.to(info.device) for k, v in batch.items()}
        # Right padding + causal attention: no real token attends to the pads after it, so no
        # attention mask is needed, and HF skips building a padded mask (~20 ms a call on CPU).
        positions = batch.get("position_ids")  # packed rows: attention within each example
        masks: dict = {}  # one packed mask per attention form (student and teacher may share)
        with autocast():
            student_out = model(
                input_ids=batch["input_ids"],
                position_ids=positions,
                attention_mask=_packed_mask(model, positions, masks),
                use_cache=False,
                output_attentions=attend,
            )
            logits = student_out.logits
        targets, teacher_attentions = {}, None
        asks_teacher = ce_ratio < 1.0  # a CE-only step (ce_ratio 1, the CE warm-up) asks none
        if (
            asks_teacher and from_cache
        ):  # the teacher's top-k, scored once by `moe2edge distill cache`
            width = batch["input_ids"].shape[1]
            lengths = [len(pool[i][0]) for i in part]
            ids, lps, tail = cache.batch(part, pad_to=max(lengths) if cfg.packing else width)
            if cfg.packing:  # per example -> the packed rows' layout
                rows = pack(lengths, cfg.max_seq_len)
                ids, lps, tail = (packed_like(t, lengths, rows, width) for t in (ids, lps, tail))
            targets["teacher_topk_ids"] = ids.to(info.device)
            targets["teacher_topk_logprobs"] = lps.to(info.device)
            targets["teacher_topk_tail"] = tail.to(info.device)
        live_logits = asks_teacher and not from_cache and teacher is not None
        if live_logits or attend:  # attend implies a live teacher
            with torch.no_grad(), autocast():
                teacher_out = teacher(
                    input_ids=batch["input_ids"],
                    position_ids=positions,
                    attention_mask=_packed_mask(teacher, positions, masks),
                    use_cache=False,
                    output_attentions=attend,
                )
            if live_logits:
                targets["teacher_logits"] = teacher_out.logits
            teacher_attentions = teacher_out.attentions
        out = distillation_loss(
            logits,
            batch["labels"],
            **targets,
            loss=cfg.loss,
            temperature=cfg.temperature,
            ce_ratio=ce_ratio,
            beta=cfg.beta,
            alpha=cfg.alpha,
            chunk_size=cfg.loss_chunk_size,
        )
        if attend:  # where the teacher looks (distill/attention_transfer.py)
            out["loss"] = out["loss"] + cfg.attention_weight * attention_transfer_loss(
                student_out.attentions,
                teacher_attentions,
                batch["attention_mask"],
                cfg.attention_layers,
            )
        share = int((batch["labels"] != IGNORE_INDEX).sum()) / total_tokens
        # FSDP2 averages gradients over ranks; undo that, the token mean is already global.
        (out["loss"] * (share * info.world_size)).backward()
        parts_now = [out["loss"].detach() * share, out["kd"].detach() * share]
        parts_now += [out["ce"].detach() * share, batch["attention_mask"].sum()]
        sums += torch.stack([x.double() for x in parts_now])
    return {"sums": sums, "reply_tokens": total_tokens, "on_policy": on_policy}


def _packed_mask(model, positions: torch.Tensor | None, masks: dict) -> torch.Tensor | None:
    """Packed rows' mask for ``model`` (``data.packed_attention_mask``), built once per
    attention form in ``masks``; None unpacked."""
    if positions is None:
        return None
    form = (model.config._attn_implementation, model.dtype)
    if form not in masks:
        masks[form] = packed_attention_mask(positions, *form)
    return masks[form]


def _seq_kd_data(teacher, tokenizer, cfg: TrainConfig, info: DistInfo, autocast) -> str:
    out = cfg.seq_kd_data or str(Path(cfg.run_dir) / "seq_kd_train.jsonl")
    return str(
        generate_teacher_dataset(
            teacher,
            tokenizer,
            cfg.train_data,
            out,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.seq_kd_temperature,
            seed=cfg.seed,
            batch_size=cfg.eval_batch_size,
            teacher_id=str(cfg.teacher),
            info=info,
            device=info.device,
            autocast=autocast,
        )
    )


def train_model(model, teacher, tokenizer, cfg: TrainConfig, out_name: str) -> Path:
    """Train ``model`` (against ``teacher`` / ``cfg.teacher_cache``, else CE only).

    Returns the saved HF checkpoint directory ``run_dir/out_name``. Under torchrun every rank
    calls this with the same arguments.
    """
    check_config(cfg, teacher is not None)
    info = init_distributed(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.run_dir)
    if not Path(cfg.train_data).is_file():
        raise DistillError(f"training data {cfg.train_data} does not exist")
    resume_from = select_checkpoint(cfg, info)  # before anything is written
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    autocast = _autocast(info.device, cfg.bf16)
    if teacher is not None:
        if not is_placed(teacher):  # a device_map teacher stays where accelerate put it
            teacher.to(info.device)
        teacher.eval().requires_grad_(False)
    if cfg.attention_weight > 0:  # sdpa / flash attention return no maps
        attention_was = eager_attention(model, teacher)
    data_path = cfg.train_data
    if cfg.mode == "seq_kd":
        data_path = _seq_kd_data(teacher, tokenizer, cfg, info, autocast)
    if cfg.streaming:  # this rank's rows, encoded as the steps need them
        per_rank = cfg.batch_size // info.world_size
        examples = ExampleStream(
            tokenizer, data_path, cfg.max_seq_len, per_rank, info.rank, info.world_size
        )
    else:
        examples = encode_rows(tokenizer, read_data(data_path), cfg.max_seq_len)
        if not examples:
            raise DistillError(f"training data {data_path} is empty")
    micro_batches(list(range(cfg.batch_size)), 0, info.world_size, cfg.grad_accum_steps)
    cache = None
    if cfg.teacher_cache:
        lengths = examples.lengths() if cfg.streaming else [len(e[0]) for e in examples]
        cache = _open_cache(cfg.teacher_cache, cfg, cfg.train_data, lengths)
    eval_rows, eval_teacher = None, teacher
    if cfg.eval_data:
        if not Path(cfg.eval_data).is_file():
            raise DistillError(f"eval_data {cfg.eval_data} does not exist")
        eval_rows = read_data(cfg.eval_data)
        if cfg.eval_teacher_cache:
            lengths = [len(e[0]) for e in encode_rows(tokenizer, eval_rows, cfg.max_seq_len)]
            eval_teacher = _open_cache(cfg.eval_teacher_cache, cfg, cfg.eval_data, lengths)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    model = prepare_model(model, cfg, info)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg))
    start = load_checkpoint(resume_from, model, optimizer, scheduler, info)
    logger = RunLogger(run_dir, start, info.is_main, cfg.tensorboard)

    def evaluate(step: int) -> None:
        metrics = evaluate_heldout(
            model,
            eval_teacher,
            tokenizer,
            eval_rows,
            max_seq_len=cfg.max_seq_len,
            batch_size=cfg.eval_batch_size,
            task_limit=cfg.eval_task_limit,
            max_new_tokens=cfg.max_new_tokens,
            chunk_size=cfg.loss_chunk_size,
            info=info,
            device=info.device,
            autocast=autocast,
        )
        logger.log({"step": step, "split": "eval", **metrics})
        log.info("eval after step %d: %s", step, metrics)

    model.train()
    tokens_local, started = 0.0, time.perf_counter()
    bar = tqdm(
        range(start, cfg.max_steps),
        initial=start,
        total=cfg.max_steps,
        desc=f"train {out_name}",
        unit="step",
        mininterval=2.0,
        disable=not info.is_main,
    )
    evaluated_last, stage = False, None
    for step in bar:
        if stage_at(step, cfg) != stage:  # stage_steps: which adapters train from here
            set_stage(model, step, cfg)
            stage = stage_at(step, cfg)
        result = train_step(step, model, teacher, cache, examples, tokenizer, cfg, info, autocast)
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, clip))
        lr = scheduler.get_last_lr()[0]  # the rate this step's update uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_local += float(result["sums"][3])
        if step % cfg.log_every == 0 or step == cfg.max_steps - 1:
            sums = result["sums"].clone()
            sums[3] = tokens_local
            loss, kd, ce, tokens_seen = all_reduce_sum(sums, info).tolist()
            peak_rss = gather_objects(round(peak_rss_mb(), 1), info)  # MiB, one per rank
            record = {
                "step": step,
                "split": "train",
                "loss": loss,
                "kd": kd,
                "ce": ce,
                "grad_norm": float(grad_norm),
                "lr": lr,
                "reply_tokens": int(result["reply_tokens"]),
                "on_policy": result["on_policy"],
                "tok_s": tokens_seen / (time.perf_counter() - started),
                "peak_rss_mb": peak_rss,
            }
            logger.log(record)
            bar.set_postfix(loss=f"{loss:.3f}")
        evaluated_last = False
        if eval_rows and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            evaluate(step)
            evaluated_last = True
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            if step + 1 < cfg.max_steps:
                save_checkpoint(model, optimizer, scheduler, step + 1, cfg, info)
    if eval_rows and not evaluated_last:
        evaluate(max(cfg.max_steps - 1, 0))
    logger.close()
    if info.is_main and cfg.plot:
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    optimizer.state.clear()  # the Adam moments are done with: free them before the export
    if cfg.attention_weight > 0:  # the checkpoint runs as it would have without the term
        set_attention((model, teacher), attention_was)
    adapters = adapter_method(cfg) is not None
    out = save_final(model, tokenizer, run_dir / out_name, info, adapters, cfg.merge_adapters)
    barrier(info)
    return out


def teacher_of(cfg: TrainConfig):
    """The live teacher ``cfg.teacher`` loaded as configured, or None."""
    if not cfg.teacher:
        return None
    return load_teacher(
        cfg.teacher,
        cfg.teacher_dtype,
        device_map=cfg.teacher_device_map,
        offload_folder=cfg.teacher_offload_folder,
    )


def distill_student(cfg: TrainConfig, out_name: str = "student") -> Path:
    """Distil ``cfg.teacher`` into a student (preset or ``cfg.student_init``) at
    ``run_dir/out_name``."""
    if cfg.teacher is None and cfg.teacher_cache is None:
        raise DistillError("distillation needs a teacher: set teacher=PATH or teacher_cache=DIR")
    teacher = teacher_of(cfg)  # None: train from the cache
    tokenizer = load_tokenizer(cfg.tokenizer)
    vocab_size = teacher.config.vocab_size if teacher is not None else len(tokenizer)
    check_vocab_matches(tokenizer, vocab_size, "teacher")
    # Under torchrun only rank 0 builds (or loads) the initial weights; the other ranks build
    # the same model on the meta device, without memory, and get rank 0's weights at sharding.
    info = init_distributed(cfg.device)
    device = "meta" if info.enabled and not info.is_main else "cpu"
    if cfg.student_init:
        student = load_student(cfg.student_init, device)
    else:
        student = build_student(
            cfg.student_preset,
            vocab_size=vocab_size,
            seed=cfg.seed,
            device=device,
            **cfg.student_overrides,
        )
    apply_special_ids(student, tokenizer)  # bos/eos/pad (the end of turn) from the tokenizer
    check_vocab_matches(tokenizer, student.config.vocab_size, "student")
    if teacher is not None and student.config.vocab_size != teacher.config.vocab_size:
        raise DistillError(
            f"student vocabulary {student.config.vocab_size} != teacher vocabulary "
            f"{teacher.config.vocab_size}; logit distillation needs the same vocabulary"
        )
    return train_model(student, teacher, tokenizer, cfg, out_name)


def main(argv: list[str]) -> int:
    """The entry point of ``python -m moe2edge.distill.train`` (each torchrun rank runs it)."""
    parser = argparse.ArgumentParser(
        prog="python -m moe2edge.distill.train", description="distil a teacher into a student"
    )
    parser.add_argument("--config", help="YAML recipe (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s",
    )
    info = None
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        info = init_distributed(cfg.device)
        out = distill_student(cfg)
    except DistillError as exc:
        if rank == 0:
            print(f"moe2edge: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if info is not None:
            cleanup(info)
    if rank == 0:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # python -m moe2edge.distill.train / torchrun -m moe2edge.distill.train
    sys.exit(main(sys.argv[1:]))
