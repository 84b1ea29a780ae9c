"""Opt-in: a real vLLM (CPU build, own virtualenv) serves the teacher for `distill cache`.

Runs only where MOE2EDGE_VLLM_PYTHON names that venv's python (`make vllm-venv`); it is
not part of `make test` (vLLM starts in minutes and pins its own torch). The cache it
writes must equal the one our local teacher path writes for the same checkpoint.
"""

from __future__ import annotations

import numpy as np
import pytest

from moe2edge.distill.cache import TeacherCache, build_cache
from moe2edge.distill.demo_data import write_jsonl
from moe2edge.rows import read_rows
from tests.vllm_helpers import (
    VLLM_PYTHON_ENV,
    build_tiny_teacher,
    served_dtype,
    vllm_python,
    vllm_server,
)

pytestmark = pytest.mark.skipif(
    vllm_python() is None, reason=f"opt-in: set {VLLM_PYTHON_ENV} to a vLLM venv's python"
)
K = 16


@pytest.mark.parametrize("family", ["llama", "deepseek_v3"])
def test_vllm_cache_equals_local_teacher(tiny_run, tmp_path, family):
    teacher = build_tiny_teacher(tmp_path / "teacher", tiny_run["tokenizer"], family)
    data = tmp_path / "data.jsonl"
    write_jsonl(read_rows(tiny_run["train"])[:16], data)
    common = dict(data=data, tokenizer=tiny_run["tokenizer"], k=K, max_seq_len=48, shard_examples=8)
    build_cache(out=tmp_path / "local", teacher=teacher, batch_size=1, **common)
    dtype = served_dtype(family)
    with vllm_server(teacher, vllm_python(), dtype, log_path=tmp_path / "vllm.log") as url:
        index = build_cache(out=tmp_path / "vllm", server=url, api="vllm", concurrency=4, **common)
    assert index["complete"] and index["teacher"]["api"] == "vllm"
    local = TeacherCache(tmp_path / "local", tokenizer_dir=tiny_run["tokenizer"])
    served = TeacherCache(tmp_path / "vllm", tokenizer_dir=tiny_run["tokenizer"])
    assert len(local) == len(served) == 16
    agree, worst = [], 0.0
    for i in range(len(local)):
        (ids_a, lps_a), (ids_b, lps_b) = local.topk(i)[:2], served.topk(i)[:2]
        assert ids_a.shape == ids_b.shape
        agree.append(float((ids_a[:, 0] == ids_b[:, 0]).float().mean()))  # the top-1 token
        worst = max(worst, float((lps_a[:, 0].double() - lps_b[:, 0].double()).abs().max()))
    # Same weights; in fp32 the arithmetic differs only in kernel order, in bf16 (MoE on
    # vLLM's CPU kernels) by the rounding of weights and activations.
    assert np.mean(agree) >= (0.99 if dtype == "float32" else 0.95), agree
    assert worst < (1e-2 if dtype == "float32" else 0.1), worst
