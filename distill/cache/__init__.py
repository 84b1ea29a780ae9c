"""Teacher cache: score a data set with the teacher once, train from its top-k many times.

``cache/index.json`` (teacher identity, tokenizer hash, k, data sha256, per-shard sha256) and
``shard-N.safetensors`` (ids int32 [R, k], logprobs float16 [R, k], tail float16 [R] = log of
the mass outside the top k, offsets int64 [n+1]). Example i (``moe2edge.distill.data.encode_rows``'
T ids) owns T - 1 rows; row t is the top-k for the token after token t (logits position t). Why
the tail is stored, the exact layout and the resume rules: docs/teacher-cache.md.

Modules: ``layout`` (the format's names and index reader), ``scorers`` (top-k from a local
model), ``write`` (``build_cache`` / ``write_cache``: resumable, atomic), ``read``
(``TeacherCache``) and ``cli`` (``moe2edge distill cache``).
"""

from moe2edge.distill.cache.cli import register_cache_command, run_cache
from moe2edge.distill.cache.layout import FORMAT_NAME, FORMAT_VERSION, INDEX_FILE, RESUME_KEYS
from moe2edge.distill.cache.read import TeacherCache
from moe2edge.distill.cache.scorers import Scorer, local_scorer, score_local, topk_logprobs
from moe2edge.distill.cache.write import (
    build_cache,
    encode_dataset,
    local_teacher_identity,
    write_cache,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "RESUME_KEYS",
    "Scorer",
    "TeacherCache",
    "build_cache",
    "encode_dataset",
    "local_scorer",
    "local_teacher_identity",
    "register_cache_command",
    "run_cache",
    "score_local",
    "topk_logprobs",
    "write_cache",
]
