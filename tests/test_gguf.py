"""`moe2edge export gguf`: the file's keys, tensors and types (needs `gguf` only), and
llama.cpp running it (opt-in: llama-cpp-python compiles for minutes, `make test-gguf`)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from tests._export_common import run_cli
from tests.conftest import require_module

pytestmark = require_module("gguf", install="pip install 'moe2edge[export]'")

needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python missing: `make test-gguf` builds it (opt-in: compiles for minutes)",
)
BLOCK_TENSORS = (
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
)


def read_back(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


def hf_tensor(student, name):
    from safetensors.numpy import load_file

    return load_file(str(student / "model.safetensors"))[name]


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    paths = {}
    for gguf_type in ("f16", "q8_0", "q4_0"):
        proc = run_cli("gguf", tiny_run["student"], out / f"{gguf_type}.gguf", "--type", gguf_type)
        assert proc.returncode == 0, proc.stderr
        assert f"wrote {out / f'{gguf_type}.gguf'}: {gguf_type}" in proc.stdout
        paths[gguf_type] = out / f"{gguf_type}.gguf"
    return paths


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0", "q4_0"])
def test_file_reads_back_with_keys_tensors_and_types(exported, tiny_run, gguf_type):
    config = json.loads((tiny_run["student"] / "config.json").read_text())
    tok_config = json.loads((tiny_run["student"] / "tokenizer_config.json").read_text())
    vocab = json.loads((tiny_run["student"] / "tokenizer.json").read_text())["model"]["vocab"]
    fields, tensors = read_back(exported[gguf_type])

    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == config["num_hidden_layers"]
    assert fields["llama.embedding_length"] == config["hidden_size"]
    assert fields["llama.feed_forward_length"] == config["intermediate_size"]
    assert fields["llama.attention.head_count"] == config["num_attention_heads"]
    assert fields["llama.attention.head_count_kv"] == config["num_key_value_heads"]
    assert fields["llama.context_length"] == config["max_position_embeddings"]
    assert fields["llama.rope.freq_base"] == pytest.approx(config["rope_theta"])
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == config["vocab_size"] == fields["llama.vocab_size"]
    assert all(tokens[i] == t for t, i in vocab.items())
    assert tokens[fields["tokenizer.ggml.bos_token_id"]] == tok_config["bos_token"]
    assert tokens[fields["tokenizer.ggml.eos_token_id"]] == tok_config["eos_token"]
    assert fields["tokenizer.ggml.add_bos_token"] is True
    control = [tokens[i] for i, t in enumerate(fields["tokenizer.ggml.token_type"]) if t == 3]
    assert {"<bos>", "<|end|>", "<|user|>", "<|assistant|>"} <= set(control)
    assert "<|assistant|>" in fields["tokenizer.chat_template"]

    n_layers = config["num_hidden_layers"]
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{t}.weight" for i in range(n_layers) for t in BLOCK_TENSORS
    }
    assert set(tensors) == expected
    hidden, vocab_size = config["hidden_size"], config["vocab_size"]
    assert list(tensors["token_embd.weight"].shape) == [hidden, vocab_size]  # GGUF: fastest first
    assert list(tensors["blk.0.ffn_down.weight"].shape) == [config["intermediate_size"], hidden]
    for name, tensor in tensors.items():
        want = "F32" if name.endswith("norm.weight") else gguf_type.upper()
        assert tensor.tensor_type.name == want, name


def test_weights_match_the_checkpoint_with_llama_cpp_rope_order(exported, tiny_run):
    """F16 values are the checkpoint's; q/k rows are reordered per head (and only those)."""
    import gguf

    from moe2edge.export.gguf import permute_for_rope

    config = json.loads((tiny_run["student"] / "config.json").read_text())
    _, tensors = read_back(exported["f16"])
    for hf, ours, heads in (
        ("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", "num_attention_heads"),
        ("model.layers.0.self_attn.k_proj.weight", "blk.0.attn_k.weight", "num_key_value_heads"),
        ("model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight", None),
    ):
        weights = hf_tensor(tiny_run["student"], hf)
        got = np.asarray(tensors[ours].data, dtype=np.float32)
        want = permute_for_rope(weights, config[heads]) if heads else weights
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
        if heads:
            assert not np.allclose(got, weights, atol=1e-3)  # the permutation did something

    _, q8 = read_back(exported["q8_0"])
    weights = hf_tensor(tiny_run["student"], "model.layers.1.mlp.up_proj.weight")
    got = gguf.quants.dequantize(
        np.asarray(q8["blk.1.ffn_up.weight"].data), gguf.GGMLQuantizationType.Q8_0
    )
    np.testing.assert_allclose(got, weights, atol=np.abs(weights).max() / 127 + 1e-6)


def test_rows_that_are_not_whole_blocks_stay_f16_and_tied_embeddings(tiny_run, tmp_path):
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from moe2edge.export.gguf import export_gguf

    vocab_size = json.loads((tiny_run["student"] / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=40,  # not a multiple of the 32-wide Q4_0 block
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=True,
        )
    )
    student = tmp_path / "odd"
    model.save_pretrained(student)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_run["student"] / name, student / name)
    summary = export_gguf(student, tmp_path / "odd.gguf", "q4_0")
    _, tensors = read_back(tmp_path / "odd.gguf")
    assert (
        "output.weight" not in tensors and summary["tied_embeddings"]
    )  # llama.cpp reuses token_embd
    f16 = {n for n, t in tensors.items() if t.tensor_type.name == "F16"}
    assert f16 == set(summary["kept_f16"]) == {
        "token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight",
        "blk.0.attn_v.weight", "blk.0.attn_output.weight", "blk.0.ffn_gate.weight",
        "blk.0.ffn_up.weight",
    }  # fmt: skip
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "Q4_0"  # rows of 64


def test_refuses_non_llama_and_existing_output(tiny_run, exported, tmp_path):
    proc = run_cli("gguf", tiny_run["teacher"], tmp_path / "t.gguf")  # a DeepSeek-V3 teacher
    assert proc.returncode == 2 and "Llama checkpoints only" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "t.gguf").exists()
    proc = run_cli("gguf", tiny_run["student"], exported["f16"])
    assert proc.returncode == 2 and "already exists" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


@needs_llama_cpp
def test_llama_cpp_runs_the_files_and_f16_greedy_equals_fp32_bundle(exported, tiny_run):
    from moe2edge.export.gguf import compare_with_bundle

    results = {}
    for gguf_type, path in exported.items():
        results[gguf_type] = compare_with_bundle(
            path, tiny_run["bundle"], tiny_run["eval"], limit=12, max_new_tokens=12
        )
        assert results[gguf_type]["prompts"] == 12
        assert sum(len(p["llama_cpp"]) for p in results[gguf_type]["per_prompt"]) > 0
    print({t: {k: r[k] for k in ("greedy_equal", "token_agreement")} for t, r in results.items()})
    f16 = results["f16"]
    assert f16["tokenizer_equal"] == 1.0  # llama.cpp's `gpt-2` pre-tokenizer splits as ours
    mismatches = [p for p in f16["per_prompt"] if p["ours"] != p["llama_cpp"]]
    assert not mismatches, mismatches
