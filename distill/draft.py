"""``moe2edge distill draft``: a small draft model for speculative decoding of a student.

The draft is distilled from the same teacher (or teacher cache) as the student it drafts for,
by the same loop (``train.distill_student``), from the ``draft`` student preset (one layer)
or ``student_overrides``. It must share the student's vocabulary and tokenizer: a drafted
token id means the same token to both. Its checkpoint ``run_dir/draft`` holds
``draft.json`` (``DRAFT_META``), naming the student it drafts for:

    {"format": "moe2edge.draft", "format_version": 1,
     "draft_for": {"student_dir": "/abs/student", "weights_sha256": "...", "vocab_size": N}}

``moe2edge export onnx DRAFT_DIR BUNDLE --draft-for TARGET_BUNDLE`` carries it into the
bundle manifest. ``acceptance_rate`` measures how often the student accepts the drafts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from moe2edge.distill.errors import DistillError
from moe2edge.distill.train import TrainConfig, check_config, distill_student
from moe2edge.fileio import atomic_write_json, sha256_file

DRAFT_META = "draft.json"


@dataclass
class DraftConfig(TrainConfig):
    """``TrainConfig`` plus the student the draft is for (``draft_for``)."""

    run_dir: str = "runs/draft"
    student_preset: str = "draft"
    draft_for: str = ""  # the target student's HF checkpoint directory (required)


def weights_sha256(model_dir: str | Path) -> str:
    """sha256 of a checkpoint's weights: of ``model.safetensors``, or, for a sharded one, of
    the sorted ``name sha256`` lines of its ``*.safetensors`` files."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise DistillError(f"{model_dir} holds no *.safetensors weights")
    if len(files) == 1:
        return sha256_file(files[0])
    lines = "".join(f"{p.name} {sha256_file(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def check_target(cfg: DraftConfig) -> dict:
    """The target student's facts for ``draft.json``; refuses another vocabulary."""
    from transformers import AutoConfig, AutoTokenizer

    if not cfg.draft_for:
        raise DistillError("draft_for=DIR is required: the student checkpoint this draft is for")
    target = Path(cfg.draft_for)
    if not (target / "config.json").is_file():
        raise DistillError(f"draft_for={target} is not an HF checkpoint directory")
    try:
        vocab = AutoConfig.from_pretrained(target, local_files_only=True).vocab_size
        ours = AutoTokenizer.from_pretrained(cfg.tokenizer, local_files_only=True)
        theirs = AutoTokenizer.from_pretrained(target, local_files_only=True)
    except (OSError, ValueError) as exc:
        msg = f"cannot read the tokenizers of {cfg.tokenizer} and {target}: {exc}"
        raise DistillError(msg) from exc
    if ours.get_vocab() != theirs.get_vocab():
        raise DistillError(
            f"tokenizer {cfg.tokenizer} differs from the one of draft_for={target}; a draft "
            "must use the target's tokenizer (set tokenizer to the student's)"
        )
    return {
        "student_dir": str(target.resolve()),
        "weights_sha256": weights_sha256(target),
        "vocab_size": int(vocab),
    }


def train_draft(cfg: DraftConfig) -> Path:
    """Distil the draft; writes ``run_dir/draft`` with ``draft.json``."""
    check_config(cfg, has_teacher=cfg.teacher is not None)
    target = check_target(cfg)
    out = distill_student(cfg, out_name="draft")
    if out.joinpath("config.json").is_file():  # rank 0 wrote it
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(out, local_files_only=True).vocab_size
        if vocab != target["vocab_size"]:
            raise DistillError(f"draft vocabulary {vocab} != target's {target['vocab_size']}")
        meta = {"format": "moe2edge.draft", "format_version": 1, "draft_for": target}
        atomic_write_json(out / DRAFT_META, meta)
    return out


@torch.no_grad()
def _greedy_next(model, ids: list[int], count: int) -> list[int]:
    """``count`` greedy tokens after ``ids`` (no KV cache: drafts are a few tokens)."""
    out = list(ids)
    for _ in range(count):
        logits = model(input_ids=torch.tensor([out]), use_cache=False).logits
        out.append(int(logits[0, -1].argmax()))
    return out[len(ids) :]


@torch.no_grad()
def acceptance_rate(
    target,
    draft,
    prompts: Sequence[Sequence[int]],
    draft_tokens: int = 4,
    max_new_tokens: int = 32,
    eos_token_ids: Sequence[int] = (),
) -> float:
    """The share of drafted tokens the target accepts under greedy speculative decoding.

    For each prompt (token ids): the draft proposes ``draft_tokens`` greedy tokens, the
    target scores prompt + proposals in one forward pass and accepts the longest prefix that
    equals its own greedy choices, then appends its own next token (the correction, or a bonus
    token after a fully accepted draft); until ``max_new_tokens`` or an ``eos_token_ids``
    token. The output equals the target's greedy decoding; the rate is accepted / drafted.
    """
    if draft_tokens < 1:
        raise DistillError(f"draft_tokens={draft_tokens} must be >= 1")
    target.eval()
    draft.eval()
    accepted = drafted = 0
    for prompt in prompts:
        seq, new = list(prompt), 0
        while new < max_new_tokens:
            k = min(draft_tokens, max_new_tokens - new)
            proposal = _greedy_next(draft, seq, k)
            logits = target(input_ids=torch.tensor([seq + proposal]), use_cache=False).logits
            choices = logits[0, len(seq) - 1 :].argmax(-1).tolist()  # k + 1 greedy choices
            n = 0
            while n < k and proposal[n] == choices[n]:
                n += 1
            accepted, drafted = accepted + n, drafted + k
            step = proposal[:n] + [choices[n]]
            seq += step
            new += len(step)
            if any(t in eos_token_ids for t in step):
                break
    return accepted / drafted if drafted else 0.0
