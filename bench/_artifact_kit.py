"""The four artifacts of bench/reliability_artifacts.py, each with its real writer and its real
loader, on models small enough that one write takes milliseconds.

* bundle: ``moe2edge.export.bundle.write_bundle`` (atomic directory + ``write_manifest``) of a
  tiny concat-KV decoder graph (onnx.helper) and a ``tokenizers`` WordLevel tokenizer; loaded
  with ``Generator.from_bundle`` (hashes verified, ONNX Runtime session, tokenizer).
* engine: ``moe2edge.runtime.tensorrt.build.build_engine`` with a stand-in ``tensorrt`` builder
  (no GPU here: its "plan" is deterministic bytes); loaded with ``TensorRTEngine`` over
  tests/_trt_emulation.py (TensorRT and CUDA emulated on the CPU). The writing and the checks
  (plan, engine.json, their hashes) are the real code; only TensorRT itself is emulated.
* cache: ``moe2edge.distill.cache.write_cache`` with a seeded numpy scorer (a teacher's top-k
  stand-in), 6 shards; loaded with ``TeacherCache`` (every shard verified) and every example read.
* checkpoint: ``moe2edge.distill.checkpoint.save_checkpoint`` (torch.distributed.checkpoint)
  of a small MLP + AdamW + scheduler at steps 1..3; loaded with ``select_checkpoint`` +
  ``load_checkpoint``.

Every loader returns a fingerprint of what it loaded, compared with the writer's own record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VOCAB, HIDDEN, PAD = 32, 8, 1 << 18  # PAD: float32 weights padding the graph to ~1 MB
DEVICE = {"tensorrt_version": "10.3.0", "gpu_name": "Emulated", "compute_capability": "8.7"}
KINDS = ("bundle", "engine", "cache", "checkpoint")


# --- bundle -----------------------------------------------------------------------------


def _graph(variant: int):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(variant)
    emb = numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), "emb")
    head = numpy_helper.from_array(rng.standard_normal((HIDDEN, VOCAB)).astype(np.float32), "head")
    pad = numpy_helper.from_array(rng.standard_normal(PAD).astype(np.float32), "pad")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    zero = numpy_helper.from_array(np.array(0, dtype=np.float32), "zero")
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
        helper.make_node("MatMul", ["h", "head"], ["raw"]),
        helper.make_node("Unsqueeze", ["h", "axes"], ["k"]),
        helper.make_node("Concat", ["past_key_values.0.key", "k"], ["present.0.key"], axis=2),
        helper.make_node("Concat", ["past_key_values.0.value", "k"], ["present.0.value"], axis=2),
        helper.make_node("ReduceSum", ["pad"], ["pad_sum"], keepdims=0),  # the weights' bytes
        helper.make_node("Mul", ["pad_sum", "zero"], ["nothing"]),
        helper.make_node("Add", ["raw", "nothing"], ["logits"]),
    ]
    kv = ["batch", 1, "past", HIDDEN]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, kv),
        helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT, kv),
    ]
    out_kv = ["batch", 1, "total", HIDDEN]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB]),
        helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, out_kv),
        helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, out_kv),
    ]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, [emb, head, pad, axes, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _tokenizer_json(variant: int) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"w{i}v{variant}": i for i in range(1, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


def bundle_manifest(variant: int) -> dict[str, Any]:
    kv = {
        "num_layers": 1, "num_kv_heads": 1, "head_dim": HIDDEN, "dtype": "float32",
        "layout": "batch, num_kv_heads, sequence, head_dim",
        "past_key": "past_key_values.{layer}.key", "past_value": "past_key_values.{layer}.value",
        "present_key": "present.{layer}.key", "present_value": "present.{layer}.value",
    }  # fmt: skip
    return {
        "model": {"architecture": "Tiny", "num_layers": 1, "num_kv_heads": 1,
                  "head_dim": HIDDEN, "vocab_size": VOCAB, "max_position_embeddings": 64},
        "target": "onnxruntime",
        "precision": {"weights": "fp32", "activations": "fp32", "method": "none",
                      "block_size": None},
        "io": {"model_file": "model.onnx", "tokenizer_file": "tokenizer.json",
               "max_sequence_length": 64, "kv_cache": kv},
        "files": ["model.onnx", "tokenizer.json"],
        "generation": {"prompt_template": "{prompt}", "eos_token_ids": [0], "pad_token_id": 0,
                       "max_new_tokens": 4, "variant": variant},
    }  # fmt: skip


def write_bundle_artifact(out: Path, variant: int) -> dict[str, Any]:
    """Write bundle ``variant`` to ``out`` (replacing what is there); its files' sha256."""
    import onnx

    from moe2edge.export.bundle import describe_io, write_bundle

    def fill(tmp: Path) -> dict[str, Any]:
        onnx.save(_graph(variant), str(tmp / "model.onnx"))
        (tmp / "tokenizer.json").write_text(_tokenizer_json(variant))
        manifest = bundle_manifest(variant)
        manifest["io"].update(describe_io(tmp / "model.onnx"))
        return manifest

    write_bundle(out, fill, overwrite=True)
    return bundle_record(out)


def bundle_record(out: Path) -> dict[str, Any]:
    files = json.loads((Path(out) / "manifest.json").read_text())["files"]
    return {name: entry["sha256"] for name, entry in files.items()}


def load_bundle(out: Path) -> dict[str, Any]:
    """Open the bundle as the runtime does and decode one step; what was loaded."""
    from moe2edge.runtime.generate import Generator

    gen = Generator.from_bundle(out, threads=1)
    cache = gen.engine.new_cache()
    logits = gen.engine.forward(gen.tokenizer.encode("w1v0 w2v0").ids or [1], cache)
    record = {name: entry["sha256"] for name, entry in gen.engine.manifest["files"].items()}
    on_disk = {name: _sha(Path(out) / name) for name in record}  # what was actually run
    return {"files": record, "on_disk": on_disk, "finite": bool(np.isfinite(logits).all())}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- engine -----------------------------------------------------------------------------


def plan_bytes(variant: int) -> bytes:
    """The stand-in builder's plan: 1 MiB of bytes fixed by ``variant``."""
    return np.random.default_rng(1000 + variant).bytes(1 << 20)


def fake_tensorrt(variant: int) -> SimpleNamespace:
    """Enough of ``tensorrt``'s builder API for ``build_engine`` (see tests/test_tensorrt_build)."""

    class Obj(SimpleNamespace):
        pass

    class Config:
        def __init__(self) -> None:
            self.profiles: list = []
            self.cache = None

        def set_memory_pool_limit(self, pool, size) -> None: ...

        def set_flag(self, flag) -> None: ...

        def create_timing_cache(self, data):
            return Obj(serialize=lambda: b"TIMING")

        def set_timing_cache(self, cache, ignore_mismatch) -> None:
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, p) -> int:
            self.profiles.append(p)
            return len(self.profiles) - 1

    inputs = {"input_ids": (-1, -1), "past_key_values.0.key": (-1, 1, -1, HIDDEN),
              "past_key_values.0.value": (-1, 1, -1, HIDDEN)}  # fmt: skip

    class Network:
        num_inputs = len(inputs)

        def get_input(self, i):
            name = list(inputs)[i]
            return Obj(name=name, shape=inputs[name])

    class Builder:
        def __init__(self, logger) -> None: ...

        def create_network(self, flags):
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Obj(set_shape=lambda *a: None)

        def build_serialized_network(self, network, config):
            return plan_bytes(variant)

    class Parser:
        num_errors = 0

        def __init__(self, network, logger) -> None: ...

        def parse_from_file(self, path) -> bool:
            return True

    class Logger:
        WARNING, VERBOSE = 2, 4

        def __init__(self, level) -> None: ...

    flag = SimpleNamespace(STRONGLY_TYPED=0)
    return SimpleNamespace(
        __version__=DEVICE["tensorrt_version"], Builder=Builder, OnnxParser=Parser,
        Logger=Logger, NetworkDefinitionCreationFlag=flag, BuilderFlag=SimpleNamespace(),
        MemoryPoolType=SimpleNamespace(WORKSPACE=0),
    )  # fmt: skip


def write_engine_artifact(bundle: Path, variant: int) -> dict[str, Any]:
    """``build_engine`` into ``bundle/engine`` with the stand-in builder; the plan's sha256."""
    from moe2edge.runtime.tensorrt import build

    old, old_info = sys.modules.get("tensorrt"), build.device_info
    sys.modules["tensorrt"] = fake_tensorrt(variant)  # type: ignore[assignment]
    build.device_info = lambda: dict(DEVICE)  # type: ignore[assignment]
    try:
        build.build_engine(bundle, max_seq_len=32, max_prefill=8)
    finally:  # leave the modules as they were (tests share this process)
        _restore("tensorrt", old)
        build.device_info = old_info  # type: ignore[assignment]
    return {"plan": hashlib.sha256(plan_bytes(variant)).hexdigest()}


def load_engine(bundle: Path) -> dict[str, Any]:
    """Open the engine with the native runner over the CPU emulation; the plan it loaded."""
    from moe2edge.runtime import tensorrt_engine
    from moe2edge.runtime.tensorrt.plan import ENGINE_MANIFEST
    from tests._trt_emulation import HostCuda, emulated_tensorrt

    try:
        meta = json.loads((Path(bundle) / "engine" / ENGINE_MANIFEST).read_text())
        profiles = meta["profiles"]
    except Exception:  # the runner itself reports what is wrong with engine.json
        profiles = []
    trt = emulated_tensorrt(Path(bundle) / "model.onnx", profiles)
    seen: dict[str, str] = {}
    runtime_cls = trt.Runtime

    class Recording(runtime_cls):  # type: ignore[misc, valid-type]
        def deserialize_cuda_engine(self, plan: bytes):
            seen["plan"] = hashlib.sha256(plan).hexdigest()
            return super().deserialize_cuda_engine(plan)

    trt.Runtime = Recording
    old, old_info = sys.modules.get("tensorrt"), tensorrt_engine.device_info
    sys.modules["tensorrt"] = trt  # type: ignore[assignment]
    tensorrt_engine.device_info = lambda: dict(DEVICE)  # type: ignore[assignment]
    try:
        tensorrt_engine.TensorRTEngine(bundle, cuda=HostCuda())
    finally:
        _restore("tensorrt", old)
        tensorrt_engine.device_info = old_info  # type: ignore[assignment]
    return seen


def _restore(name: str, module: Any) -> None:
    if module is None:
        sys.modules.pop(name, None)
    else:
        sys.modules[name] = module


# --- teacher cache ------------------------------------------------------------------------

CACHE_K, CACHE_SHARDS, PER_SHARD = 4, 6, 4


def cache_seqs() -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [rng.integers(1, VOCAB, size=int(rng.integers(6, 20))).tolist() for _ in range(24)]


def _scorer(variant: int):
    def score(chunk: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for seq in chunk:
            rng = np.random.default_rng([variant, *seq])
            ids = np.stack([rng.permutation(VOCAB)[:CACHE_K] for _ in seq[1:]])
            lps = np.sort(np.log(rng.dirichlet(np.ones(VOCAB), len(seq) - 1)), -1)[:, ::-1]
            out.append((ids, np.ascontiguousarray(lps[:, :CACHE_K])))
        return out

    return score


def cache_header(variant: int) -> dict[str, Any]:
    return {
        "teacher": {"kind": "bench", "name": f"seeded-{variant}"},
        "tokenizer_sha256": "0" * 64, "k": CACHE_K, "max_seq_len": 32,
        "dataset": {"path": "bench", "sha256": "1" * 64}, "shard_examples": PER_SHARD,
    }  # fmt: skip


def write_cache_artifact(out: Path, variant: int = 0) -> dict[str, Any]:
    from moe2edge.distill.cache import write_cache

    index = write_cache(out, cache_seqs(), _scorer(variant), cache_header(variant))
    return {"skipped": index["skipped_shards"], "digest": cache_digest(out)}


def cache_digest(out: Path) -> str:
    from moe2edge.distill.cache import TeacherCache

    cache = TeacherCache(out)
    digest = hashlib.sha256()
    for i in range(len(cache)):
        for t in cache.topk(i):
            digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def load_cache(out: Path) -> dict[str, Any]:
    return {"digest": cache_digest(out)}


# --- checkpoint ---------------------------------------------------------------------------


@dataclasses.dataclass
class BenchTrainConfig:
    """The fields ``save_checkpoint`` / ``select_checkpoint`` read of a TrainConfig."""

    run_dir: str
    train_data: str = "bench-data"
    resume: str = "auto"
    keep_checkpoints: int = 2
    seed: int = 0
    lr: float = 1e-3


def _model(step: int):
    import torch

    torch.manual_seed(step)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    if step:  # one optimizer step, so the optimizer state exists and depends on the step
        model(torch.ones(2, 64)).sum().backward()
        optimizer.step()
        scheduler.step()
    return model, optimizer, scheduler


def model_digest(model) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode() + value.detach().numpy().tobytes())
    return digest.hexdigest()


def write_checkpoint_artifact(run_dir: Path, steps: int = 3) -> dict[str, Any]:
    """Checkpoints of steps 1..``steps`` (already complete ones are kept: a rerun resumes)."""
    import torch

    from moe2edge.distill.checkpoint import complete_checkpoints, save_checkpoint
    from moe2edge.distill.distributed import DistInfo

    torch.set_num_threads(1)
    cfg = BenchTrainConfig(str(run_dir))
    done = {int(p.name.split("-")[1]) for p in complete_checkpoints(run_dir)}
    digests = {}
    for step in range(1, steps + 1):
        model, optimizer, scheduler = _model(step)
        digests[step] = model_digest(model)
        if step not in done:
            save_checkpoint(model, optimizer, scheduler, step, cfg, DistInfo())
    return {"digests": digests, "resumed": bool(done)}


def load_checkpoint_artifact(run_dir: Path, path: Path | None = None) -> dict[str, Any]:
    """``select_checkpoint`` (resume=auto, or ``path``) + ``load_checkpoint`` into a fresh model."""
    import torch

    from moe2edge.distill.checkpoint import load_checkpoint, select_checkpoint
    from moe2edge.distill.distributed import DistInfo

    torch.set_num_threads(1)
    cfg = BenchTrainConfig(str(run_dir), resume=str(path) if path else "auto")
    found = select_checkpoint(cfg, DistInfo())
    if found is None:
        return {"step": 0}
    model, optimizer, scheduler = _model(0)
    step = load_checkpoint(found, model, optimizer, scheduler, DistInfo())
    return {"step": step, "digest": model_digest(model)}


def warm(kind: str) -> None:
    """Import what the writer of ``kind`` uses, so that a measured write is only the write."""
    import importlib

    modules = {
        "bundle": ["onnx", "moe2edge.export.bundle", "tokenizers"],
        "engine": ["moe2edge.runtime.tensorrt.build"],
        "cache": ["moe2edge.distill.cache", "safetensors.numpy", "torch"],
        "checkpoint": ["moe2edge.distill.checkpoint", "torch.distributed.checkpoint",
                       "torch.distributed.checkpoint.state_dict"],
    }[kind]  # fmt: skip
    for name in modules:
        importlib.import_module(name)


# --- one place for all four -------------------------------------------------------------


def write(kind: str, target: Path, variant: int) -> dict[str, Any]:
    if kind == "bundle":
        return write_bundle_artifact(target, variant)
    if kind == "engine":
        return write_engine_artifact(target, variant)
    if kind == "cache":
        return write_cache_artifact(target, variant)
    return write_checkpoint_artifact(target)


def load(kind: str, target: Path) -> dict[str, Any]:
    return {"bundle": load_bundle, "engine": load_engine, "cache": load_cache,
            "checkpoint": load_checkpoint_artifact}[kind](target)  # fmt: skip


def user_errors() -> tuple[type[BaseException], ...]:
    from moe2edge.distill.errors import DistillError
    from moe2edge.export.errors import ExportError
    from moe2edge.fileio import DiskFullError
    from moe2edge.runtime.errors import RuntimeUserError

    return (RuntimeUserError, DistillError, ExportError, DiskFullError)


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path
