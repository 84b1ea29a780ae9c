"""``TrainConfig``: every key of the training recipe, its default, and the checks on it.

Loaded from YAML with ``key=value`` overrides (``config.load_config``); ``check_config`` stops
a run early, naming the key and what to change, on settings that cannot work together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moe2edge.distill.adapters import check_adapter_config
from moe2edge.distill.distributed import dtype_named
from moe2edge.distill.errors import DistillError
from moe2edge.distill.losses import LOSS_NAMES
from moe2edge.distill.modes import MODES
from moe2edge.distill.teacher import DTYPES as TEACHER_DTYPES

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    run_dir: str = "runs/distill"
    train_data: str = "runs/demo/data/train.jsonl"
    tokenizer: str = "runs/demo/tokenizer"
    teacher: str | None = "runs/demo/teacher"  # None: CE only (teacher pre-training), or a cache
    teacher_cache: str | None = None  # a `moe2edge distill cache` dir made on train_data
    # How a live teacher loads (moe2edge.distill.teacher.load_teacher): auto = the checkpoint's
    # dtype (bf16 for published MoE checkpoints, fp32 for the demo's); device_map None = into
    # CPU RAM, then moved to the training device; auto/cuda/cpu/... = placed by accelerate,
    # spilling to teacher_offload_folder on disk (single process only)
    teacher_dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    teacher_device_map: str | None = None
    teacher_offload_folder: str | None = None
    student_preset: str = "demo"
    student_init: str | None = None  # an HF checkpoint dir to start from instead of a preset
    student_overrides: dict = field(default_factory=dict)  # LlamaConfig fields over the preset
    # where the sequences come from: off_policy | seq_kd | on_policy
    mode: str = "off_policy"
    lambda_on_policy: float = 0.5  # on_policy: share of steps on student samples (GKD lambda)
    sample_temperature: float = 1.0  # on_policy: student sampling temperature
    seq_kd_data: str | None = None  # seq_kd: where the teacher's replies go (default in run_dir)
    seq_kd_temperature: float = 0.0  # seq_kd: 0 = greedy teacher replies
    max_new_tokens: int = 40  # sampled/generated reply length cap (on_policy, seq_kd, eval)
    loss: str = "fkl"
    temperature: float = 2.0
    ce_ratio: float = 0.5
    # steps of CE only before the KD mix starts: the SFT-trained start that MiniLLM (rkl),
    # GKD (jsd) and DistiLLM (skl/srkl) assume; on-policy sampling starts after it too
    ce_warmup_steps: int = 0
    # attention transfer (distill/attention_transfer.py): + weight * KL(teacher attention ||
    # student attention), head-averaged, layer by layer; needs the live teacher (teacher=PATH,
    # also beside a teacher_cache, which then gives the logits) and eager attention
    attention_weight: float = 0.0
    attention_layers: int = 0  # match only the student's last n layers (0: all)
    beta: float = 0.5  # jsd
    alpha: float = 0.1  # skl / srkl
    loss_chunk_size: int = 1024  # tokens per chunk in the loss (memory bound at a big vocab)
    max_steps: int = 400
    batch_size: int = 32  # global batch: split across ranks and grad_accum_steps
    grad_accum_steps: int = 1
    max_seq_len: int = 64
    # lay a micro-batch's examples end to end in rows of max_seq_len tokens (fewer pads);
    # position_ids restart per example, so no token attends across examples
    packing: bool = False
    # read and encode the data set as training goes (data sets too large to hold), in file
    # order: rank r takes rows r, r + world, ...; no shuffling (shuffle when writing the set)
    streaming: bool = False
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # 0: no clipping
    activation_checkpointing: bool = False
    bf16: bool = True  # autocast to bf16 on CUDA only; the CPU always trains in fp32
    # FSDP2 (torchrun) only: the dtype parameters are gathered in for compute and the one
    # gradients are reduced in; the sharded master weights and Adam state stay fp32
    param_dtype: str = "float32"  # float32 | bfloat16 | float16
    reduce_dtype: str = "float32"
    # FSDP2: reduce-scatter after every micro-batch instead of once per step (each rank then
    # holds no unsharded gradient between micro-batches: less memory, more communication)
    sync_every_micro_batch: bool = False
    device: str = "auto"  # auto | cpu | cuda
    # adapters (peft, distill/adapters.py): lora_r > 0 alone trains LoRA; peft_method names
    # lora | lora_plus | dora | ia3 | vera | loha (rank and scale: lora_r, lora_alpha)
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    peft_method: str | None = None
    lora_plus_lr_ratio: float = 16.0  # lora_plus: lr of the B matrices / lr of the A matrices
    stage_steps: list[int] = field(default_factory=list)  # [N1, N2]: attention-only, then all
    merge_adapters: bool = True  # false: base + peft adapter dir (save_pretrained) side by side
    checkpoint_every: int = 200  # 0: no checkpoints
    keep_checkpoints: int = 2  # 0: keep all
    resume: str = "auto"  # auto | none | PATH of a checkpoints/step-N dir
    eval_data: str | None = None  # held-out JSONL; evaluated every eval_every steps and at the end
    eval_every: int = 0  # 0: only at the end
    eval_teacher_cache: str | None = None  # a cache made on eval_data (when no live teacher)
    eval_task_limit: int = 50  # rows whose greedy reply is scored for task accuracy
    eval_batch_size: int = 16
    log_every: int = 10
    tensorboard: bool = True
    plot: bool = True  # write run_dir/curves.png at the end
    seed: int = 0
    threads: int = 0  # 0: torch's default


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup then cosine decay to ``min_lr_ratio * lr`` (as a multiplier of lr)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


def check_config(cfg: TrainConfig, has_teacher: bool) -> None:
    """Stop early, with what to change, on settings that cannot work together."""
    problems = []
    if cfg.mode not in MODES:
        problems.append(f"mode={cfg.mode!r}: use one of {', '.join(MODES)}")
    if cfg.loss not in LOSS_NAMES:
        problems.append(f"loss={cfg.loss!r}: use one of {', '.join(LOSS_NAMES)}")
    if cfg.mode != "off_policy" and not has_teacher:
        problems.append(f"mode={cfg.mode} needs a live teacher (teacher=PATH) to generate/score")
    if cfg.mode != "off_policy" and cfg.teacher_cache:
        problems.append(
            f"mode={cfg.mode} trains on new sequences a cache made on the data set cannot "
            "score; drop teacher_cache or use mode=off_policy"
        )
    if cfg.teacher_dtype not in ("auto", *TEACHER_DTYPES):
        problems.append(
            f"teacher_dtype={cfg.teacher_dtype!r}: use auto or {sorted(TEACHER_DTYPES)}"
        )
    if not 0 <= cfg.ce_warmup_steps <= max(cfg.max_steps, 0):
        problems.append(f"ce_warmup_steps={cfg.ce_warmup_steps} must be in [0, max_steps]")
    if not 0.0 <= cfg.ce_ratio <= 1.0:
        problems.append(f"ce_ratio={cfg.ce_ratio} must be in [0, 1]")
    if cfg.attention_weight < 0 or cfg.attention_layers < 0:
        problems.append("attention_weight and attention_layers must be >= 0")
    if cfg.attention_weight > 0 and not has_teacher:
        problems.append(
            f"attention_weight={cfg.attention_weight} needs the live teacher's attention maps "
            "(a teacher cache holds logits only): set teacher=PATH (teacher_cache may stay, "
            "for the logits)"
        )
    if not 0.0 <= cfg.lambda_on_policy <= 1.0:
        problems.append(f"lambda_on_policy={cfg.lambda_on_policy} must be in [0, 1]")
    if cfg.grad_accum_steps < 1 or cfg.batch_size < 1 or cfg.max_steps < 0:
        problems.append("batch_size and grad_accum_steps must be >= 1 and max_steps >= 0")
    if cfg.max_seq_len < 2:
        problems.append(f"max_seq_len={cfg.max_seq_len} must be >= 2")
    if cfg.student_overrides and (cfg.student_init or not isinstance(cfg.student_overrides, dict)):
        problems.append(
            "student_overrides must be a mapping of LlamaConfig fields and applies to "
            "student_preset only; drop it when starting from student_init"
        )
    for key in ("param_dtype", "reduce_dtype"):
        try:
            dtype_named(getattr(cfg, key), key)
        except DistillError as exc:
            problems.append(str(exc))
    problems += check_adapter_config(cfg)
    if problems:
        raise DistillError("bad training config: " + "; ".join(problems))
