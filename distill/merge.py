"""Student initialisation from the teacher itself: MoE -> dense by merging experts.

Each MoE layer's routed experts are weighted by how much routing weight the router gives
them on calibration data, and concatenated (with the shared expert, weight 1) into one
wide dense FFN:

    FFN(x) = sum_e w_e * down_e(act(gate_e x) * up_e x)
           = [w_1 down_1 | ... | w_m down_m] (act([gate_1; ...] x) * [up_1; ...] x)

which is exactly the MoE output when routing is static, and the best static
approximation of it otherwise. ``keep_experts`` keeps the m most-used experts (the
"score and group" step of published MoE-to-dense recipes) to bound the dense width.
Attention, norms and embeddings are copied unchanged, so the student must have the
teacher's width:

- DeepSeek-V3 -> DeepSeek-V3 with every layer dense (MLA attention kept exactly);
- Mixtral -> Llama (the same attention, RMSNorm and RoPE).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, LlamaConfig, LlamaForCausalLM

from moe2edge.distill.errors import DistillError

log = logging.getLogger(__name__)
SUPPORTED = ("deepseek_v3", "mixtral")


def _moe_blocks(teacher) -> dict[int, torch.nn.Module]:
    blocks = {}
    for i, layer in enumerate(teacher.model.layers):
        mlp = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
        if mlp is not None and isinstance(getattr(mlp, "experts", None), torch.nn.ModuleList):
            blocks[i] = mlp
    return blocks


def _routing_of(block, gate_output, model_type: str, top_k: int) -> torch.Tensor:
    """Per-token routing weights [tokens, experts] (zero for experts not picked)."""
    n = len(block.experts)
    if model_type == "deepseek_v3":
        indices, weights = gate_output
    else:  # mixtral: the gate is a Linear giving router logits
        probs = F.softmax(gate_output.float(), dim=-1)
        weights, indices = torch.topk(probs, top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
    dense = torch.zeros(indices.shape[0], n, dtype=torch.float32)
    return dense.scatter_(1, indices.long(), weights.float())


@torch.no_grad()
def expert_usage(teacher, batches: Iterable[dict[str, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """Mean routing weight of each expert per MoE layer over the calibration tokens."""
    model_type = teacher.config.model_type
    if model_type not in SUPPORTED:
        raise DistillError(f"merging experts supports {SUPPORTED}, not '{model_type}'")
    top_k = teacher.config.num_experts_per_tok
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    hooks = []
    for i, block in _moe_blocks(teacher).items():

        def hook(_module, _inputs, output, i=i, block=block):
            routing = _routing_of(block, output, model_type, top_k)
            sums[i] = sums.get(i, 0) + routing.sum(0)
            counts[i] = counts.get(i, 0) + routing.shape[0]

        hooks.append(block.gate.register_forward_hook(hook))
    try:
        for batch in batches:
            teacher(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    finally:
        for h in hooks:
            h.remove()
    if not sums:
        raise DistillError("no routing was observed: empty calibration data or no MoE layers")
    return {i: sums[i] / counts[i] for i in sums}


def _expert_weights(expert, model_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if model_type == "mixtral":
        return expert.w1.weight, expert.w3.weight, expert.w2.weight
    return expert.gate_proj.weight, expert.up_proj.weight, expert.down_proj.weight


def merged_ffn(
    block, usage: torch.Tensor, model_type: str, keep_experts: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate [I, H], up [I, H], down [H, I]) of the concatenated dense FFN."""
    order = torch.argsort(usage, descending=True)
    kept = order[: keep_experts or len(order)]
    weights = usage[kept]
    if weights.sum() > 0:  # keep the total routed mass when dropping rarely used experts
        weights = weights * (usage.sum() / weights.sum())
    gates, ups, downs = [], [], []
    shared = getattr(block, "shared_experts", None)
    if shared is not None:
        g, u, d = _expert_weights(shared, model_type)
        gates.append(g), ups.append(u), downs.append(d)
    for e, w in zip(kept.tolist(), weights.tolist(), strict=True):
        g, u, d = _expert_weights(block.experts[e], model_type)
        gates.append(g), ups.append(u), downs.append(d * w)
    return torch.cat(gates), torch.cat(ups), torch.cat(downs, dim=1)


def _pad_rows(t: torch.Tensor, rows: int, dim: int = 0) -> torch.Tensor:
    """Zero-pad an FFN to a wider intermediate size (zero units contribute nothing)."""
    missing = rows - t.shape[dim]
    if missing == 0:
        return t
    pad_shape = list(t.shape)
    pad_shape[dim] = missing
    return torch.cat([t, t.new_zeros(pad_shape)], dim=dim)


def _dense_config(teacher, width: int):
    c = teacher.config
    if c.model_type == "deepseek_v3":
        fields = c.to_dict()
        fields.update(first_k_dense_replace=c.num_hidden_layers, intermediate_size=width)
        for key in ("model_type", "transformers_version", "architectures"):
            fields.pop(key, None)
        return DeepseekV3Config(**fields), DeepseekV3ForCausalLM
    return LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=width,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.hidden_size // c.num_attention_heads,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
    ), LlamaForCausalLM


@torch.no_grad()
def merge_moe_to_dense(
    teacher, batches: Iterable[dict[str, torch.Tensor]], keep_experts: int | None = None
):
    """A dense student of the teacher's width, initialised from the teacher's experts."""
    model_type = teacher.config.model_type
    usage = expert_usage(teacher, batches)
    blocks = _moe_blocks(teacher)
    ffns = {i: merged_ffn(blocks[i], usage[i], model_type, keep_experts) for i in blocks}
    dense_layers = {i: layer.mlp for i, layer in enumerate(teacher.model.layers) if i not in blocks}
    for i, mlp in dense_layers.items():  # layers that were dense already (first_k_dense_replace)
        ffns[i] = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    width = max(g.shape[0] for g, _, _ in ffns.values())
    config, cls = _dense_config(teacher, width)
    student = cls(config).to(teacher.dtype)
    source = teacher.state_dict()
    target = student.state_dict()
    for name in target:
        if ".mlp." in name or ".block_sparse_moe." in name:
            continue
        if name not in source or source[name].shape != target[name].shape:
            raise DistillError(f"cannot copy {name} from the teacher (missing or another shape)")
        target[name].copy_(source[name])
    for i, (g, u, d) in ffns.items():
        mlp = student.model.layers[i].mlp
        mlp.gate_proj.weight.copy_(_pad_rows(g, width))
        mlp.up_proj.weight.copy_(_pad_rows(u, width))
        mlp.down_proj.weight.copy_(_pad_rows(d, width, dim=1))
    log.info(
        "merged %d MoE layers into dense FFNs of width %d (%s experts kept per layer)",
        len(blocks),
        width,
        keep_experts or "all",
    )
    return student
