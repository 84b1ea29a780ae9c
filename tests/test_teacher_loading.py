"""Any local HF MoE checkpoint loads as a teacher; bad directories fail clearly."""

import json

import pytest
import torch
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    ViTConfig,
    ViTModel,
)

from moe2edge.distill.errors import DistillError
from moe2edge.distill.teacher import active_parameters, count_parameters, load_teacher
from tests.conftest import PYTHON, ROOT, subprocess_env

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
FAMILIES = {
    "deepseek_v3": (
        DeepseekV3ForCausalLM,
        DeepseekV3Config(
            **COMMON,
            intermediate_size=64,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=0,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
        ),
    ),
    "mixtral": (
        MixtralForCausalLM,
        MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    ),
    "qwen2_moe": (
        Qwen2MoeForCausalLM,
        Qwen2MoeConfig(
            **COMMON,
            intermediate_size=64,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
        ),
    ),
    "qwen3_moe": (
        Qwen3MoeForCausalLM,
        Qwen3MoeConfig(
            **COMMON,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_experts=8,
            num_experts_per_tok=2,
            head_dim=8,
        ),
    ),
    "olmoe": (
        OlmoeForCausalLM,
        OlmoeConfig(**COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=2),
    ),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_moe_family_loads_as_teacher(family, tmp_path):
    cls, config = FAMILIES[family]
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path / family)
    teacher = load_teacher(tmp_path / family)
    assert teacher.config.model_type == family
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert active_parameters(teacher) < count_parameters(teacher)
    logits = teacher(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 96) and torch.isfinite(logits).all()


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(DistillError, match="does not exist"):
        load_teacher(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(DistillError, match="no config.json"):
        load_teacher(tmp_path)


def test_non_causal_lm_is_refused(tmp_path):
    ViTModel(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=8,
            patch_size=4,
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(DistillError, match="not a causal language model"):
        load_teacher(tmp_path)


def test_config_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(DistillError, match="no weights"):
        load_teacher(tmp_path)


def test_cli_exits_non_zero_with_message_for_missing_teacher(tmp_path):
    import subprocess

    proc = subprocess.run(
        [PYTHON, "-m", "moe2edge.cli", "distill", "inspect-teacher", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=subprocess_env(),
        timeout=120,
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
