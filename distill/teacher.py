"""Loading MoE teachers from local Hugging Face checkpoints, and the demo-only teacher.

`load_teacher` takes any local causal-LM checkpoint directory (DeepSeek-V3, Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE, ...) with ``trust_remote_code`` off unless asked for.
Nothing is ever fetched from a hub. At scale:

- ``dtype="auto"`` (the default) loads the dtype the checkpoint declares (bf16 for published
  MoE checkpoints; the demo's fp32 teacher stays fp32), not fp32 for everything;
- ``device_map`` ("auto", "cuda", "cpu", a dict, ...) lets accelerate place the weights
  straight onto GPUs, CPU RAM and ``offload_folder`` on disk, instead of one fp32 copy in RAM;
- FP8 block-quantized checkpoints (DeepSeek-V3's published format) load on a CUDA GPU
  through transformers' FP8 kernels and are refused on other machines with the ways out;
- `inspect_teacher` sizes a checkpoint from its config alone (meta device, no weights read).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.hooks import AlignDevicesHook, add_hook_to_module
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    PretrainedConfig,
)
from transformers.modeling_utils import no_init_weights
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from moe2edge.distill.errors import DistillError

log = logging.getLogger(__name__)

MOE_FAMILIES = ("deepseek_v3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# device_map values with which accelerate spreads one model over all visible GPUs.
SPREAD_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
FP8_WAY_OUT = (
    "serve it (vLLM and SGLang run DeepSeek-V3's FP8 weights natively) and score the data once "
    "with `moe2edge distill cache --server URL`, or dequantize it to bf16 first (DeepSeek-V3's "
    "inference/fp8_cast_bf16.py) and pass that directory"
)


def teacher_config(path: str | Path, trust_remote_code: bool = False) -> PretrainedConfig:
    """The checked config of a local causal-LM checkpoint; DistillError on anything unusable."""
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
    if model_type not in MOE_FAMILIES:
        log.warning(
            "teacher %s is a '%s' model, not one of the MoE families %s; using it anyway",
            path,
            model_type,
            MOE_FAMILIES,
        )
    return config


def fp8_quantization(config: PretrainedConfig) -> dict | None:
    """The ``quantization_config`` of an FP8 checkpoint (DeepSeek-V3: ``quant_method: fp8``,
    ``weight_block_size: [128, 128]``, ``weight_scale_inv`` tensors), else None."""
    quant = getattr(config, "quantization_config", None)
    if quant is not None and not isinstance(quant, dict):
        quant = quant.to_dict()
    if quant and str(quant.get("quant_method", "")).lower() == "fp8":
        return quant
    return None


def _check_weights(path: Path) -> None:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise DistillError(f"{index} is not a safetensors index ({exc})") from exc
        missing = [name for name in shards if not (path / name).is_file()]
        if missing:
            raise DistillError(
                f"{path} lists {len(shards)} weight shards in {index.name} but {len(missing)} "
                f"are missing (e.g. {missing[0]}); download them all (`moe2edge distill "
                "inspect-teacher` sizes the model without them)"
            )
    elif not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise DistillError(f"{path} has a config but no weights (*.safetensors or *.bin)")


def _resolve_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in DTYPES:
        raise DistillError(f"unknown teacher dtype {dtype!r}; use auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _fp8_device_map(path: Path, quant: dict, device_map, offload_folder) -> str | dict:
    """Where FP8 weights may go: CUDA GPUs only (transformers' FP8 kernels run nowhere else)."""
    what = (
        f"{path} holds FP8 block-quantized weights (quantization_config: quant_method 'fp8', "
        f"weight_block_size {quant.get('weight_block_size')})"
    )
    if not torch.cuda.is_available():
        raise DistillError(
            f"{what}, which load only onto a CUDA GPU (compute capability 8.9+, e.g. H100); "
            f"this machine has none. Either {FP8_WAY_OUT}"
        )
    if torch.cuda.get_device_capability() < (8, 9):
        raise DistillError(
            f"{what}, whose kernels need a GPU of compute capability 8.9+ (H100, L40S, 4090); "
            f"this one is {torch.cuda.get_device_name()}. Either {FP8_WAY_OUT}"
        )
    places = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
    if offload_folder or places & {"cpu", "disk"}:
        raise DistillError(
            f"{what}: they cannot be offloaded to the CPU or disk. Either {FP8_WAY_OUT}"
        )
    return "auto" if device_map is None else device_map


def teacher_device(model: torch.nn.Module) -> torch.device:
    """Where a teacher wants its inputs: the first GPU of a device map, else its parameters'."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        for place in device_map.values():
            if place not in ("cpu", "disk"):
                return torch.device(f"cuda:{place}" if isinstance(place, int) else place)
        return torch.device("cpu")
    return next(model.parameters()).device


def is_placed(model: torch.nn.Module) -> bool:
    """True when accelerate placed the model (``device_map``): it must not be moved."""
    return bool(getattr(model, "hf_device_map", None))


def load_teacher(
    path: str | Path,
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    *,
    device_map: str | dict | None = None,
    offload_folder: str | Path | None = None,
) -> torch.nn.Module:
    """Load a local HF causal LM for scoring; raise DistillError on anything unusable.

    ``dtype``: "auto" (what the checkpoint declares, else its weights' dtype), a name in
    ``DTYPES`` or a torch dtype. ``device_map``: None loads into CPU RAM (the caller moves it);
    otherwise accelerate places the weights as it says ("auto": GPUs, then CPU RAM, then
    ``offload_folder`` on disk) and the model takes inputs on any device and answers on theirs.
    """
    path = Path(path)
    config = teacher_config(path, trust_remote_code)
    _check_weights(path)
    quant = fp8_quantization(config)
    if quant is not None:
        device_map = _fp8_device_map(path, quant, device_map, offload_folder)
    if device_map is None and offload_folder is not None:
        raise DistillError("offload_folder needs a device_map (e.g. auto) that offloads to disk")
    if device_map in SPREAD_MAPS and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DistillError(
            f"teacher device_map={device_map!r} spreads one teacher over all GPUs, but under "
            "torchrun every rank loads its own: leave the device map unset (each rank moves the "
            "teacher to its GPU) or train from a teacher cache"
        )
    kwargs: dict = {"dtype": _resolve_dtype(dtype)}
    if device_map is not None:
        kwargs["device_map"] = device_map
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
    model = AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=trust_remote_code, local_files_only=True, **kwargs
    )
    if device_map is not None and getattr(model, "_hf_hook", None) is None:
        # One device and no hooks from accelerate: move inputs there and outputs back, like a
        # model spread over devices does, so callers need not know where it lives.
        hook = AlignDevicesHook(execution_device=teacher_device(model), io_same_device=True)
        add_hook_to_module(model, hook)
    model.eval()
    model.requires_grad_(False)
    return model


def inspect_teacher(path: str | Path, trust_remote_code: bool = False) -> dict:
    """Size of a teacher from its config alone: built on the meta device, no weight file read.

    ``params``: all parameters; ``active_params``: those used per token (``active_parameters``:
    routed experts picked per token plus shared experts, attention, dense layers, embeddings).
    """
    config = teacher_config(path, trust_remote_code)
    # no_init_weights: random init of meta tensors is pointless and took 40 of 50 s at 671B.
    with init_empty_weights(), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    quant = fp8_quantization(config)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return {
        "model_type": config.model_type,
        "params": count_parameters(model),
        "active_params": active_parameters(model),
        "vocab_size": config.vocab_size,
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        "quantization": None if quant is None else {
            "quant_method": quant.get("quant_method"),
            "weight_block_size": quant.get("weight_block_size"),
        },
    }  # fmt: skip


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
