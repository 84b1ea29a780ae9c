"""Parameter-efficient adapters (peft): one implementation for distillation and fine-tuning.

``TrainConfig`` selects them: ``lora_r > 0`` alone trains LoRA (as before), ``peft_method``
names one of ``PEFT_METHODS``. The rank-based methods take their rank and scale from
``lora_r`` / ``lora_alpha``, every method its layers from ``lora_target_modules``.

- ``lora``: LoRA; ``lora_plus``: LoRA with peft's LoRA+ optimizer (the B matrices learn
  ``lora_plus_lr_ratio`` times faster than the A matrices); ``dora``: weight-decomposed LoRA;
- ``ia3``: learned scaling vectors (the MLP projections are scaled on their input, as in the
  paper); ``vera``: one shared frozen random pair of matrices, learned per-layer vectors;
  ``loha``: low-rank Hadamard product.

``stage_steps: [N1, N2]`` is a two-stage schedule over ``max_steps = N1 + N2``: for the first
N1 steps only the attention projections' adapters train (the MLP's sit at their identity
initialisation), then attention and MLP adapters train together. Every adapter is created at
the start and lives in the optimizer from step 0; a frozen one has no gradient, so AdamW
leaves it (and its moments) untouched. The stage is a function of the step, so a resumed run
is in the same stage.

AdaLoRA is not offered: its rank allocator needs ``update_and_allocate`` after every step
and a fixed ``total_step``, a second training loop's worth of coupling.
"""

from __future__ import annotations

import torch

from moe2edge.distill.errors import DistillError

ADAPTER_DIR = "adapter"  # merge_adapters=false: the peft adapter dir inside the checkpoint
PEFT_METHODS = ("lora", "lora_plus", "dora", "ia3", "vera", "loha")
RANKED = ("lora", "lora_plus", "dora", "vera", "loha")
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


def adapter_method(cfg) -> str | None:
    """The peft method ``cfg`` trains, or None for full fine-tuning."""
    if cfg.peft_method:
        return cfg.peft_method
    return "lora" if cfg.lora_r > 0 else None


def check_adapter_config(cfg) -> list[str]:
    """What is wrong with the adapter keys of ``cfg`` (an empty list when nothing is)."""
    problems = []
    method = cfg.peft_method
    if method is not None and method not in PEFT_METHODS:
        problems.append(f"peft_method={method!r}: use one of {', '.join(PEFT_METHODS)}")
        return problems
    if method in RANKED and cfg.lora_r < 1:
        problems.append(f"peft_method={method} needs lora_r >= 1 (the adapter rank)")
    if cfg.lora_r < 0:
        problems.append(f"lora_r={cfg.lora_r} must be >= 0")
    if cfg.lora_alpha <= 0:
        problems.append(f"lora_alpha={cfg.lora_alpha} must be > 0")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        problems.append(f"lora_dropout={cfg.lora_dropout} must be in [0, 1)")
    if cfg.lora_plus_lr_ratio < 1.0:
        problems.append(f"lora_plus_lr_ratio={cfg.lora_plus_lr_ratio} must be >= 1")
    targets = list(cfg.lora_target_modules or [])
    known = ATTENTION_MODULES + MLP_MODULES
    if adapter_method(cfg) and (not targets or any(t not in known for t in targets)):
        problems.append(f"lora_target_modules={targets}: name some of {list(known)}")
    stages = cfg.stage_steps
    if stages:
        if not isinstance(stages, list) or len(stages) != 2:
            problems.append(f"stage_steps={stages!r}: give two step counts [attention, all]")
        elif any(not isinstance(n, int) or n < 0 for n in stages):
            problems.append(f"stage_steps={stages}: step counts must be integers >= 0")
        elif sum(stages) != cfg.max_steps:
            problems.append(
                f"stage_steps={stages} sums to {sum(stages)} but max_steps={cfg.max_steps}; "
                f"set max_steps={sum(stages)}"
            )
        if adapter_method(cfg) is None:
            problems.append("stage_steps schedules adapters: set peft_method (or lora_r > 0)")
        elif not any(t in ATTENTION_MODULES for t in targets):
            problems.append("stage_steps: stage 1 trains attention adapters; target q/k/v/o_proj")
    if not cfg.merge_adapters and adapter_method(cfg) is None:
        problems.append("merge_adapters=false keeps adapters apart: set peft_method")
    return problems


def peft_config(cfg):
    """The peft config of ``cfg``'s method (``adapter_method(cfg)`` must not be None)."""
    import peft

    method = adapter_method(cfg)
    targets = list(cfg.lora_target_modules)
    common = dict(target_modules=targets, task_type="CAUSAL_LM")
    if method in ("lora", "lora_plus", "dora"):
        return peft.LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            bias="none",
            use_dora=method == "dora",
            **common,
        )
    if method == "ia3":
        return peft.IA3Config(
            feedforward_modules=[t for t in targets if t in MLP_MODULES], **common
        )
    if method == "vera":
        return peft.VeraConfig(r=cfg.lora_r, vera_dropout=cfg.lora_dropout, **common)
    if method == "loha":
        return peft.LoHaConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, **common)
    raise DistillError(f"peft_method={method!r}: use one of {', '.join(PEFT_METHODS)}")


def add_adapters(model: torch.nn.Module, cfg) -> torch.nn.Module:
    """``model`` wrapped in peft adapters (only they train), or ``model`` itself."""
    if adapter_method(cfg) is None:
        return model
    from peft import get_peft_model

    return get_peft_model(model, peft_config(cfg))


def make_optimizer(model: torch.nn.Module, params: list, cfg) -> torch.optim.Optimizer:
    """AdamW over ``params``; for LoRA+ peft's ``create_loraplus_optimizer`` (same AdamW)."""
    betas = (0.9, 0.95)
    if adapter_method(cfg) == "lora_plus":
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(
            model,
            torch.optim.AdamW,
            lr=cfg.lr,
            loraplus_lr_ratio=cfg.lora_plus_lr_ratio,
            loraplus_weight_decay=cfg.weight_decay,
            betas=betas,
        )
    # No decay on norm gains and biases (1-D tensors), as nanoGPT and HF's Trainer do:
    # shrinking a norm's gain towards 0 is not regularisation, it rescales the layer.
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=betas)


def stage_at(step: int, cfg) -> int:
    """0 (attention adapters only) or 1 (all adapters) under ``stage_steps``; 1 without it."""
    if not cfg.stage_steps:
        return 1
    return 0 if step < cfg.stage_steps[0] else 1


def _tuner_layers(model: torch.nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            yield name.rsplit(".", 1)[-1], module


def set_stage(model: torch.nn.Module, step: int, cfg) -> None:
    """Freeze or unfreeze the MLP adapters for ``step`` of the ``stage_steps`` schedule."""
    if not cfg.stage_steps:
        return
    train_mlp = stage_at(step, cfg) == 1
    for leaf, layer in _tuner_layers(model):
        if leaf in MLP_MODULES:
            for attr in layer.adapter_layer_names:
                getattr(layer, attr).requires_grad_(train_mlp)


def merge_adapters(model: torch.nn.Module) -> torch.nn.Module:
    """The plain transformers model with ``model``'s adapters merged into its weights."""
    return model.merge_and_unload()
