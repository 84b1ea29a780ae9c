"""The fast ONNX Runtime graph: onnxruntime-genai's model builder, wrapped into a bundle.

``python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p fp32|int4 -e cpu`` writes a
decoder made of ONNX Runtime's fused kernels: ``GroupQueryAttention`` (rotary inside, KV
read and written in place in a ``max_length`` buffer: ``past_present_share_buffer``),
``SkipSimplifiedLayerNormalization`` and, at int4, ``MatMulNBits`` (block-wise RTN weights).
We run it as a subprocess (it imports torch and transformers, and a crash stays there) and
put its ``model.onnx`` (+ ``model.onnx.data``) in a bundle whose manifest says
``io.kv_cache.shared_buffer: true`` (see docs/runtime.md).

Two compatibility shims run before the builder (onnxruntime-genai 0.18 targets
transformers 5): it imports two Qwen3.5 classes that transformers 4.57 lacks (stand-ins are
set; they are only used for Qwen3.5 checkpoints), and it reads ``config.rope_scaling`` as a
dict where a Llama config of 4.57 has ``None`` (read as the default rope).

The graph uses ``com.microsoft`` ops: it is for ONNX Runtime (CPU, CUDA), not TensorRT's
ONNX parser. ``GroupQueryAttention`` needs a head size that is a multiple of 16.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from moe2edge.export.errors import ExportError
from moe2edge.runtime.engine import SEQLENS, TOTAL_LENGTH

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int4")
EPS = ("cpu", "cuda")
MODEL_FILE, DATA_FILE, GENAI_CONFIG = "model.onnx", "model.onnx.data", "genai_config.json"

BUILDER_SHIM = """
import json, runpy, sys
import transformers
for name in ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration"):
    if not hasattr(transformers, name):
        setattr(transformers, name, type(name, (), {}))
_from_pretrained = transformers.AutoConfig.from_pretrained.__func__
def from_pretrained(cls, *args, **kwargs):
    out = _from_pretrained(cls, *args, **kwargs)
    config = out[0] if isinstance(out, tuple) else out
    if getattr(config, "rope_scaling", 0) is None:
        config.rope_scaling = {"rope_type": "default"}
    return out
transformers.AutoConfig.from_pretrained = classmethod(from_pretrained)
for args in json.loads(sys.argv[1]):  # one process for several builds: imports paid once
    sys.argv = ["onnxruntime_genai.models.builder"] + args
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
"""


def check_precision(precisions, ep: str) -> None:
    if ep not in EPS:
        raise ExportError(f"execution provider {ep!r} is not one of {EPS}")
    for precision in precisions:
        if precision not in PRECISIONS:
            raise ExportError(f"precision {precision!r} is not one of {PRECISIONS}")
        if precision == "fp16" and ep != "cuda":
            raise ExportError("fp16 graphs are for the GPU: pass ep='cuda' (--ep cuda)")


def builder_options(precision: str, block_size: int, accuracy_level: int) -> list[str]:
    if precision == "int4":
        return [
            "--extra_options",
            f"block_size={block_size}",
            f"accuracy_level={accuracy_level}",
        ]
    return []


def run_builder(
    student_dir: str | Path,
    outputs: dict[str, str | Path],
    block_size: int = 32,
    accuracy_level: int = 4,
    timeout_s: int = 3600,
    ep: str = "cpu",
) -> dict[str, Path]:
    """Run onnxruntime-genai's model builder (offline) on a local HF folder.

    ``outputs``: precision -> output directory; all builds run in one subprocess. ``ep``:
    the execution provider the graph is made for (cpu; cuda: fp16 activations and KV).
    """
    check_precision(outputs, ep)
    if not outputs:
        raise ExportError("run_builder needs at least one precision -> output directory")
    check_builder_input(Path(student_dir))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with tempfile.TemporaryDirectory(prefix="genai-cache-") as cache:
        runs = []
        for precision, out in outputs.items():
            Path(out).mkdir(parents=True, exist_ok=True)
            runs.append(
                ["-i", str(student_dir), "-o", str(out), "-p", precision, "-e", ep, "-c", cache]
                + builder_options(precision, block_size, accuracy_level)
            )
        log.info("onnxruntime-genai model builder: %s -> %s", student_dir, outputs)
        try:
            proc = subprocess.run(
                [sys.executable, "-c", BUILDER_SHIM, json.dumps(runs)],
                capture_output=True,
                text=True,
                env=env,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired as exc:
            raise ExportError(f"the model builder ran over {timeout_s} s on {student_dir}") from exc
    missing = [str(out) for out in outputs.values() if not (Path(out) / MODEL_FILE).is_file()]
    if proc.returncode != 0 or missing:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise ExportError(
            f"onnxruntime-genai's model builder failed on {student_dir} "
            f"(exit {proc.returncode}, no model in {missing}):\n{tail}"
        )
    return {precision: Path(out) for precision, out in outputs.items()}


def check_builder_input(student_dir: Path) -> dict[str, Any]:
    from moe2edge.export.onnx_export import check_student_dir

    config = check_student_dir(student_dir)
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    if head_dim % 16:
        raise ExportError(
            f"{student_dir} has head_dim {head_dim}; ONNX Runtime's GroupQueryAttention (the fast "
            "graph) needs a multiple of 16. Use `moe2edge export onnx` (optimum's graph) for "
            "this model, or a student whose hidden_size / num_attention_heads is a multiple of 16"
        )
    return config


LOGITS_TO_KEEP = "num_logits_to_keep"


def add_logits_to_keep(model_path: Path) -> None:
    """Let the caller ask for the last k positions' logits only (HF's ``logits_to_keep``).

    Adds a scalar int64 input ``num_logits_to_keep`` and slices the lm_head's input to the
    last k positions: a prefill then skips the lm_head (hidden x vocab per prompt token) for
    all but the position it samples from. The weights (external data) are untouched.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    head = producer.get("logits")
    while head is not None and head.op_type not in ("MatMul", "MatMulNBits", "Gemm"):
        head = producer.get(head.input[0])  # through a Cast (fp16 logits) and the like
    if head is None:
        raise ExportError(f"{model_path}: no MatMul produces 'logits'; cannot add {LOGITS_TO_KEEP}")
    hidden = head.input[0]
    names = [f"/{LOGITS_TO_KEEP}/{n}" for n in ("neg", "starts", "ends", "axes", "sliced")]
    graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, []))
    nodes = [
        helper.make_node("Neg", [LOGITS_TO_KEEP], [names[0]], name=names[0]),
        helper.make_node(
            "Constant",
            [],
            [names[3]],
            name=names[3],
            value=helper.make_tensor("", TensorProto.INT64, [1], [0]),
        ),
        helper.make_node("Unsqueeze", [names[0], names[3]], [names[1]], name=names[1]),
        helper.make_node(
            "Constant",
            [],
            [names[2]],
            name=names[2],
            value=helper.make_tensor("", TensorProto.INT64, [1], [2**62]),
        ),
        helper.make_node(
            "Constant",
            [],
            [names[4] + "_axes"],
            name=names[4] + "_axes",
            value=helper.make_tensor("", TensorProto.INT64, [1], [1]),
        ),
        helper.make_node(
            "Slice", [hidden, names[1], names[2], names[4] + "_axes"], [names[4]], name=names[4]
        ),
    ]
    head.input[0] = names[4]
    at = list(graph.node).index(head)
    for offset, node in enumerate(nodes):
        graph.node.insert(at + offset, node)
    for out in graph.output:
        if out.name == "logits":
            out.type.tensor_type.shape.dim[1].dim_param = "num_logits"
    onnx.save(model, str(model_path))


def feed_attention_lengths(model_path: Path) -> bool:
    """Give GroupQueryAttention its two lengths as graph inputs instead of the mask.

    The builder derives them from ``attention_mask`` in six operators that run every step
    (ReduceSum, Sub, Cast; Shape, Gather, Cast). At batch 1 the mask is all ones and says
    nothing else, so the engine feeds ``seqlens_k`` (int32 ``[1]``: positions filled after
    the run, minus one) and ``total_sequence_length`` (int32 scalar: positions filled after
    the run) directly, from buffers bound once. Returns False (graph unchanged) when the
    mask has other uses or the attention nodes do not share one pair of lengths.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    pairs = {(n.input[5], n.input[6]) for n in attention if len(n.input) > 6}
    if not attention or len(pairs) != 1:
        return False
    seqlens, total = pairs.pop()
    kept = list(graph.node)
    for node in attention:
        node.input[5], node.input[6] = SEQLENS, TOTAL_LENGTH
    # drop the nodes nothing reads any more (the mask subgraph), to a fixed point
    while True:
        needed = {name for n in kept for name in n.input} | {o.name for o in graph.output}
        dead = [n for n in kept if not any(out in needed for out in n.output)]
        if not dead:
            break
        kept = [n for n in kept if n not in dead]
    if any("attention_mask" in n.input for n in kept):
        return False  # the mask means more in this graph (padding, a sliding window)
    del graph.node[:]
    graph.node.extend(kept)
    inputs = [i for i in graph.input if i.name != "attention_mask"]
    inputs += [
        helper.make_tensor_value_info(SEQLENS, TensorProto.INT32, ["batch_size"]),
        helper.make_tensor_value_info(TOTAL_LENGTH, TensorProto.INT32, []),
    ]
    del graph.input[:]
    graph.input.extend(inputs)
    log.debug(
        "GroupQueryAttention fed %s/%s directly (was %s/%s)", SEQLENS, TOTAL_LENGTH, seqlens, total
    )
    onnx.save(model, str(model_path))
    return True


def graph_facts(model_path: Path) -> dict[str, Any]:
    """Op counts and MatMulNBits attributes of the builder's graph (recorded in the manifest)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    ops: dict[str, int] = {}
    nbits: dict[str, int] = {}
    for node in model.graph.node:
        key = f"{node.domain or 'ai.onnx'}::{node.op_type}"
        ops[key] = ops.get(key, 0) + 1
        if node.op_type == "MatMulNBits" and not nbits:
            nbits = {
                a.name: a.i
                for a in node.attribute
                if a.name in ("bits", "block_size", "accuracy_level")
            }
    return {"ops": dict(sorted(ops.items())), "matmul_nbits": nbits}


def export_fast(
    student_dir: str | Path,
    bundle_dir: str | Path,
    precision: str = "fp32",
    max_new_tokens: int = 64,
    overwrite: bool = False,
    block_size: int = 32,
    accuracy_level: int = 4,
    builder_dir: str | Path | None = None,
    ep: str = "cpu",
) -> Path:
    """A bundle with the model builder's graph of ``student_dir`` at ``precision``.

    ``builder_dir``: wrap that existing builder output (made from ``student_dir`` with the
    same precision) instead of running the builder again.
    """
    from transformers import AutoTokenizer

    from moe2edge.export.bundle import describe_io, kv_contract, model_summary, write_bundle
    from moe2edge.export.onnx_export import generation_config

    check_precision([precision], ep)
    student_dir = Path(student_dir)
    config = check_builder_input(student_dir)
    tokenizer = AutoTokenizer.from_pretrained(student_dir, local_files_only=True)
    summary = model_summary(config)

    def fill(tmp: Path) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=".genai-") as work:
            if builder_dir is not None:
                src = Path(builder_dir)
            else:
                out = {precision: Path(work) / "out"}
                src = run_builder(student_dir, out, block_size, accuracy_level, ep=ep)[precision]
            genai = json.loads((src / GENAI_CONFIG).read_text())
            files = [n for n in (MODEL_FILE, DATA_FILE) if (src / n).is_file()]
            for name in files:
                shutil.copy(src / name, tmp / name)
        add_logits_to_keep(tmp / MODEL_FILE)
        edits = [f"{LOGITS_TO_KEEP} input: Slice before the lm_head"]
        direct = feed_attention_lengths(tmp / MODEL_FILE)
        if direct:
            edits.append(f"attention_mask input -> {SEQLENS} and {TOTAL_LENGTH} inputs")
        shutil.copy(student_dir / "tokenizer.json", tmp / "tokenizer.json")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        decoder = genai["model"]["decoder"]
        max_length = int(genai["search"]["max_length"])
        io = describe_io(tmp / MODEL_FILE)
        past = {e["name"]: e for e in io["inputs"]}
        kv_dtype = past[decoder["inputs"]["past_key_names"] % 0]["dtype"]
        kv = kv_contract(summary, kv_dtype)
        kv.update(
            past_key=decoder["inputs"]["past_key_names"].replace("%d", "{layer}"),
            past_value=decoder["inputs"]["past_value_names"].replace("%d", "{layer}"),
            present_key=decoder["outputs"]["present_key_names"].replace("%d", "{layer}"),
            present_value=decoder["outputs"]["present_value_names"].replace("%d", "{layer}"),
            layout="batch, num_kv_heads, max_length, head_dim",
            shared_buffer=True,
            max_length=max_length,
        )
        facts = graph_facts(tmp / MODEL_FILE)
        nbits = facts["matmul_nbits"]
        if precision == "int4" and nbits.get("bits") != 4:
            raise ExportError(f"the builder's int4 graph of {student_dir} has no 4-bit MatMulNBits")
        return {
            "model": summary,
            "target": "onnxruntime",
            "runtime": {"backend": ep},
            "precision": {
                "weights": precision,
                "activations": kv_dtype.replace("float", "fp"),
                "method": "rtn" if precision == "int4" else "none",
                "block_size": nbits.get("block_size"),
                "accuracy_level": nbits.get("accuracy_level"),
                "parent": None,
            },
            "io": {
                "model_file": MODEL_FILE,
                "tokenizer_file": "tokenizer.json",
                "max_sequence_length": max_length,
                "graph": "onnxruntime-genai",
                "attention_mask": (
                    f"none: {SEQLENS} (int32 [1]) = positions filled after the run - 1, "
                    f"{TOTAL_LENGTH} (int32 scalar) = positions filled after the run"
                    if direct
                    else "[1, total_length] of ones: the positions filled after the run"
                ),
                "position_ids": "none: GroupQueryAttention derives positions from the lengths",
                "kv_cache": kv,
                **io,
            },
            "generation": generation_config(student_dir, tokenizer, max_new_tokens),
            "source": {
                "student_dir": str(student_dir.resolve()),
                "exporter": f"onnxruntime-genai {_genai_version()} model builder",
                "graph_ops": facts["ops"],
                "graph_edits": edits,
                "builder_search": genai.get("search", {}),
            },
            "files": files + ["tokenizer.json", "config.json"],
        }

    return write_bundle(bundle_dir, fill, overwrite=overwrite)


def _genai_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onnxruntime-genai")
    except PackageNotFoundError:
        return "?"


# --- command line (wired into `moe2edge export` by export/cli.py) ----------------------------


def register_fast(sub) -> None:
    """Add ``fast`` to the ``moe2edge export`` sub-commands (``sub``: its subparsers)."""
    p = sub.add_parser(
        "fast",
        help="fast ONNX Runtime bundle (GroupQueryAttention, in-place KV; fp32 or int4) "
        "via onnxruntime-genai's model builder",
    )
    p.add_argument("student", help="HF checkpoint directory (with tokenizer.json)")
    p.add_argument("bundle", help="output bundle directory")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--ep", choices=EPS, default="cpu", help="graph for ONNX Runtime CPU or CUDA")
    p.add_argument("--block-size", type=int, default=32, help="int4 quantization block")
    p.add_argument(
        "--accuracy-level", type=int, default=4, help="MatMulNBits compute: 4 = int8 (fastest)"
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--parity-prompts", help="JSONL prompts: PyTorch vs ONNX Runtime parity")
    p.add_argument("--parity-limit", type=int, default=50)
    p.set_defaults(handler=run_fast)


def run_fast(args: argparse.Namespace) -> int:
    bundle = export_fast(
        args.student,
        args.bundle,
        args.precision,
        args.max_new_tokens,
        overwrite=args.overwrite,
        block_size=args.block_size,
        accuracy_level=args.accuracy_level,
        ep=args.ep,
    )
    print(f"wrote {bundle}")
    if args.parity_prompts:
        from moe2edge.export.pipeline import parity_for_bundle

        result = parity_for_bundle(args.student, bundle, args.parity_prompts, args.parity_limit)
        print(json.dumps({k: v for k, v in result.items() if k != "per_prompt"}))
    return 0
