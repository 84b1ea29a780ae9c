"""MoE -> dense student initialisation, and the production student's size."""

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

from moe2edge.distill.data import collate, encode_rows
from moe2edge.distill.merge import expert_usage, merge_moe_to_dense
from moe2edge.distill.student import build_student
from moe2edge.distill.tokenizer import load_tokenizer
from moe2edge.rows import read_rows

IDS = torch.randint(3, 90, (4, 12), generator=torch.Generator().manual_seed(0))


def static_routing(model):
    """Zero router weights: every token routes to every expert with weight 1/E."""
    for layer in model.model.layers:
        for moe in (getattr(layer, "mlp", None), getattr(layer, "block_sparse_moe", None)):
            if hasattr(moe, "gate"):  # dense layers (first_k_dense_replace) have none
                torch.nn.init.zeros_(moe.gate.weight)
    return model


def test_mixtral_to_llama_is_exact_under_static_routing():
    torch.manual_seed(0)
    teacher = static_routing(
        MixtralForCausalLM(
            MixtralConfig(
                vocab_size=96,
                hidden_size=32,
                intermediate_size=24,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_local_experts=4,
                num_experts_per_tok=4,
                sliding_window=None,
            )
        )
    ).eval()
    student = merge_moe_to_dense(teacher, [{"input_ids": IDS}]).eval()
    assert student.config.model_type == "llama"
    assert student.config.intermediate_size == 4 * 24
    with torch.no_grad():
        diff = (student(input_ids=IDS).logits - teacher(input_ids=IDS).logits).abs().max()
    assert diff < 1e-4


def test_deepseek_v3_to_dense_is_exact_under_static_routing():
    torch.manual_seed(0)
    teacher = static_routing(
        DeepseekV3ForCausalLM(
            DeepseekV3Config(
                vocab_size=96,
                hidden_size=32,
                intermediate_size=48,
                moe_intermediate_size=16,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=4,
                n_routed_experts=4,
                num_experts_per_tok=4,
                n_shared_experts=1,
                n_group=1,
                topk_group=1,
                first_k_dense_replace=1,
                kv_lora_rank=16,
                q_lora_rank=None,
                qk_rope_head_dim=4,
                qk_nope_head_dim=4,
                v_head_dim=8,
                routed_scaling_factor=1.0,
                norm_topk_prob=True,
            )
        )
    ).eval()
    student = merge_moe_to_dense(teacher, [{"input_ids": IDS}]).eval()
    assert student.config.model_type == "deepseek_v3"
    assert student.config.first_k_dense_replace == 3  # every layer dense
    assert student.config.intermediate_size == 16 + 4 * 16  # shared + routed; layer 0 padded
    with torch.no_grad():
        diff = (student(input_ids=IDS).logits - teacher(input_ids=IDS).logits).abs().max()
    assert diff < 1e-4


def heldout_kl(teacher, student, batch) -> float:
    with torch.no_grad():
        t = F.log_softmax(teacher(**batch).logits, -1)
        s = F.log_softmax(student(**batch).logits, -1)
    mask = batch["attention_mask"].bool()
    return float((t.exp() * (t - s)).sum(-1)[mask].mean())


def test_merged_init_starts_closer_to_the_teacher_than_random(tiny_run):
    tokenizer = load_tokenizer(tiny_run["tokenizer"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_run["teacher"]).eval()
    calib = collate(encode_rows(tokenizer, read_rows(tiny_run["train"])[:32], 64), 0)
    evaluation = collate(encode_rows(tokenizer, read_rows(tiny_run["eval"]), 64), 0)
    batches = [{k: calib[k] for k in ("input_ids", "attention_mask")}]
    usage = expert_usage(teacher, batches)
    assert all(torch.isclose(u.sum(), torch.tensor(1.0), atol=1e-4) for u in usage.values())
    merged = merge_moe_to_dense(teacher, batches, keep_experts=4)
    torch.manual_seed(0)
    random_init = type(merged)(merged.config)
    batch = {k: evaluation[k] for k in ("input_ids", "attention_mask")}
    kl_merged, kl_random = (
        heldout_kl(teacher, merged, batch),
        heldout_kl(teacher, random_init, batch),
    )
    assert kl_merged < 0.5 * kl_random, (kl_merged, kl_random)


def test_dense_13b_preset_is_13b_parameters():
    model = build_student("dense-13b", device="meta")
    params = sum(p.numel() for p in model.parameters())
    assert 12.5e9 <= params <= 13.5e9, params
    assert model.config.vocab_size == 129280  # DeepSeek-V3's vocabulary


def test_unsupported_family_is_refused():
    from moe2edge.distill.errors import DistillError
    from moe2edge.distill.student import build_student as build

    with pytest.raises(DistillError, match="merging experts supports"):
        expert_usage(build("tiny", vocab_size=50), [{"input_ids": IDS % 50}])
