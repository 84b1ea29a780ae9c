"""GGUF for llama.cpp: an HF Llama student as one ``.gguf`` file (F16, Q8_0 or Q4_0).

llama.cpp's own ``convert_hf_to_gguf.py`` names a BPE tokenizer's pre-tokenizer by hashing
what the tokenizer makes of a fixed text and looking the hash up in a list of published
models; any freshly trained vocabulary (ours included) hashes to something unlisted and is
refused ("BPE pre-tokenizer was not recognized"). This writer reads the pre-tokenizer from
``tokenizer.json`` instead and maps the one kind it can vouch for (byte-level BPE with GPT-2's
split, no prefix space: what ``moe2edge distill tokenizer`` trains) to llama.cpp's ``gpt-2``.
Everything else follows ``convert_hf_to_gguf``'s ``LlamaModel``: the ``gguf`` package's keys
and tensor names, q/k rows permuted for llama.cpp's rope, 1-D tensors in F32, and a tensor
whose rows are not whole quantization blocks kept in F16. The file is written tensor by
tensor (a 13B student never sits in memory whole) into a temporary sibling, then renamed.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moe2edge.export.errors import ExportError
from moe2edge.fileio import fsync_dir

log = logging.getLogger(__name__)

GGUF_TYPES = ("f16", "q8_0", "q4_0")
PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for GPT-2's byte-level split


@dataclass
class PlannedTensor:
    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    permute_heads: int | None = None  # q/k: the head count of llama.cpp's row permutation


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf comes with the export extra
        raise ExportError(
            "the `gguf` package is missing: pip install 'moe2edge[export]' (or `pip install gguf`)"
        ) from e
    return gguf


def load_llama_config(student_dir: Path) -> dict[str, Any]:
    """config.json of a plain Llama checkpoint, refused with the reason when it is not one."""
    if not (student_dir / "config.json").is_file():
        raise ExportError(
            f"{student_dir} has no config.json: pass the HF checkpoint directory that "
            "`moe2edge distill train` wrote"
        )
    config = json.loads((student_dir / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type != "llama":
        raise ExportError(
            f"{student_dir} is a {model_type!r} checkpoint ({config.get('architectures')}); "
            "`export gguf` writes Llama checkpoints only (the students `moe2edge distill` "
            "trains). For other architectures use llama.cpp's convert_hf_to_gguf.py."
        )
    unsupported = {
        "rope_scaling": config.get("rope_scaling"),
        "attention_bias": config.get("attention_bias") or None,
        "mlp_bias": config.get("mlp_bias") or None,
    }
    unsupported = {k: v for k, v in unsupported.items() if v}
    if unsupported:
        raise ExportError(
            f"{student_dir}: {unsupported} is not supported by `export gguf` (it writes plain "
            "Llama: no rope scaling, no biases); use llama.cpp's convert_hf_to_gguf.py"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise ExportError(f"{student_dir}: hidden_act {config['hidden_act']!r}, Llama is silu")
    return config


def head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or {"content": ...} dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def tokenizer_metadata(student_dir: Path, vocab_size: int) -> dict[str, Any]:
    """Tokens, token types, merges, special ids and chat template from the HF tokenizer files."""
    gguf = _gguf()
    path = student_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportError(
            f"{student_dir} has no tokenizer.json; save the tokenizer with the student "
            "(distill does) or copy it there"
        )
    spec = json.loads(path.read_text())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(
            f"{path}: a {model.get('type')!r} tokenizer; `export gguf` writes byte-level BPE only"
        )
    check_pre_tokenizer(spec, path)
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, token in added.items():
        vocab[content] = token["id"]
    if max(vocab.values()) >= vocab_size:
        raise ExportError(
            f"{path} has token id {max(vocab.values())} but the model's embedding has "
            f"{vocab_size} rows: the tokenizer does not belong to this checkpoint"
        )
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:  # rows of the embedding no token uses (convert_hf_to_gguf's [PADi])
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            special = added[token].get("special", False)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    # tokenizers writes merges as "a b" (older) or ["a", "b"] (newer); GGUF takes "a b"
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    config_path = student_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    special_ids = {}
    for role in ("bos", "eos", "pad", "unk"):
        content = _token_content(tok_config.get(f"{role}_token"))
        if content is not None:
            if content not in vocab:
                raise ExportError(
                    f"{config_path}: {role}_token {content!r} is not in the vocabulary"
                )
            special_ids[role] = vocab[content]
    template = tok_config.get("chat_template")
    if template is None and (student_dir / "chat_template.jinja").is_file():
        template = (student_dir / "chat_template.jinja").read_text()
    return {
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "special_ids": special_ids,
        # the bundle's rule (export.onnx_export.generation_config): a BOS token is prepended
        "add_bos": "bos" in special_ids,
        "chat_template": template if isinstance(template, str) else None,
    }


def check_pre_tokenizer(spec: dict[str, Any], path: Path) -> None:
    """Only GPT-2's byte-level split without a prefix space matches llama.cpp's ``gpt-2``."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    ok = (
        pre.get("type") == "ByteLevel"
        and not pre.get("add_prefix_space", False)
        and pre.get("use_regex", True)
        and spec.get("normalizer") is None
        and (spec.get("decoder") or {}).get("type") == "ByteLevel"
    )
    if not ok:
        raise ExportError(
            f"{path}: pre-tokenizer {spec.get('pre_tokenizer')} with normalizer "
            f"{spec.get('normalizer')}; `export gguf` maps only byte-level BPE with GPT-2's split "
            "and no prefix space (what `moe2edge distill tokenizer` trains) to llama.cpp's "
            f"{PRE_TOKENIZER!r}. For a published model's tokenizer use convert_hf_to_gguf.py."
        )


def safetensors_index(student_dir: Path) -> dict[str, Path]:
    """Tensor name -> the .safetensors file holding it (one file or an indexed set of shards)."""
    index = student_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: student_dir / file for name, file in weight_map.items()}
    single = student_dir / "model.safetensors"
    if not single.is_file():
        raise ExportError(
            f"{student_dir} has no model.safetensors (or model.safetensors.index.json); "
            "save the checkpoint with safe_serialization (transformers' default)"
        )
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def tensor_plan(student_dir: Path, config: dict[str, Any], gguf_type: str) -> list[PlannedTensor]:
    """Which HF tensor becomes which GGUF tensor, in what type (reads shapes, not weights)."""
    gguf = _gguf()
    from safetensors import safe_open

    wanted = gguf.GGMLQuantizationType[gguf_type.upper()]
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    name_map = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, int(config["num_hidden_layers"]))
    n_head, n_kv = int(config["num_attention_heads"]), int(config.get("num_key_value_heads") or 0)
    files = safetensors_index(student_dir)
    tied = bool(config.get("tie_word_embeddings", False))
    if not tied and "lm_head.weight" not in files:
        raise ExportError(
            f"{student_dir}: tie_word_embeddings is false but there is no lm_head.weight"
        )
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(set(files.values())):
        with safe_open(str(file), framework="pt") as f:
            shapes.update((n, tuple(f.get_slice(n).get_shape())) for n in f.keys())
    plan = []
    for hf_name in files:
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue  # recomputed by llama.cpp / the output reuses token_embd when tied
        mapped = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ExportError(
                f"{student_dir}: tensor {hf_name!r} has no llama.cpp Llama counterpart; "
                "is this a plain LlamaForCausalLM checkpoint?"
            )
        shape = shapes[hf_name]
        if len(shape) == 1:
            qtype = gguf.GGMLQuantizationType.F32
        elif shape[-1] % block:
            qtype = gguf.GGMLQuantizationType.F16
            log.warning(
                "%s stays F16: its rows (%d) are not whole %s blocks of %d",
                mapped, shape[-1], wanted.name, block,
            )  # fmt: skip
        else:
            qtype = wanted
        permute = None
        if mapped.endswith(("attn_q.weight", "attn_q.bias")):
            permute = n_head
        elif mapped.endswith(("attn_k.weight", "attn_k.bias")):
            permute = n_kv or n_head
        plan.append(PlannedTensor(hf_name, mapped, shape, qtype, permute))
    return plan


def permute_for_rope(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF Llama rotates the two halves of each head; llama.cpp rotates adjacent pairs.

    Reorders each head's rows so that llama.cpp's rope sees HF's pairs (convert_hf_to_gguf's
    ``LlamaModel.permute``).
    """
    shape = weights.shape
    return (
        weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:])
        .swapaxes(1, 2)
        .reshape(shape)
    )


def _add_metadata(writer, student_dir: Path, config: dict, tok: dict, gguf_type: str) -> None:
    gguf = _gguf()
    writer.add_name(student_dir.name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(
        int(config.get("num_key_value_heads") or config["num_attention_heads"])
    )
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(config["vocab_size"]))
    dim = head_dim(config)
    writer.add_rope_dimension_count(dim)
    if dim != config["hidden_size"] // config["num_attention_heads"]:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{gguf_type.upper()}"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    ids = tok["special_ids"]
    for role, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("pad", writer.add_pad_token_id),
        ("unk", writer.add_unk_token_id),
    ):
        if role in ids:
            add(ids[role])
    writer.add_add_bos_token(tok["add_bos"])
    writer.add_add_eos_token(False)
    if tok["chat_template"]:
        writer.add_chat_template(tok["chat_template"])


def _load(file: Path, name: str) -> np.ndarray:
    """One tensor as float32 numpy (through torch: safetensors' numpy path cannot read bf16)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(name).float().numpy()


def export_gguf(
    student_dir: str | Path,
    out_path: str | Path,
    gguf_type: str = "f16",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``student_dir`` as a llama.cpp GGUF file; returns a summary (path, bytes, types)."""
    gguf = _gguf()
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"unknown GGUF type {gguf_type!r}; choose one of {list(GGUF_TYPES)}")
    student_dir, out_path = Path(student_dir), Path(out_path)
    if not student_dir.is_dir():
        raise ExportError(f"student directory {student_dir} does not exist")
    if out_path.exists() and not overwrite:
        raise ExportError(f"{out_path} already exists; pass --overwrite to replace it")
    config = load_llama_config(student_dir)
    tok = tokenizer_metadata(student_dir, int(config["vocab_size"]))
    plan = tensor_plan(student_dir, config, gguf_type)
    files = safetensors_index(student_dir)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        _add_metadata(writer, student_dir, config, tok, gguf_type)
        for t in plan:
            byte_shape = gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
            writer.add_tensor_info(
                t.gguf_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), t.qtype
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in plan:  # the same order as the tensor infos
            data = _load(files[t.hf_name], t.hf_name)
            if t.permute_heads:
                data = permute_for_rope(data, t.permute_heads)
            writer.write_tensor_data(gguf.quants.quantize(data, t.qtype))
        writer.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out_path.parent)
    kept = sorted(
        t.gguf_name for t in plan if len(t.shape) > 1 and t.qtype.name != gguf_type.upper()
    )
    summary = {
        "path": str(out_path),
        "type": gguf_type,
        "bytes": out_path.stat().st_size,
        "tensors": len(plan),
        "kept_f16": kept,  # 2-D tensors whose rows are not whole blocks of the type
        "tied_embeddings": bool(config.get("tie_word_embeddings", False)),
    }
    log.info("wrote %s (%s, %d bytes)", out_path, gguf_type, summary["bytes"])
    return summary


def llama_cpp_greedy(
    llm, prompt_ids: list[int], max_new_tokens: int, eos_ids
) -> tuple[list[int], int, float]:
    """Greedy tokens from a ``llama_cpp.Llama`` after ``prompt_ids`` (fed as ids: no
    tokenization on llama.cpp's side), end token dropped: the runtime's greedy loop.

    Also returns the one-token decode steps run and their seconds (the prefill excluded).
    """
    import llama_cpp

    def last_logits() -> np.ndarray:
        # Llama.scores stays empty unless logits_all (a [context, vocab] table): read the
        # last position's row from the context, as llama.cpp's own samplers do
        row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(llm.n_vocab(),))

    llm.reset()
    llm.eval(prompt_ids)
    tokens: list[int] = []
    steps, seconds = 0, 0.0
    while len(tokens) < max_new_tokens:
        token = int(np.argmax(last_logits()))
        if token in eos_ids:
            break
        tokens.append(token)
        if len(tokens) == max_new_tokens or llm.n_tokens >= llm.n_ctx():
            break
        started = time.perf_counter()
        llm.eval([token])
        seconds += time.perf_counter() - started
        steps += 1
    return tokens, steps, seconds


def compare_with_bundle(
    gguf_path: str | Path,
    bundle_dir: str | Path,
    eval_path: str | Path,
    limit: int = 20,
    max_new_tokens: int = 24,
    threads: int = 1,
) -> dict[str, Any]:
    """llama.cpp (llama-cpp-python) on a GGUF file against the FP32 bundle's greedy replies.

    Both get the same prompt ids (``Generator.encode_prompt``, BOS included). ``greedy_equal``:
    share of prompts with identical greedy tokens; ``token_agreement``: share of positions
    before the first difference; ``tokenizer_equal``: share of prompts llama.cpp's own
    tokenizer encodes to the runtime's ids.
    """
    from llama_cpp import Llama

    from moe2edge.export.calibration import PromptEncoder, read_rows
    from moe2edge.export.parity import runtime_greedy_with_logits
    from moe2edge.runtime.generate import Generator

    gen = Generator.from_bundle(bundle_dir, threads=threads)
    enc = PromptEncoder(bundle_dir, gen.engine.manifest)
    rows = read_rows(eval_path, limit)
    started = time.perf_counter()
    llm = Llama(
        model_path=str(gguf_path),
        n_ctx=0,  # the model's context (llama.context_length)
        n_threads=threads,
        logits_all=False,
        verbose=False,
    )
    load_s = time.perf_counter() - started
    equal = tokenizer_equal = agree = positions = decoded = 0
    decode_s = 0.0
    per_prompt = []
    for row in rows:
        prompt = enc.prompt(row)
        ours, _, _ = runtime_greedy_with_logits(gen, prompt, max_new_tokens)
        theirs, steps, seconds = llama_cpp_greedy(
            llm, prompt, max_new_tokens, set(gen.eos_token_ids)
        )
        decoded, decode_s = decoded + steps, decode_s + seconds
        utterance = row.get("utterance")
        text = gen.prompt_template.format(prompt=utterance) if utterance else row["prompt"]
        llama_ids = llm.tokenize(text.encode(), add_bos=gen.bos_token_id is not None, special=True)
        tokenizer_equal += llama_ids == prompt
        prefix = 0
        while prefix < min(len(ours), len(theirs)) and ours[prefix] == theirs[prefix]:
            prefix += 1
        agree += prefix
        positions += max(len(ours), len(theirs), 1)
        equal += ours == theirs
        per_prompt.append(
            {
                "prompt": text,
                "ours": ours,
                "llama_cpp": theirs,
                "reply": enc.tokenizer.decode(ours),
                "llama_cpp_reply": enc.tokenizer.decode(theirs),
            }
        )
    n = max(len(rows), 1)
    return {
        "prompts": len(rows),
        "load_s": round(load_s, 4),
        "greedy_equal": equal / n,
        "token_agreement": round(agree / max(positions, 1), 4),
        "tokenizer_equal": tokenizer_equal / n,
        "decode_tok_s": round(decoded / decode_s, 1) if decode_s else None,
        "per_prompt": per_prompt,
    }
