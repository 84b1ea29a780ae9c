"""A BPE tokenizer trained with `tokenizers`, saved in Hugging Face format; any tokenizer
made ready for chat training, and its special ids.

Teacher and student share it; the export copies its ``tokenizer.json`` into the bundle,
where the runtime reads it with `tokenizers` alone (no transformers on the device).
``load_tokenizer`` makes eos the chat template's end of turn and gives it a pad token
(``chat_ready``); ``special_token_ids`` are the ids the student's config gets.
"""

from __future__ import annotations

import hashlib
import logging
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

log = logging.getLogger(__name__)


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
    """A tokenizer directory, ready for chat training (``chat_ready``)."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise DistillError(
            f"no tokenizer.json in {path}; pass a Hugging Face tokenizer directory "
            "(for the demo, `moe2edge distill tokenizer` writes one)"
        )
    return chat_ready(PreTrainedTokenizerFast.from_pretrained(path))


# --- special tokens -------------------------------------------------------------------------

_PROBE = "MOE2EDGEREPLY"


def end_of_turn_token(tokenizer) -> str | None:
    """The special token the chat template writes right after an assistant turn's text
    (``<|im_end|>``, ``<|eot_id|>``, ``<｜end▁of▁sentence｜>``, the demo's ``<|end|>``); None
    without a template or when it writes none."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception as exc:  # jinja2 errors of all kinds; chat rows will name the problem
        log.warning("the chat template cannot render a user + assistant exchange: %s", exc)
        return None
    if _PROBE not in text:
        return None
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for token_id in tokenizer.encode(text.split(_PROBE, 1)[1], add_special_tokens=False):
        if token_id in special:
            return tokenizer.convert_ids_to_tokens(token_id)
    return None


def chat_ready(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Make ``eos`` the token that ends a reply and give the tokenizer a pad token.

    eos becomes the chat template's end of turn where they differ (Qwen's base eos
    ``<|endoftext|>`` -> ``<|im_end|>``, Llama-3's ``<|end_of_text|>`` -> ``<|eot_id|>``), as
    the families' chat checkpoints ship it: every reply learnt ends with it and generation
    stops on it. The tokenizer's own eos stays a stop token (``stop_token_ids``). A tokenizer
    without a pad token (Llama-3) pads with eos: padded positions are never attended to nor
    learnt, so any id would do.
    """
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    end = end_of_turn_token(tokenizer)
    if end is not None and end != tokenizer.eos_token:
        log.info("eos %s -> the chat template's end of turn %s", tokenizer.eos_token, end)
        tokenizer.eos_token = end
    if tokenizer.eos_token_id is None:
        raise DistillError(
            "the tokenizer has no eos token and its chat template ends no turn with a special "
            "token; set eos_token in tokenizer_config.json"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.stop_token_ids = list(dict.fromkeys([tokenizer.eos_token_id, *stops]))
    return tokenizer


def special_token_ids(tokenizer) -> dict[str, int | list[int] | None]:
    """The model-config fields of the tokenizer's special tokens (``LlamaConfig``,
    ``generation_config.json``): bos (None when it has none), eos (the end of turn first,
    then the tokenizer's own eos, a list when they differ) and pad."""
    if not hasattr(tokenizer, "stop_token_ids"):
        tokenizer = chat_ready(tokenizer)
    stops = list(tokenizer.stop_token_ids)
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": stops[0] if len(stops) == 1 else stops,
        "pad_token_id": tokenizer.pad_token_id,
    }


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


def apply_special_ids(model, tokenizer) -> None:
    """Give ``model``'s config and generation config the tokenizer's special ids
    (``special_token_ids``): saved in config.json and generation_config.json, they are what
    generation stops on and what the export records as the bundle's end tokens."""
    ids = special_token_ids(tokenizer)
    model.config.update(ids)
    if getattr(model, "generation_config", None) is not None:
        for key, value in ids.items():
            setattr(model.generation_config, key, value)
