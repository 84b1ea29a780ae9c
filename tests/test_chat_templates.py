"""Real chat templates (Qwen2.5's ChatML, Llama-3's, DeepSeek-V3's) from training to serving:
training ids are the ids the runtime and the server render for the same conversation, every
assistant turn and nothing else is learnt, BOS once (or never), special ids and the saved
generation config from the tokenizer. Each family: a stand-in tokenizer (distill/templates.py)
-> a tiny student trained two steps -> an FP32 bundle -> the runtime."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import openai
import pytest

from moe2edge.distill.data import IGNORE_INDEX, encode_chat, encode_prompt, encode_rows
from moe2edge.distill.student import build_student
from moe2edge.distill.templates import build_family_tokenizer, chat_template
from moe2edge.distill.tokenizer import load_tokenizer, special_token_ids
from moe2edge.distill.train import TrainConfig, train_model
from moe2edge.export.calibration import PromptEncoder
from moe2edge.export.onnx_export import export_fp32
from moe2edge.runtime import Generator, render_chat
from moe2edge.runtime.generate import GenerationResult
from moe2edge.runtime.sampling import SamplingParams
from moe2edge.runtime.server import ServerConfig, create_app
from moe2edge.runtime.server.openai_api import ChatMessage, chat_prompt
from tests.server_helpers import ServerThread

CHATS = [
    [
        {"role": "system", "content": "You are a helpful home assistant."},
        {"role": "user", "content": "turn on the kitchen lights"},
        {"role": "assistant", "content": "[lights.on room=kitchen] the kitchen lights are on."},
        {"role": "user", "content": "and dim the office lights to forty percent"},
        {"role": "assistant", "content": "[lights.dim room=office value=40] dimmed."},
    ],
    [
        {"role": "user", "content": "lock the garage door"},
        {"role": "assistant", "content": "[door.lock room=garage] locked."},
    ],
]
# family -> (end of turn, the tokenizer's own eos, bos, pad)
SPECIALS = {
    "qwen2.5": ("<|im_end|>", "<|endoftext|>", None, "<|endoftext|>"),
    "llama-3": ("<|eot_id|>", "<|end_of_text|>", "<|begin_of_text|>", "<|eot_id|>"),  # no pad
    "deepseek-v3": ("<｜end▁of▁sentence｜>",) * 2
    + ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
}


@pytest.fixture(scope="module", params=sorted(SPECIALS))
def family(request, tmp_path_factory) -> SimpleNamespace:
    """tokenizer -> tiny student trained 2 steps on chats (with evaluation) -> FP32 bundle."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp(request.param)
    tokenizer_dir = build_family_tokenizer(request.param, root / "tokenizer")
    tokenizer = load_tokenizer(tokenizer_dir)
    rows = [{"messages": chat, "action": chat[-1]["content"].split("]")[0] + "]"} for chat in CHATS]
    rows += [{"text": "open the garage door"}, {"prompt": "hello", "reply": "hi"}]
    rows = [{"action": "[none]", **row} for row in rows]  # every row scored: greedy sampling
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    student = build_student("tiny", vocab_size=len(tokenizer), **special_token_ids(tokenizer))
    cfg = TrainConfig(
        run_dir=str(root / "run"),
        train_data=str(data),
        eval_data=str(data),
        tokenizer=str(tokenizer_dir),
        teacher=None,
        batch_size=4,
        max_steps=2,
        warmup_steps=1,
        max_seq_len=160,
        max_new_tokens=4,
        checkpoint_every=0,
        log_every=1,
        threads=1,
        tensorboard=False,
        plot=False,
    )
    student_dir = train_model(student, None, tokenizer, cfg, "student")
    bundle = export_fp32(student_dir, root / "bundle", max_new_tokens=6)
    return SimpleNamespace(
        name=request.param,
        tokenizer=tokenizer,
        run_dir=root / "run",
        student_dir=student_dir,
        bundle=bundle,
        generator=Generator.from_bundle(bundle, threads=1),
    )


def pairs(messages: list[dict]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in messages]


def test_training_ids_are_the_ids_served_for_every_turn(family):
    tok, gen = family.tokenizer, family.generator
    state = SimpleNamespace(generator=gen)
    encoder = PromptEncoder(
        family.bundle, json.loads((family.bundle / "manifest.json").read_text())
    )
    for chat in CHATS:
        ids, labels = encode_chat(tok, chat, 512)
        for i, message in enumerate(chat):
            if message["role"] != "assistant":
                continue
            served = render_chat(gen, pairs(chat[:i]))
            api = chat_prompt(state, [ChatMessage(**m) for m in chat[:i]])
            reference = tok.apply_chat_template(chat[:i], add_generation_prompt=True)
            assert served == api == reference == ids[: len(served)], (family.name, i)
            assert (
                labels[len(served) - 1] == IGNORE_INDEX and labels[len(served)] == ids[len(served)]
            )
            # a turn still being spoken: the template's head, as far as no word can change it
            assert served[: len(render_chat(gen, pairs(chat[: i - 1]) + [("user", "")], True))] == (
                render_chat(gen, pairs(chat[: i - 1]) + [("user", "")], True)
            )
        row = {"messages": chat}
        # the export's calibration/evaluation encoder is the runtime's, and follows training
        prompt = encoder.prompt(row)
        assert prompt == ids[: len(prompt)]
        reply = encoder.reply(row)
        assert reply == [t for t in ids[len(prompt) :] if t != IGNORE_INDEX][: len(reply)]
        assert reply == [label for label in labels[len(prompt) :] if label != IGNORE_INDEX]
        # one user message: Generator.encode_prompt renders it with the template too
        assert gen.encode_prompt(chat[0]["content"]) == render_chat(
            gen, [("user", chat[0]["content"])]
        )


def test_every_assistant_turn_is_learnt_and_nothing_else(family):
    tok = family.tokenizer
    end = SPECIALS[family.name][0]
    for chat in CHATS:
        ids, labels = encode_chat(tok, chat, 512)
        spans, current = [], []
        for token, label in zip(ids, labels, strict=True):
            if label == IGNORE_INDEX:
                if current:
                    spans.append(current)
                current = []
            else:
                assert label == token
                current.append(token)
        spans += [current] if current else []
        learnt = [tok.decode(span, skip_special_tokens=False) for span in spans]
        assert learnt == [m["content"] + end for m in chat if m["role"] == "assistant"]


def test_bos_once_or_never_and_other_row_forms(family):
    tok = family.tokenizer
    bos = SPECIALS[family.name][2]
    ids = encode_chat(tok, CHATS[0], 512)[0]
    text = tok.apply_chat_template(CHATS[0], tokenize=False)
    prompt_reply, plain = encode_rows(tok, [{"prompt": text, "reply": "ok"}, {"text": "x"}], 512)
    if bos is None:  # Qwen: no BOS at all
        assert tok.bos_token_id is None and ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
        assert plain[0][0] != tok.bos_token_id
    else:  # written by the template: not added again
        bos_id = tok.convert_tokens_to_ids(bos)
        assert ids[0] == bos_id and ids.count(bos_id) == 1 and text.count(bos) == 1
        assert encode_prompt(tok, text).count(bos_id) == 1
        assert prompt_reply[0].count(bos_id) == 1 and plain[0][0] == bos_id
    assert prompt_reply[0][-1] == plain[0][-1] == tok.eos_token_id  # the end of turn


def test_special_ids_and_generation_config_come_from_the_tokenizer(family):
    tok, gen = family.tokenizer, family.generator
    end, eos, bos, pad = SPECIALS[family.name]
    stops = list(dict.fromkeys(tok.convert_tokens_to_ids([end, eos])))
    expected = {
        "bos_token_id": tok.convert_tokens_to_ids(bos) if bos else None,
        "eos_token_id": stops if len(stops) > 1 else stops[0],
        "pad_token_id": tok.convert_tokens_to_ids(pad),
    }
    assert special_token_ids(tok) == expected and tok.eos_token == end
    config = json.loads((family.student_dir / "config.json").read_text())
    saved = json.loads((family.student_dir / "generation_config.json").read_text())
    for key, value in expected.items():
        assert config.get(key) == value and saved.get(key) == value, key
    generation = json.loads((family.bundle / "manifest.json").read_text())["generation"]
    assert generation["eos_token_ids"] == gen.eos_token_ids == stops  # end of turn first
    assert generation["bos_token_id"] == expected["bos_token_id"]
    assert generation["add_bos"] == (bos is not None)
    assert generation["chat_template"] == chat_template(family.name)
    if family.name == "deepseek-v3":  # the old hard-coded eos=2 is DeepSeek-V3's pad token
        assert tok.convert_ids_to_tokens(2) == "<｜▁pad▁｜>" and 2 not in stops


def test_training_and_evaluation_ran_without_bos_or_pad(family):
    """Qwen has no BOS, Llama-3 no pad token: both train, evaluate and sample."""
    records = [
        json.loads(line) for line in (family.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    train = [r for r in records if r.get("split", "train") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    assert len(train) == 2 and all(math.isfinite(r["loss"]) for r in train)
    assert evals and all(math.isfinite(r["perplexity"]) for r in evals)
    assert evals[-1]["task_acc"] is not None  # greedy replies sampled (padded with pad_token_id)


def test_the_openai_client_gets_the_reply_to_the_training_prompt(family):
    """Over HTTP (uvicorn, the official client): a multi-turn chat is prompted with exactly the
    ids training encodes it to, and answered as the runtime answers those ids."""
    if family.name != "qwen2.5":
        pytest.skip("one family over HTTP; the ids of all three are compared directly above")
    gen, chat = family.generator, CHATS[0]
    ids, _ = encode_chat(family.tokenizer, chat, 512)
    prompt = render_chat(gen, pairs(chat[:-1]))
    assert prompt == ids[: len(prompt)]
    expected = GenerationResult()  # greedy, from the training prompt's ids
    for _ in gen.stream(prompt, SamplingParams(max_new_tokens=5), result=expected):
        pass
    with ServerThread(create_app(ServerConfig(voice_enabled=False), generator=gen)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(model="any", messages=chat[:-1], max_tokens=5)
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.choices[0].message.content == expected.text


def test_demo_bundles_keep_the_turn_by_turn_format(tiny_run):
    manifest = json.loads((tiny_run["bundle"] / "manifest.json").read_text())
    assert "chat_template" not in manifest["generation"]
    assert Generator.from_bundle(tiny_run["bundle"], threads=1).chat_template is None
