"""Loading MoE teachers from local Hugging Face checkpoints, and the demo-only teacher.

`load_teacher` takes any local causal-LM checkpoint directory (DeepSeek-V3, Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE, ...) with ``trust_remote_code`` off unless asked for.
Nothing is ever fetched from a hub.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from moe2edge.distill.errors import DistillError

log = logging.getLogger(__name__)

MOE_FAMILIES = ("deepseek_v3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def load_teacher(
    path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> torch.nn.Module:
    """Load a local HF causal LM for scoring; raise DistillError on anything unusable."""
    path = Path(path)
    if not path.is_dir():
        raise DistillError(
            f"teacher directory {path} does not exist; pass a local Hugging Face "
            "checkpoint directory (config.json + weights)"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise DistillError(f"{path} has no config.json: it is not a Hugging Face checkpoint")
    try:
        model_type = json.loads(config_file.read_text())["model_type"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise DistillError(f"{config_file} is not a valid model config ({exc})") from exc
    config = AutoConfig.from_pretrained(
        path, trust_remote_code=trust_remote_code, local_files_only=True
    )
    auto_map = getattr(config, "auto_map", None) or {}
    if (
        model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and "AutoModelForCausalLM" not in auto_map
    ):
        raise DistillError(
            f"{path} holds a '{model_type}' model, which is not a causal language model; "
            f"a teacher must be one (MoE families: {', '.join(MOE_FAMILIES)})"
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise DistillError(f"{path} has a config but no weights (*.safetensors or *.bin)")
    if model_type not in MOE_FAMILIES:
        log.warning(
            "teacher %s is a '%s' model, not one of the MoE families %s; using it anyway",
            path,
            model_type,
            MOE_FAMILIES,
        )
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=trust_remote_code, local_files_only=True
    )
    model.eval()
    model.requires_grad_(False)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def active_parameters(model: torch.nn.Module) -> int:
    """Parameters touched per token: routed experts not picked by the router don't count."""
    config = model.config
    total = count_parameters(model)
    n_routed = (
        getattr(config, "n_routed_experts", None)
        or getattr(config, "num_local_experts", None)
        or getattr(config, "num_experts", None)
    )
    top_k = getattr(config, "num_experts_per_tok", None)
    if not n_routed or not top_k:
        return total  # dense model
    inactive = 0
    for module in model.modules():
        experts = getattr(module, "experts", None)
        if isinstance(experts, torch.nn.ModuleList) and len(experts) == n_routed:
            per_expert = count_parameters(experts[0])
            inactive += (n_routed - top_k) * per_expert
        elif experts is not None and not isinstance(experts, torch.nn.ModuleList):
            # Fused expert tensors (e.g. Mixtral/OLMoE in newer transformers): scale by share.
            n = count_parameters(experts)
            inactive += n * (n_routed - top_k) // n_routed
    return total - inactive


def demo_teacher_config(vocab_size: int, **overrides) -> DeepseekV3Config:
    """A tiny DeepSeek-V3 (MLA attention, 8 routed experts, top-2, one shared expert). DEMO ONLY."""
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
        kv_lora_rank=32,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=24,
        v_head_dim=32,
        max_position_embeddings=128,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return DeepseekV3Config(**settings)


def build_demo_teacher(vocab_size: int, seed: int = 0, **overrides) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    return DeepseekV3ForCausalLM(demo_teacher_config(vocab_size, **overrides))
