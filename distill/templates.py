"""Stand-ins for the tokenizers of the chat-model families moe2edge distils from, built locally.

Nothing can be downloaded here, so tests and benchmarks build them: a small byte-level BPE
trained on a few hundred sentences, with the family's special tokens where the published
vocabulary has them (start or end), its pre-tokenizer split pattern, its BOS/EOS/pad
settings, and its published chat template (``distill/chat_templates/*.jinja``) in
``tokenizer_config.json``, where the published checkpoints keep it:

- ``qwen2.5``: ChatML (``<|im_start|>role\\ncontent<|im_end|>\\n``, a default system turn),
  no BOS, eos ``<|endoftext|>`` (the base model's) and pad ``<|endoftext|>``;
- ``llama-3``: the template writes ``<|begin_of_text|>``, ``<|eot_id|>`` ends a turn, eos
  ``<|end_of_text|>``, no pad token;
- ``deepseek-v3``: ``<｜begin▁of▁sentence｜>`` (id 0) in the template, ``<｜User｜>`` /
  ``<｜Assistant｜>`` markers (plain added tokens), ``<｜end▁of▁sentence｜>`` (id 1) after
  every assistant turn, ``<｜▁pad▁｜>`` at id 2.

Only the vocabulary is small: the special tokens, templates and BOS/EOS/pad roles are the
families', which is what chat encoding, special ids and serving depend on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

from moe2edge.distill.errors import DistillError

TEMPLATE_DIR = Path(__file__).with_name("chat_templates")

# The families' pre-tokenizer split patterns (their tokenizer.json's Split regex).
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK_SPLIT = (
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class Family:
    template: str  # file name in chat_templates/
    leading: tuple[str, ...]  # special tokens at the start of the vocabulary (ids 0, 1, ...)
    trailing: tuple[str, ...]  # special tokens after the learnt vocabulary
    markers: tuple[str, ...]  # added tokens that are not special (DeepSeek's role markers)
    bos: str | None
    eos: str
    pad: str | None
    splits: tuple[str, ...]  # pre-tokenizer Split patterns, in order
    bos_post_processor: bool  # tokenizer.json adds BOS when asked for special tokens


FAMILIES: dict[str, Family] = {
    "qwen2.5": Family(
        template="qwen2.5.jinja",
        leading=(),
        trailing=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        markers=(),
        bos=None,
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        splits=(_QWEN_SPLIT,),
        bos_post_processor=False,
    ),
    "llama-3": Family(
        template="llama-3.jinja",
        leading=(),
        trailing=(
            "<|begin_of_text|>",
            "<|end_of_text|>",
            *(f"<|reserved_special_token_{i}|>" for i in range(4)),
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|reserved_special_token_4|>",
            "<|eot_id|>",
        ),
        markers=(),
        bos="<|begin_of_text|>",
        eos="<|end_of_text|>",
        pad=None,
        splits=(_LLAMA3_SPLIT,),
        bos_post_processor=True,
    ),
    "deepseek-v3": Family(
        template="deepseek-v3.jinja",
        leading=("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"),
        trailing=(),
        markers=("<｜User｜>", "<｜Assistant｜>"),
        bos="<｜begin▁of▁sentence｜>",
        eos="<｜end▁of▁sentence｜>",
        pad="<｜end▁of▁sentence｜>",
        splits=(r"\p{N}{1,3}", _DEEPSEEK_SPLIT),
        bos_post_processor=True,
    ),
}


def chat_template(family: str) -> str:
    """The family's published chat template (Jinja source)."""
    return (TEMPLATE_DIR / _family(family).template).read_text(encoding="utf-8").rstrip("\n")


def corpus() -> list[str]:
    """A few hundred sentences to train the stand-in vocabularies on (the demo's commands and
    replies, and the role words and system prompts the templates write)."""
    from moe2edge.distill.demo_data import generate_dataset

    train, _ = generate_dataset(seed=0, train_size=300, eval_size=0)
    texts = [f"{row['utterance']}\n{row['reply']}" for row in train]
    texts += [
        "system user assistant",
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        "You are a helpful home assistant. Answer briefly.",
        "Cutting Knowledge Date: December 2023",
    ]
    return texts


def _family(name: str) -> Family:
    if name not in FAMILIES:
        raise DistillError(f"unknown tokenizer family {name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def build_family_tokenizer(
    family: str, out_dir: str | Path, texts: list[str] | None = None, vocab_size: int = 512
) -> Path:
    """Train the stand-in tokenizer of ``family`` and save it as an HF tokenizer directory."""
    spec = _family(family)
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    if family == "qwen2.5":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in spec.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(spec.leading),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts or corpus(), trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in spec.trailing])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.markers])
    if spec.bos_post_processor:
        bos_id = tokenizer.token_to_id(spec.bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A",
            pair=f"{spec.bos} $A {spec.bos} $B",
            special_tokens=[(spec.bos, bos_id)],
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=spec.bos, eos_token=spec.eos, pad_token=spec.pad
    )
    out_dir = Path(out_dir)
    fast.save_pretrained(out_dir)
    # As the published checkpoints ship it: the template in tokenizer_config.json.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] = chat_template(family)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)
    return out_dir
