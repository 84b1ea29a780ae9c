"""A BPE tokenizer trained with `tokenizers`, saved in Hugging Face format.

Teacher and student share it; the export copies its ``tokenizer.json`` into the bundle,
where the runtime reads it with `tokenizers` alone (no transformers on the device).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from moe2edge.distill.errors import DistillError
from moe2edge.distill.formats import (
    ASSISTANT_PREFIX,
    BOS,
    END_OF_TURN,
    PAD,
    SPECIAL_TOKENS,
    UNK,
    USER_PREFIX,
)
from moe2edge.fileio import sha256_file


def train_tokenizer(texts: list[str], out_dir: str | Path, vocab_size: int = 512) -> Path:
    """Train a byte-level BPE on ``texts`` and save it as an HF tokenizer directory."""
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=END_OF_TURN,
        pad_token=PAD,
        unk_token=UNK,
    )
    # The conversation format of moe2edge.distill.formats (the demo data's); export renders
    # it into the bundle's prompt template, so the runtime needs no Jinja.
    fast.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}"
        f"{USER_PREFIX} {{{{ m['content'] }}}} {ASSISTANT_PREFIX}"
        "{% else %} {{ m['content'] }}"
        f"{END_OF_TURN}"
        "{% endif %}{% endfor %}"
    )
    out_dir = Path(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise DistillError(
            f"no tokenizer.json in {path}; pass a Hugging Face tokenizer directory "
            "(for the demo, `moe2edge distill tokenizer` writes one)"
        )
    return PreTrainedTokenizerFast.from_pretrained(path)


# Every file Hugging Face reads into a tokenizer that can change text -> ids (vocabulary, special
# tokens and their BOS/EOS roles, added tokens, the chat template), in a fixed order.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def tokenizer_hash(tokenizer_dir: str | Path) -> str:
    """Fingerprint of everything in a tokenizer directory that changes tokenization.

    sha256 over (name, sha256) of each ``TOKENIZER_FILES`` entry present and of every
    ``additional_chat_templates/*.jinja``: a changed chat template in tokenizer_config.json or
    chat_template.jinja changes the ids of chat rows while tokenizer.json stays the same.
    Identifies the tokenizer in teacher caches.
    """
    root = Path(tokenizer_dir)
    extra = sorted(p.relative_to(root).as_posix() for p in root.glob("additional_chat_templates/*"))
    digest = hashlib.sha256()
    for name in (*TOKENIZER_FILES, *extra):
        if (root / name).is_file():
            digest.update(f"{name}\0{sha256_file(root / name)}\n".encode())
    return digest.hexdigest()


def check_vocab_matches(
    tokenizer: PreTrainedTokenizerFast, model_vocab_size: int, what: str
) -> None:
    """A tokenizer whose ids exceed the model's embedding table cannot be used with it."""
    if len(tokenizer) > model_vocab_size:
        raise DistillError(
            f"the tokenizer has {len(tokenizer)} tokens but the {what} has a vocabulary of "
            f"{model_vocab_size}: they do not belong together. Use the tokenizer saved with "
            f"the {what} (its checkpoint directory) or one trained for it."
        )
