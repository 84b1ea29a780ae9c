"""Checkpoints that resume a run bit for bit, written so a crash never leaves a bad one.

``RUN_DIR/checkpoints/step-NNNNNNNN/`` holds

- ``.metadata``, ``__R_0.distcp``  model + optimizer state as a sharded
                                 ``torch.distributed.checkpoint`` (DCP): each rank R writes its
                                 own shards (fp32 as trained), no rank gathers anything
- ``training_state.pt``         step, scheduler, RNG states of every rank (torch CPU, CUDA,
                                 python ``random``, numpy), world size
- ``manifest.json``             written last: sha256 and size of every file above (each rank
                                 hashes the files it wrote), the step and the training config
                                 fingerprint

A checkpoint is first written to ``.step-NNNNNNNN.tmp`` and renamed into place by rank 0 once
every rank has written and hashed its files and everything is fsynced
(``moe2edge.fileio.atomic_dir``), so a killed writer leaves only a ``.tmp`` directory, which is
never read. On load every file is checked against the manifest, then DCP reads into this run's
shards: DCP reshards on load, so a run may resume on another number of ranks (or in one
process). A single process writes the same format (DCP needs no process group).

The data position is the step: batches are a pure function of (seed, step).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import resource
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from moe2edge.distill.adapters import ADAPTER_DIR, merge_adapters
from moe2edge.distill.config import to_dict
from moe2edge.distill.distributed import (
    DistInfo,
    barrier,
    broadcast_object,
    gather_objects,
    raise_together,
)
from moe2edge.distill.errors import DistillError
from moe2edge.fileio import (
    DiskFullError,
    atomic_dir,
    disk_full_error,
    member_problem,
    seal,
    seal_problem,
    sha256_file,
)

log = logging.getLogger(__name__)

# Config fields that change what training computes. A run may only resume from a checkpoint
# written with the same values (run_dir, logging, eval, checkpointing, device, world size,
# grad_accum_steps and sync_every_micro_batch may change: the global batch and its loss are
# the same).
FINGERPRINT_KEYS = (
    "train_data",
    "tokenizer",
    "teacher",
    "teacher_cache",
    "student_preset",
    "student_init",
    "mode",
    "lambda_on_policy",
    "sample_temperature",
    "seq_kd_temperature",
    "max_new_tokens",
    "loss",
    "temperature",
    "ce_ratio",
    "ce_warmup_steps",
    "beta",
    "alpha",
    "max_steps",
    "batch_size",
    "max_seq_len",
    "packing",
    "streaming",
    "lr",
    "min_lr_ratio",
    "warmup_steps",
    "weight_decay",
    "grad_clip",
    "seed",
    "student_overrides",
    "param_dtype",
    "reduce_dtype",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "peft_method",
    "lora_plus_lr_ratio",
    "stage_steps",
)
# keys added later: left out at their default, so a run from before them still resumes
LATER_KEY_DEFAULTS = {
    "ce_warmup_steps": 0,
    "peft_method": None,
    "lora_plus_lr_ratio": 16.0,
    "stage_steps": [],
}
# 1: full-state model.safetensors + optimizer.pt gathered on rank 0; 2: sharded DCP; 3: the
# manifest carries ``checksum`` (sha256 of its other keys), checked on load (2 is still read)
FORMAT_VERSION = 3
READ_VERSIONS = (2, 3)
REQUIRED_FILES = (".metadata", "training_state.pt")
# what torch's writers say when a write runs out of room (they raise no OSError)
NO_SPACE_TEXT = (
    "No space left",
    "File too large",
    "Disk quota",
    "unexpected pos",
    "iostream error",
)


def _state_bytes(state) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(_state_bytes(v) for v in state)
    return 0


def _no_space(exc: BaseException) -> OSError | None:
    """The no-space error behind ``exc`` (torch and DCP wrap it or only say it in words)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in (28, 27, 122):  # ENOSPC, EFBIG, EDQUOT
            return exc
        if any(t in str(exc) for t in NO_SPACE_TEXT):
            limited = resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY
            return OSError(27 if limited else 28, str(exc))
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def config_fingerprint(cfg) -> dict:
    """The training-relevant config fields, plus the training data's sha256."""
    values = to_dict(cfg)
    fp = {k: values[k] for k in FINGERPRINT_KEYS if k in values}
    for key, default in LATER_KEY_DEFAULTS.items():
        if fp.get(key, default) == default:
            fp.pop(key, None)
    if Path(cfg.train_data).is_file():
        fp["train_data_sha256"] = sha256_file(cfg.train_data)
    return fp


def fingerprint_hash(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


def _file_entry(path: Path, rank: int) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size, "rank": rank}


def save_checkpoint(model, optimizer, scheduler, step: int, cfg, info: DistInfo) -> Path:
    """Write a sharded checkpoint of step ``step`` atomically. Call on all ranks.

    Every rank writes and hashes its own DCP shards into the ``.tmp`` directory; rank 0 adds
    the training state, writes the manifest from the ranks' hashes (a few bytes each) and
    renames the directory into place.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = checkpoint_dir(cfg.run_dir, step)
    root = final.parent
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    model_state, optim_state = get_state_dict(model, optimizer)
    needed = _state_bytes(model_state) + _state_bytes(optim_state)
    try:
        _write_checkpoint(final, model_state, optim_state, scheduler, step, cfg, info)
    except DiskFullError as exc:
        raise DistillError(f"checkpoint of step {step}: {exc.strerror}") from exc
    except BaseException as exc:
        cause = None if isinstance(exc, KeyboardInterrupt | SystemExit) else _no_space(exc)
        if cause is None:
            raise
        raise DistillError(
            f"checkpoint of step {step}: "
            + disk_full_error(final, needed, cause).strerror
            + " (the model and optimizer state alone take that much)"
        ) from exc
    if info.is_main:
        prune_checkpoints(root, cfg.keep_checkpoints)
        log.info("checkpoint %s", final)
    barrier(info)
    return final


def _write_checkpoint(final: Path, model_state, optim_state, scheduler, step, cfg, info) -> None:
    import torch.distributed.checkpoint as dcp

    tmp = final.with_name(f".{final.name}.tmp")  # the name atomic_dir builds in
    with atomic_dir(final) if info.is_main else nullcontext(tmp) as tmp:
        barrier(info)  # the directory exists before anyone writes into it
        writer = dcp.FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.save(state, storage_writer=writer, no_dist=not info.enabled)
        rngs = gather_objects(rng_state(), info)
        mine = sorted(tmp.glob(f"__{info.rank}_*"))
        if info.is_main:
            training_state = {
                "step": step,
                "scheduler": scheduler.state_dict(),
                "rng": rngs,
                "world_size": info.world_size,
            }
            torch.save(training_state, tmp / "training_state.pt")
            mine += [tmp / ".metadata", tmp / "training_state.pt"]
        hashed = gather_objects({p.name: _file_entry(p, info.rank) for p in mine}, info)
        if info.is_main:
            files = {name: entry for part in hashed for name, entry in sorted(part.items())}
            unhashed = sorted({p.name for p in tmp.iterdir()} - set(files))
            if unhashed:
                raise DistillError(f"checkpoint {final}: files {unhashed} have no owner rank")
            fingerprint = config_fingerprint(cfg)
            manifest = {
                "format_version": FORMAT_VERSION,
                "step": step,
                "files": files,
                "config_fingerprint": fingerprint,
                "config_hash": fingerprint_hash(fingerprint),
                "config": to_dict(cfg),
                "world_size": info.world_size,
                "torch_version": torch.__version__,
                "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            (tmp / "manifest.json").write_text(json.dumps(seal(manifest), indent=2))


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Finished checkpoint directories (renamed into place, manifest present), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / "manifest.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def prune_checkpoints(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    for path in complete_checkpoints(root.parent)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def verify_checkpoint(path: str | Path) -> dict:
    """The manifest of checkpoint ``path`` after checking every file's sha256 against it."""
    path = Path(path)
    manifest_file = path / "manifest.json"
    if path.name.endswith(".tmp") or not manifest_file.is_file():
        raise DistillError(
            f"{path} is not a complete checkpoint (no manifest.json; a .tmp directory or an "
            "interrupted copy); pass another checkpoint or resume=auto"
        )
    try:
        manifest = json.loads(manifest_file.read_bytes().decode("utf-8"))
        files = manifest["files"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DistillError(
            f"{manifest_file} is unreadable ({exc}); the checkpoint is damaged"
        ) from exc
    except (KeyError, TypeError, IndexError) as exc:
        raise DistillError(f"{manifest_file} has no 'files'; the checkpoint is damaged") from exc
    if manifest.get("format_version") not in READ_VERSIONS:
        raise DistillError(
            f"{path} is in checkpoint format {manifest.get('format_version')}, this version "
            f"reads formats {READ_VERSIONS} (sharded DCP); finish that run with the moe2edge "
            "that wrote it, or start over with resume=none"
        )
    if manifest["format_version"] >= 3 and (why := seal_problem(manifest)) is not None:
        raise DistillError(f"{manifest_file} is damaged: {why}; resume from an older checkpoint")
    problems = _manifest_problems(path, manifest, files)
    if problems:
        raise DistillError(
            f"{manifest_file} is malformed: {'; '.join(problems[:5])}; the checkpoint is "
            "damaged: resume from an older one (pass its path as resume=)"
        )

    def intact(name: str) -> bool:
        f, want = path / name, files[name]
        return (
            f.is_file() and f.stat().st_size == want["bytes"] and sha256_file(f) == want["sha256"]
        )

    # One file per rank: hash them in parallel (hashlib releases the GIL on large blocks).
    with ThreadPoolExecutor(max_workers=min(8, max(len(files), 1))) as pool:
        results = dict(zip(files, pool.map(intact, files), strict=True))
    for name, ok in results.items():
        if not ok:
            raise DistillError(
                f"checkpoint file {path / name} is missing or does not match its sha256 in the "
                "manifest: the checkpoint is damaged; resume from an older one (pass its path "
                "as resume=)"
            )
    return manifest


def _manifest_problems(path: Path, manifest: dict, files) -> list[str]:
    """Names outside the checkpoint, entries without sha256/size, files nobody hashed."""
    if not isinstance(files, dict):
        return ["'files' is not an object"]
    problems = []
    for name, entry in files.items():
        if (why := member_problem(path, name)) is not None:
            problems.append(f"files entry {why}")
        elif not (
            isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and isinstance(entry.get("bytes"), int)
        ):
            problems.append(f"files entry {name!r} lacks a sha256 and a size")
    problems += [f"{name} is not listed in files" for name in REQUIRED_FILES if name not in files]
    on_disk = {p.name for p in path.iterdir() if p.name != "manifest.json"}
    problems += [f"{name} is on disk but not hashed" for name in sorted(on_disk - set(files))]
    if not isinstance(manifest.get("step"), int):
        problems.append("step is not an integer")
    if not isinstance(manifest.get("config_fingerprint", {}), dict):
        problems.append("config_fingerprint is not an object")
    return problems


def supersede_checkpoints(run_dir: str | Path) -> Path | None:
    """Move an old run's checkpoints aside (resume=none keeps them, never deletes them)."""
    root = Path(run_dir) / "checkpoints"
    if not complete_checkpoints(run_dir):
        return None
    dest = root.with_name(f"checkpoints-superseded-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(root, dest)
    log.warning("resume=none: moved the existing checkpoints to %s", dest)
    return dest


def find_checkpoint(cfg) -> Path | None:
    """The checkpoint ``cfg.resume`` asks for (rank 0 only); raises DistillError."""
    if cfg.resume == "none":
        supersede_checkpoints(cfg.run_dir)
        return None
    if cfg.resume != "auto":
        path = Path(cfg.resume)
        if not path.is_dir():
            raise DistillError(
                f"resume={cfg.resume}: no such checkpoint directory; use resume=auto, "
                "resume=none or the path of a checkpoints/step-N directory"
            )
        verify_checkpoint(path)
        return path
    for path in reversed(complete_checkpoints(cfg.run_dir)):
        try:
            verify_checkpoint(path)
            return path
        except DistillError as exc:
            log.warning("skipping damaged checkpoint: %s", exc)
    return None


def _check_same_config(path: Path, manifest: dict, cfg) -> None:
    saved = manifest.get("config_fingerprint", {})
    now = config_fingerprint(cfg)
    if fingerprint_hash(saved) == fingerprint_hash(now):
        return
    keys = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    diffs = "; ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in keys)
    raise DistillError(
        f"cannot resume from {path}: it was written with a different training config "
        f"(differing keys: {', '.join(keys)}; {diffs}). Nothing was changed. To continue that "
        f"run, use its settings again (they are in {path / 'manifest.json'}); to start a new "
        "run, pass another run_dir=..., or resume=none to start over in this run_dir (the "
        "existing checkpoints are then moved aside to checkpoints-superseded-*, not deleted)."
    )


def select_checkpoint(cfg, info: DistInfo) -> Path | None:
    """The verified checkpoint ``cfg.resume`` selects, or None for a fresh run.

    Raises DistillError on every rank (before anything is written) when the checkpoint was made
    with a different training config. ``resume=none`` moves old checkpoints aside. Call on all
    ranks, before the run writes anything.
    """
    path, error = None, None
    if info.is_main:
        try:
            path = find_checkpoint(cfg)  # verified: every file against the manifest
            if path is not None:
                manifest = json.loads((path / "manifest.json").read_text())
                _check_same_config(path, manifest, cfg)
        except DistillError as exc:
            error = str(exc)
    raise_together(error, info)
    return broadcast_object(path, info)


def load_checkpoint(path: Path | None, model, optimizer, scheduler, info: DistInfo) -> int:
    """Load ``path`` into model/optimizer/scheduler/RNG; return the step to continue from.

    Call on all ranks, after ``select_checkpoint``, with the model already sharded: each rank
    reads the parts of the DCP shards that its own shards cover.
    """
    if path is None:
        return 0
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)  # the shapes to read into
    state = {"model": model_state, "optimizer": optim_state}
    try:
        dcp.load(state, storage_reader=dcp.FileSystemReader(path), no_dist=not info.enabled)
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        last = (str(exc).strip().splitlines() or [""])[-1][:300]  # DCP's text ends in the cause
        raise DistillError(
            f"cannot load checkpoint {path} into this model ({type(exc).__name__}: {last}); "
            "resume from another checkpoint or start over with resume=none"
        ) from exc
    training_state = None
    if info.is_main:
        try:
            training_state = torch.load(path / "training_state.pt", weights_only=True)
        except Exception as exc:
            raise DistillError(f"cannot read {path / 'training_state.pt'}: {exc}") from exc
    training_state = broadcast_object(training_state, info)
    try:
        scheduler.load_state_dict(training_state["scheduler"])
        rngs = training_state["rng"]
        set_rng_state(rngs[info.rank] if len(rngs) == info.world_size else rngs[0])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise DistillError(f"{path / 'training_state.pt'} is malformed ({exc})") from exc
    log.info("resumed from %s at step %d", path, training_state["step"])
    return int(training_state["step"])


def _unsharded_copy(model, state: dict[str, torch.Tensor], adapters: bool):
    """A plain (not FSDP) model holding ``state``: built on the meta device, then assigned."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(model.config)
    if adapters:
        from peft import get_peft_model

        fresh = get_peft_model(fresh, model.peft_config["default"])
    fresh.load_state_dict(state, strict=True, assign=True)
    return fresh


def save_final(
    model,
    tokenizer,
    out_dir: str | Path,
    info: DistInfo | None = None,
    adapters: bool = False,
    merge: bool = True,
) -> Path:
    """The trained model as a standard HF checkpoint (+ tokenizer), atomically, by rank 0.

    peft ``adapters`` are merged into the base weights (``merge``), so the result loads
    without peft; else the base goes in ``out_dir`` and the adapters, with peft's
    ``save_pretrained``, in ``out_dir/adapter``. Under FSDP2 the full state is gathered
    first. Call on all ranks.
    """
    out_dir = Path(out_dir)
    info = info or DistInfo()
    state = None
    if info.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
    if info.is_main:
        plain = _unsharded_copy(model, state, adapters) if info.enabled else model
        with atomic_dir(out_dir) as tmp:
            if adapters and not merge:
                plain.save_pretrained(tmp / ADAPTER_DIR)  # adapter_config + adapter weights
                plain = plain.unload()  # the base, unchanged
            elif adapters:
                plain = merge_adapters(plain)
            plain.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    barrier(info)
    return out_dir
