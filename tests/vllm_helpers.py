"""A real vLLM server (the CPU build, in its own virtualenv) as the teacher of `distill cache`.

Shared by the opt-in test (tests/test_vllm_teacher.py) and bench/served_teacher.py.
vLLM pins its own torch and transformers, so it never shares our venv: point
MOE2EDGE_VLLM_PYTHON at that venv's python (`make vllm-venv` builds one in .vllm-venv).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

VLLM_PYTHON_ENV = "MOE2EDGE_VLLM_PYTHON"


def vllm_python() -> str | None:
    """The vLLM venv's python, from MOE2EDGE_VLLM_PYTHON, if it exists."""
    path = os.environ.get(VLLM_PYTHON_ENV)
    return path if path and Path(path).is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tiny_teacher(
    out: Path, tokenizer_dir: Path, family: str = "llama", seed: int = 0
) -> Path:
    """A random tiny checkpoint that vLLM's CPU attention accepts (head_dim 64)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DeepseekV3Config, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = dict(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    common = dict(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        max_position_embeddings=512,
        **ids,
    )
    if family == "llama":
        config = LlamaConfig(num_attention_heads=2, num_key_value_heads=1, **common)
    elif family == "deepseek_v3":  # MLA + routed and shared experts, as DeepSeek-V3
        config = DeepseekV3Config(
            num_attention_heads=2,
            num_key_value_heads=2,
            moe_intermediate_size=64,
            first_k_dense_replace=1,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            kv_lora_rank=512,  # vLLM's CPU MLA takes head sizes 320/512/576 (512 + 64 rope)
            q_lora_rank=None,
            topk_method="noaux_tc",  # as DeepSeek-V3 ships it (vLLM loads the score bias then)
            scoring_func="sigmoid",
            qk_nope_head_dim=64,
            qk_rope_head_dim=64,
            v_head_dim=64,
            **common,
        )
    else:
        raise ValueError(f"unknown family {family}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def served_dtype(family: str) -> str:
    """vLLM's CPU MoE kernels take bf16 weights only ("expect weight to be bfloat16 ...")."""
    return "bfloat16" if family == "deepseek_v3" else "float32"


@contextmanager
def vllm_server(
    model_dir: Path,
    python: str,
    dtype: str = "float32",
    max_logprobs: int = 32,
    startup_s: float = 600.0,
    log_path: Path | None = None,
) -> Iterator[str]:
    """`python -m vllm.entrypoints.openai.api_server` on 127.0.0.1; yields its base URL."""
    port = free_port()
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("PYTHONPATH", None)  # our checkout must not shadow vLLM's own packages
    cmd = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-logprobs",
        str(max_logprobs),
        "--max-model-len",
        "512",
        "--enforce-eager",
    ]
    log = open(log_path or os.devnull, "wb")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {proc.returncode} (log: {log_path})")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"vLLM did not answer /health in {startup_s:.0f} s")
            time.sleep(2)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()
