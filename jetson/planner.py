"""Capacity planner: will a model fit a Jetson, how fast will it decode, at what energy?

Everything is arithmetic from the model's shape and the module's memory bus and GPU clocks
at a power mode; the two efficiency factors below are the only calibrated numbers.

Decode (batch 1) streams every weight once per token: time >= weight bytes / bandwidth.
It is also bounded by compute: a batch-1 GEMV uses at most 1/8 of the FP16 tensor-core
peak (the token pads the MMA tile's 8-wide side). The roofline is max of the two; the
estimate is a fixed ``step_overhead_ms`` plus the memory time divided by
``decode_bw_eff``, the share of peak bandwidth that decode reaches in practice (both fitted
on published AGX Orin figures, see ``moe2edge.jetson.published`` and docs/jetson.md). The
embedding table is read one row per token, so it is counted in memory but not in bytes per
token. Batches and speculative decoding: ``moe2edge.jetson.throughput``.

Prefill of N tokens: 2 FLOP per weight per token (+ attention) at the mode's FP16 peak
(SMs x 2048 FLOP/clk x GPU clock, ~10 TFLOPS at 30 W), divided by ``prefill_compute_eff``
(calibrated on TensorRT Edge-LLM's published 2048-token prefill times), and never faster
than reading the weights once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe2edge.jetson.errors import JetsonError

GB = 1e9  # decimal gigabytes throughout

# --- models ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int = 0  # 0: hidden // heads
    tie_embeddings: bool = False
    max_context: int = 4096
    # Mixture of experts (0 = dense). Attention is counted as standard GQA for every model.
    experts: int = 0
    experts_per_token: int = 0
    moe_intermediate: int = 0
    shared_experts: int = 0
    dense_layers: int = 0  # leading layers with a dense MLP (DeepSeek's first_k_dense_replace)

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def attn_params(self) -> int:
        q = self.heads * self.hd
        kv = self.kv_heads * self.hd
        return self.hidden * q + 2 * self.hidden * kv + q * self.hidden

    def mlp_params(self, active: bool) -> int:
        """Gated MLP (gate, up, down) summed over layers; active: the experts a token uses."""
        dense = 3 * self.hidden * self.intermediate
        if not self.experts:
            return self.layers * dense
        per_expert = 3 * self.hidden * self.moe_intermediate
        used = (self.experts_per_token if active else self.experts) + self.shared_experts
        moe_layers = self.layers - self.dense_layers
        return self.dense_layers * dense + moe_layers * (
            used * per_expert + self.hidden * self.experts
        )

    def body_params(self, active: bool = False) -> int:
        """Transformer blocks without embeddings and LM head (norms included)."""
        return self.layers * (self.attn_params + 2 * self.hidden) + self.mlp_params(active)

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        head = 0 if self.tie_embeddings else self.embed_params
        return self.body_params() + self.embed_params + head + self.hidden


PRESETS: dict[str, ModelShape] = {
    # moe2edge's student: Llama-like, GQA, DeepSeek-V3's tokenizer (129280). ~12.3B params.
    "dense-13b": ModelShape("dense-13b", 5120, 40, 40, 8, 14848, 129280, max_context=4096),
    "llama-2-7b": ModelShape("llama-2-7b", 4096, 32, 32, 32, 11008, 32000, max_context=4096),
    "llama-2-13b": ModelShape("llama-2-13b", 5120, 40, 40, 40, 13824, 32000, max_context=4096),
    "llama-3-8b": ModelShape("llama-3-8b", 4096, 32, 32, 8, 14336, 128256, max_context=8192),
    "qwen3-4b": ModelShape(
        "qwen3-4b",
        2560,
        36,
        32,
        8,
        9728,
        151936,
        head_dim=128,
        tie_embeddings=True,
        max_context=40960,
    ),
    "qwen3-8b": ModelShape(
        "qwen3-8b", 4096, 36, 32, 8, 12288, 151936, head_dim=128, max_context=40960
    ),
    # A draft for the 13B student (a planning assumption, not a trained model): Qwen3-0.6B's
    # shape with the student's vocabulary, so it can propose the student's tokens.
    "dense-draft-0.6b": ModelShape(
        "dense-draft-0.6b", 1024, 28, 16, 8, 3072, 129280, head_dim=128, tie_embeddings=True
    ),
    # MoE teachers, from their published config.json (attention counted as GQA: DeepSeek's
    # MLA has ~1.1B fewer attention weights and a far smaller KV cache than counted here).
    "deepseek-v3": ModelShape(
        "deepseek-v3",
        7168,
        61,
        128,
        128,
        18432,
        129280,
        experts=256,
        experts_per_token=8,
        moe_intermediate=2048,
        shared_experts=1,
        dense_layers=3,
        max_context=163840,
    ),  # fmt: skip
    "qwen3-30b-a3b": ModelShape(
        "qwen3-30b-a3b",
        2048,
        48,
        32,
        4,
        6144,
        151936,
        head_dim=128,
        experts=128,
        experts_per_token=8,
        moe_intermediate=768,
        max_context=40960,
    ),  # fmt: skip
}


def model_from_hf_config(cfg: dict[str, Any], name: str = "hf-config") -> ModelShape:
    """A ModelShape from a Hugging Face ``config.json`` (Llama, Qwen, Mistral, MoE kinds)."""
    try:
        hidden, layers = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        vocab = int(cfg["vocab_size"])
    except KeyError as exc:
        raise JetsonError(
            f"{name}: config.json lacks {exc}; is it a decoder-only LLM config?"
        ) from exc
    experts = int(
        cfg.get("n_routed_experts") or cfg.get("num_local_experts") or cfg.get("num_experts") or 0
    )
    return ModelShape(
        name=name,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        intermediate=int(cfg.get("intermediate_size") or 4 * hidden),
        vocab=vocab,
        head_dim=int(cfg.get("head_dim") or 0),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_context=int(cfg.get("max_position_embeddings") or 4096),
        experts=experts,
        experts_per_token=int(cfg.get("num_experts_per_tok") or 0) if experts else 0,
        moe_intermediate=int(cfg.get("moe_intermediate_size") or cfg.get("intermediate_size") or 0),
        shared_experts=int(cfg.get("n_shared_experts") or 0),
        dense_layers=int(cfg.get("first_k_dense_replace") or 0),
    )


def load_model(spec: str) -> ModelShape:
    """A preset name, or a path to an HF ``config.json`` (or the folder holding one)."""
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise JetsonError(
            f"unknown model {spec!r}: use a preset ({', '.join(PRESETS)}) or a path to an HF config.json"
        )
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise JetsonError(f"{path} is not valid JSON: {exc}") from exc
    return model_from_hf_config(cfg, name=path.parent.name or path.name)


# --- precisions -----------------------------------------------------------------------

# Bits per weight. INT4 adds an FP16 scale per block of ``group_size`` weights.
BASE_BITS = {"fp16": 16.0, "bf16": 16.0, "int8": 8.0, "int4": 4.0, "q6_k": 6.5625}


def bits_per_weight(precision: str, group_size: int = 128) -> float:
    if precision not in BASE_BITS:
        raise JetsonError(f"unknown precision {precision!r}; choose from {', '.join(BASE_BITS)}")
    bits = BASE_BITS[precision]
    if precision == "int4":
        bits += 16.0 / group_size
    return bits


# --- modules and power modes ----------------------------------------------------------


@dataclass(frozen=True)
class ModeSpec:
    name: str
    watts: float  # the mode's budget (MAXN: the module's maximum)
    cpu_cores: int
    cpu_mhz: float
    gpu_mhz: float
    gpu_tpcs: int
    emc_mhz: float  # memory clock; bandwidth = bus bytes x 2 x emc
    verified: bool = False  # True where the field notes give these clocks


@dataclass(frozen=True)
class ModuleSpec:
    key: str
    name: str
    memory_gb: float
    bus_bits: int
    total_tpcs: int
    modes: dict[str, ModeSpec] = field(default_factory=dict)

    def bandwidth_gbs(self, mode: ModeSpec) -> float:
        return self.bus_bits / 8 * 2 * mode.emc_mhz * 1e6 / GB


def _modes(*modes: ModeSpec) -> dict[str, ModeSpec]:
    return {m.name: m for m in modes}


MODULES: dict[str, ModuleSpec] = {
    "agx-orin-64gb": ModuleSpec(
        "agx-orin-64gb",
        "Jetson AGX Orin 64GB",
        64,
        256,
        8,
        _modes(
            ModeSpec("MAXN", 60, 12, 2201.6, 1300.5, 8, 3200, verified=True),
            ModeSpec("50W", 50, 12, 1497.6, 816, 8, 3200),
            ModeSpec("30W", 30, 8, 1728, 612, 4, 3200, verified=True),
            ModeSpec("15W", 15, 4, 1113.6, 408, 3, 2133, verified=True),
        ),
    ),
    "agx-orin-32gb": ModuleSpec(
        "agx-orin-32gb",
        "Jetson AGX Orin 32GB",
        32,
        256,
        7,
        _modes(
            ModeSpec("MAXN", 40, 8, 2188.8, 930, 7, 3200, verified=True),
            ModeSpec("30W", 30, 8, 1728, 612, 4, 3200, verified=True),
            ModeSpec("15W", 15, 4, 1113.6, 408, 3, 2133),
        ),
    ),
    "orin-nx-16gb": ModuleSpec(
        "orin-nx-16gb",
        "Jetson Orin NX 16GB",
        16,
        128,
        4,
        _modes(
            ModeSpec("MAXN", 25, 8, 1984, 918, 4, 3200),
            ModeSpec("25W", 25, 8, 1497.6, 765, 4, 3200),
            ModeSpec("15W", 15, 4, 1497.6, 612, 4, 3200),
            ModeSpec("10W", 10, 4, 1190.4, 612, 2, 2133),
        ),
    ),
}
MODULE_ALIASES = {"agx-orin": "agx-orin-64gb", "orin-nx": "orin-nx-16gb"}


def find_module(key: str) -> ModuleSpec:
    key = MODULE_ALIASES.get(key.lower(), key.lower())
    if key not in MODULES:
        raise JetsonError(f"unknown module {key!r}; choose from {', '.join(MODULES)}")
    return MODULES[key]


def find_mode_spec(module: ModuleSpec, mode: str) -> ModeSpec:
    s = mode.strip().upper().removeprefix("MODE_")
    if re.fullmatch(r"\d+(\.\d+)?", s):
        s += "W"
    if s in module.modes:
        return module.modes[s]
    raise JetsonError(f"{module.name} has no mode {mode!r}; modes: {', '.join(module.modes)}")


def mode_from_conf(module: ModuleSpec, conf_mode: Any) -> ModeSpec:
    """A ModeSpec from an nvpmodel.conf mode (``power_modes.PowerMode``): the device's truth."""
    top = module.modes.get("MAXN") or next(iter(module.modes.values()))
    return ModeSpec(
        name=conf_mode.name.removeprefix("MODE_"),
        watts=conf_mode.watts or top.watts,
        cpu_cores=conf_mode.cpu_online or top.cpu_cores,
        cpu_mhz=conf_mode.cpu_max_khz / 1000 if conf_mode.cpu_max_khz else top.cpu_mhz,
        gpu_mhz=conf_mode.gpu_max_hz / 1e6 if conf_mode.gpu_max_hz else top.gpu_mhz,
        gpu_tpcs=conf_mode.gpu_tpcs(module.total_tpcs),
        emc_mhz=conf_mode.emc_max_hz / 1e6 if conf_mode.emc_max_hz else top.emc_mhz,
        verified=True,
    )


# --- runtimes (the calibrated part) -----------------------------------------------------

# A decode step takes step_overhead_ms (kernel launches, sampling, the host loop: what makes
# small models slower than their bytes say) plus the bytes it reads at decode_bw_eff of the
# roofline bandwidth. Fitted on every published AGX Orin case by
# ``moe2edge.jetson.published.fit_decode`` (one overhead for all runtimes, one bandwidth share
# for the GPU runtimes and one for llama.cpp); the out-of-sample check refits without the case
# it predicts. llama.cpp's prefill factor is a guess (no published figure here). Prefill:
# TensorRT Edge-LLM's 2048-token prefill of Qwen3-4B and -8B both come out at 0.50 of the
# FP16 peak.
RUNTIMES: dict[str, dict[str, float]] = {
    "tensorrt": {"decode_bw_eff": 0.876, "step_overhead_ms": 3.06, "prefill_compute_eff": 0.50},
    "mlc": {"decode_bw_eff": 0.876, "step_overhead_ms": 3.06, "prefill_compute_eff": 0.50},
    "llama.cpp": {"decode_bw_eff": 0.484, "step_overhead_ms": 3.06, "prefill_compute_eff": 0.25},
}
FP16_FLOP_PER_CLK_PER_SM = 2048  # Ampere (GA10B) tensor cores, dense FP16
SMS_PER_TPC = 2
GEMV_TENSOR_SHARE = 1 / 8  # batch-1: one of the 8 columns of an m16n8k16 tile is used
SM_LOAD_BYTES_PER_CLK = 64  # L2 -> SM per SM per clock: the SM side of bandwidth
RUNTIME_OVERHEAD_GB = 1.5  # CUDA context, TensorRT runtime, activations, workspace
SYSTEM_RESERVE_GB = 2.5  # L4T, the service and carve-outs (headless; a desktop needs more)
BUILD_MEMORY_FACTOR = 3.0  # engine builds take ~3x the weights (field notes: "several times")
TTS_FIRST_CHUNK_MS = 30.0  # espeak-ng: ~10 ms a sentence on x86, ~3x on the A78AE cores
ASR_FINAL_MS = 10.0  # pocketsphinx's final result after the end of a streamed utterance


@dataclass
class PlanInputs:
    model: ModelShape
    module: ModuleSpec
    mode: ModeSpec
    precision: str = "int4"
    group_size: int = 128
    lm_head_precision: str | None = None  # None: FP16 for quantized weights (TensorRT/ModelOpt)
    runtime: str = "tensorrt"
    context: int = 4096
    batch: int = 1
    prompt_tokens: int = 64
    voice_tokens: int = 16
    decode_at: int = 256  # context length at which a decode step is costed
    kv_precision: str = "fp16"


def plan(inp: PlanInputs) -> dict[str, Any]:
    """All figures for one configuration (see the module docstring for the model)."""
    m, mod, mode = inp.model, inp.module, inp.mode
    if inp.runtime not in RUNTIMES:
        raise JetsonError(f"unknown runtime {inp.runtime!r}; choose from {', '.join(RUNTIMES)}")
    eff = RUNTIMES[inp.runtime]
    head_prec = inp.lm_head_precision or (
        "fp16" if inp.precision in ("int4", "int8") else inp.precision
    )
    body_b = bits_per_weight(inp.precision, inp.group_size) / 8
    head_b = bits_per_weight(head_prec, inp.group_size) / 8
    kv_b = BASE_BITS[inp.kv_precision] / 8

    head_params = m.embed_params  # the LM head (shared with the embedding when tied)
    weights = m.body_params() * body_b + m.embed_params * (head_b if m.tie_embeddings else 2.0)
    if not m.tie_embeddings:
        weights += head_params * head_b
    kv_per_token = 2 * m.layers * m.kv_heads * m.hd * kv_b
    kv_cache = kv_per_token * inp.context * inp.batch
    usable = mod.memory_gb * GB - SYSTEM_RESERVE_GB * GB
    needed = weights + kv_cache + RUNTIME_OVERHEAD_GB * GB

    bw = mod.bandwidth_gbs(mode) * GB
    sms = mode.gpu_tpcs * SMS_PER_TPC
    sm_bw = sms * mode.gpu_mhz * 1e6 * SM_LOAD_BYTES_PER_CLK
    eff_bw = min(bw, sm_bw)
    peak_flops = sms * FP16_FLOP_PER_CLK_PER_SM * mode.gpu_mhz * 1e6

    # decode, batch 1
    streamed_params = m.body_params(active=True) + head_params
    step_bytes = (
        m.body_params(active=True) * body_b + head_params * head_b + kv_per_token * inp.decode_at
    )
    t_mem = step_bytes / eff_bw
    t_cmp = 2 * streamed_params / (peak_flops * GEMV_TENSOR_SHARE)
    decode_roof_s = max(t_mem, t_cmp)
    overhead_s = eff["step_overhead_ms"] / 1e3
    decode_s = max(overhead_s + t_mem / eff["decode_bw_eff"], t_cmp / eff["prefill_compute_eff"])

    def prefill_s(n: int, calibrated: bool = True) -> float:
        attn = 4 * m.layers * m.heads * m.hd * n * (n / 2)
        flops = 2 * n * m.body_params(active=True) + attn + 2 * head_params
        t_c, t_m = flops / peak_flops, (m.body_params() * body_b + head_params * head_b) / eff_bw
        if not calibrated:
            return max(t_c, t_m)
        return max(t_c / eff["prefill_compute_eff"], t_m / eff["decode_bw_eff"])

    decode_tok_s = 1 / decode_s
    voice_prefill = prefill_s(inp.voice_tokens)
    return {
        "model": m.name,
        "params_b": m.total_params / 1e9,
        "params_read_per_token_b": (m.body_params(active=True) + m.embed_params) / 1e9,
        "module": mod.key,
        "mode": mode.name,
        "mode_watts": mode.watts,
        "mode_clocks_verified": mode.verified,
        "precision": inp.precision,
        "group_size": inp.group_size if inp.precision == "int4" else None,
        "lm_head_precision": head_prec,
        "runtime": inp.runtime,
        "context": inp.context,
        "batch": inp.batch,
        "weights_gb": weights / GB,
        "kv_cache_gb": kv_cache / GB,
        "overhead_gb": RUNTIME_OVERHEAD_GB,
        "usable_gb": usable / GB,
        "fits": needed <= usable,
        "headroom_gb": (usable - needed) / GB,
        "build_memory_gb": weights * BUILD_MEMORY_FACTOR / GB,
        "build_fits": weights * BUILD_MEMORY_FACTOR <= usable,
        "bandwidth_gbs": bw / GB,
        "sm_bandwidth_gbs": sm_bw / GB,
        "fp16_tflops": peak_flops / 1e12,
        "bytes_per_token_gb": step_bytes / GB,
        "decode_bound": "memory" if t_mem >= t_cmp else "compute",
        "decode_tok_s_roofline": 1 / decode_roof_s,
        "decode_memory_ms": t_mem * 1e3,  # the step's bytes at the roofline bandwidth
        "step": {  # what moe2edge.jetson.throughput needs for batches and speculation
            "weight_bytes": step_bytes - kv_per_token * inp.decode_at,
            "kv_bytes_per_row": kv_per_token * inp.decode_at,
            "kv_cache_bytes_per_row": kv_per_token * inp.context,
            "flops_per_token": 2 * streamed_params,
            "bandwidth": eff_bw,
            "peak_flops": peak_flops,
            "free_bytes": usable - weights - RUNTIME_OVERHEAD_GB * GB,
        },
        "decode_tok_s": decode_tok_s,
        "decode_ms": decode_s * 1e3,
        "prompt_tokens": inp.prompt_tokens,
        "ttft_ms_bound": prefill_s(inp.prompt_tokens, calibrated=False) * 1e3,
        "ttft_ms": prefill_s(inp.prompt_tokens) * 1e3,
        "energy_j_per_token": mode.watts / decode_tok_s,
        "voice_tokens": inp.voice_tokens,
        "voice_reply_ms": (voice_prefill + decode_s) * 1e3 + TTS_FIRST_CHUNK_MS + ASR_FINAL_MS,
        "voice_breakdown_ms": {
            "asr_final": ASR_FINAL_MS,
            "prefill": voice_prefill * 1e3,
            "first_token": decode_s * 1e3,
            "tts_first_chunk": TTS_FIRST_CHUNK_MS,
        },
        "efficiency": dict(eff),
    }


def make_inputs(
    model: str,
    module: str = "agx-orin-64gb",
    mode: str = "30W",
    conf_mode: Any = None,
    **kwargs: Any,
) -> PlanInputs:
    mod = find_module(module)
    spec = mode_from_conf(mod, conf_mode) if conf_mode is not None else find_mode_spec(mod, mode)
    return PlanInputs(model=load_model(model), module=mod, mode=spec, **kwargs)


def format_plan(p: dict[str, Any]) -> str:
    fit = "yes" if p["fits"] else "NO"
    b = p["voice_breakdown_ms"]
    lines = [
        f"{p['model']} ({p['params_b']:.2f}B params) at {p['precision'].upper()}"
        f"{' g' + str(p['group_size']) if p['group_size'] else ''} (LM head {p['lm_head_precision']}), "
        f"{p['module']} in mode {p['mode']} ({p['mode_watts']:.0f} W), runtime {p['runtime']}",
        f"  memory: weights {p['weights_gb']:.2f} GB + KV cache {p['kv_cache_gb']:.2f} GB "
        f"(context {p['context']}, batch {p['batch']}) + runtime {p['overhead_gb']:.1f} GB "
        f"of {p['usable_gb']:.1f} GB usable -> fits: {fit} (headroom {p['headroom_gb']:.1f} GB)",
        f"  engine build needs ~{p['build_memory_gb']:.1f} GB -> {'ok' if p['build_fits'] else 'add swap or build elsewhere'}",
        f"  clocks: {p['bandwidth_gbs']:.1f} GB/s memory, {p['fp16_tflops']:.1f} TFLOPS FP16"
        f"{'' if p['mode_clocks_verified'] else ' (mode clocks not verified: pass --nvpmodel-conf on the device)'}",
        f"  decode: {p['decode_tok_s']:.1f} tok/s estimated ({p['decode_tok_s_roofline']:.1f} tok/s roofline, "
        f"{p['decode_bound']}-bound, {p['bytes_per_token_gb']:.2f} GB read per token)",
        f"  time to first token ({p['prompt_tokens']} prompt tokens): {p['ttft_ms']:.0f} ms "
        f"(bound {p['ttft_ms_bound']:.0f} ms)",
        f"  energy: {p['energy_j_per_token']:.2f} J/token at the mode's {p['mode_watts']:.0f} W (upper bound)",
        f"  voice reply ({p['voice_tokens']} tokens after end of speech): {p['voice_reply_ms']:.0f} ms = "
        f"ASR final {b['asr_final']:.0f} + prefill {b['prefill']:.0f} + first token {b['first_token']:.0f} "
        f"+ TTS first chunk {b['tts_first_chunk']:.0f}",
    ]
    return "\n".join(lines)
