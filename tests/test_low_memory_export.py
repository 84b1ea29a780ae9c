"""The FP32 export's memory savers: plain safetensors reads, pre-transposed Linears."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe2edge.export.errors import ExportError
from moe2edge.export.low_memory import (
    PreTransposedLinear,
    load_unmapped,
    pretranspose_linears,
    read_safetensors,
)


def test_plain_reads_equal_safetensors(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "empty": torch.empty(0, 4),
        "half": torch.randn(2, 2).half(),
    }
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    read = dict(read_safetensors(path))
    reference = load_file(str(path))
    assert read.keys() == reference.keys()
    for name, tensor in reference.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name


def test_truncated_file_is_named(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.randn(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ExportError, match="truncated"):
        list(read_safetensors(path))


def test_pretransposed_model_computes_the_same(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        expected = model(ids).logits
    loaded = load_unmapped(tmp_path)
    assert not any(p.is_meta for p in loaded.parameters())
    replaced = pretranspose_linears(loaded)
    assert replaced == 2 * 7  # q k v o gate up down per layer; the tied lm_head stays
    assert type(loaded.lm_head) is torch.nn.Linear
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, PreTransposedLinear)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, expected, atol=1e-5)


def test_missing_weights_are_named(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.norm.weight"]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ExportError, match="model.norm.weight"):
        load_unmapped(tmp_path)
