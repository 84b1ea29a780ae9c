"""Dense Llama-architecture students: presets, and building one for a teacher's vocabulary.

A student is a standard HF ``LlamaForCausalLM`` checkpoint, so it loads in transformers and
vLLM, and optimum exports it with a KV cache. For llama.cpp, ``moe2edge export gguf`` writes it
(llama.cpp's convert_hf_to_gguf.py refuses freshly trained tokenizers: docs/export.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from moe2edge.distill.errors import DistillError
from moe2edge.distill.formats import DEMO_TOKEN_IDS

# name -> LlamaConfig fields (vocab_size comes from the tokenizer / teacher)
PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    ),
    # head_dim 16: onnxruntime's GroupQueryAttention (the fast graph, and onnxruntime-genai)
    # needs a multiple of 16
    "demo": dict(
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=3,
        max_position_embeddings=128,
    ),
    # a one-layer draft for speculative decoding of the demo student (``distill draft``)
    "draft": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    ),
    "100m": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    ),
    # Production target: ~13B dense with DeepSeek-V3's 129,280-token vocabulary.
    "dense-13b": dict(
        hidden_size=5120,
        intermediate_size=14848,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        vocab_size=129280,
    ),
}


def student_config(preset: str, vocab_size: int | None = None, **overrides) -> LlamaConfig:
    if preset not in PRESETS:
        raise DistillError(f"unknown student preset {preset!r}; choose one of {sorted(PRESETS)}")
    # Special ids: the demo tokenizer's unless given (bos_token_id / eos_token_id /
    # pad_token_id overrides: ``tokenizer.special_token_ids``, what training passes)
    fields = dict(rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=10000.0)
    fields.update(DEMO_TOKEN_IDS)
    fields.update(PRESETS[preset])
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size
    unknown = sorted(k for k in overrides if not hasattr(LlamaConfig(), k))
    if unknown:
        raise DistillError(
            f"student overrides {unknown} are not LlamaConfig fields; use its field names "
            "(hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, ...)"
        )
    fields.update(overrides)
    return LlamaConfig(**fields)


def build_student(
    preset: str,
    vocab_size: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    **overrides,
) -> LlamaForCausalLM:
    """A randomly initialised student; ``device='meta'`` builds it without memory (sizing)."""
    config = student_config(preset, vocab_size, **overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(config)


def load_student(init_dir: str | Path, device: str | torch.device = "cpu") -> PreTrainedModel:
    """The HF checkpoint ``init_dir`` (e.g. a merged MoE -> dense student) in fp32.

    ``device='meta'`` builds the same model from its config.json only, reading no weights:
    what the ranks other than 0 start from under FSDP2 (``distributed.shard_model``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if torch.device(device).type == "meta":
        config = AutoConfig.from_pretrained(init_dir, local_files_only=True)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(
        init_dir, local_files_only=True, dtype=torch.float32
    ).to(device)
