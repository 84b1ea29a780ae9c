"""Served teachers over real HTTP on 127.0.0.1: vLLM and SGLang schemas, retries, failures."""

from __future__ import annotations

import json
import math
import socket

import pytest

from moe2edge.distill.cache import TeacherCache, build_cache
from moe2edge.distill.demo_data import write_jsonl
from moe2edge.distill.errors import DistillError
from moe2edge.distill.served import ServedTeacher, parse_sglang, parse_vllm
from moe2edge.distill.teacher_server import Faults, TeacherServer
from moe2edge.fileio import sha256_file
from moe2edge.rows import read_rows

K = 16
SHARD = 8
SEQ = 64
APIS = ("vllm", "sglang")


@pytest.fixture(scope="module")
def env(tiny_run, tmp_path_factory):
    """24 rows, their cache from the local teacher, and one server for the whole module."""
    root = tmp_path_factory.mktemp("served")
    data = root / "data.jsonl"
    write_jsonl(read_rows(tiny_run["train"])[:24], data)
    common = dict(
        data=data, tokenizer=tiny_run["tokenizer"], k=K, max_seq_len=SEQ, shard_examples=SHARD
    )
    # batch_size=1: the server's forward, so the served caches must be bit-identical.
    build_cache(out=root / "local", teacher=tiny_run["teacher"], batch_size=1, **common)
    with TeacherServer(tiny_run["teacher"], model_name="tiny-teacher") as server:
        yield {"root": root, "common": common, "server": server, "tokenizer": tiny_run["tokenizer"]}


def _served(env, out, api, **kw):
    opts = dict(concurrency=2, retries=2, backoff=0.01, timeout=10.0, **kw)
    return build_cache(out=out, server=env["server"].url, api=api, **env["common"], **opts)


def _hashes(cache_dir):
    return {p.name: sha256_file(p) for p in sorted(cache_dir.glob("shard-*.safetensors"))}


@pytest.mark.parametrize("api", APIS)
def test_served_cache_equals_local(env, tmp_path, api):
    """Both schemas give the local teacher's cache bit for bit; 503s are retried."""
    server = env["server"]
    server.set_faults(Faults(fail_first=3))
    index = _served(env, tmp_path / api, api)
    assert index["complete"] and len(index["shards"]) == 3
    assert index["teacher"] == {"kind": "served", "api": api, "model": "tiny-teacher"}
    assert index["teacher_url"] == server.url
    assert server.scoring_requests == 24 + 3  # every example once, plus the three retried 503s
    assert _hashes(tmp_path / api) == _hashes(env["root"] / "local")
    cache = TeacherCache(tmp_path / api, tokenizer_dir=env["tokenizer"])
    assert cache.bytes_per_token == index["bytes_per_token"]


def test_k_capped_by_vllm_error(env, tmp_path):
    env["server"].set_faults(Faults(max_logprobs=8))
    with pytest.raises(DistillError) as err:
        _served(env, tmp_path / "c", "vllm")
    message = str(err.value)
    assert "caps log-probs below k=16 (its cap is 8)" in message
    assert "--max-logprobs >= 16" in message and "greater than max allowed: 8" in message


def test_k_capped_by_short_answers(env, tmp_path):
    """A server that silently returns fewer than k entries is caught, not cached."""
    env["server"].set_faults(Faults(max_logprobs=8))
    with pytest.raises(
        DistillError, match=r"returned 8 top log-probs at prompt position 1 but k=16"
    ):
        _served(env, tmp_path / "c", "sglang")
    assert not list((tmp_path / "c").glob("shard-*"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_down(env, tmp_path):
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    with pytest.raises(DistillError) as err:
        build_cache(
            out=tmp_path / "c",
            server=url,
            api="vllm",
            model_name="m",
            retries=2,
            backoff=0.01,
            **env["common"],
        )
    message = str(err.value)
    assert f"{url}/v1/completions did not answer after 3 attempts" in message
    assert "ConnectError" in message and "shards already written are kept" in message


@pytest.mark.parametrize(
    ("api", "mode", "expected"),
    [
        ("vllm", "close", "did not answer after 3 attempts"),
        ("sglang", "503", r"did not answer after 3 attempts \(last error: HTTP 503"),
        ("vllm", "malformed", "returned malformed JSON"),
        ("sglang", "malformed", "returned malformed JSON"),
        ("vllm", "schema", "no choices\\[0\\].prompt_logprobs"),
        ("sglang", "schema", "meta_info has no 'input_top_logprobs' field"),
    ],
)
def test_failure_mid_run_keeps_written_shards(env, tmp_path, api, mode, expected):
    """The server fails after one shard: a clear error, shard 0 intact, then a clean resume."""
    server = env["server"]
    server.set_faults(Faults(break_after=SHARD + 1, break_mode=mode))
    out = tmp_path / "c"
    with pytest.raises(DistillError, match=expected):
        _served(env, out, api)
    index = json.loads((out / "index.json").read_text())
    assert not index["complete"] and [s["file"] for s in index["shards"]] == [
        "shard-00000.safetensors"
    ]
    assert sha256_file(out / "shard-00000.safetensors") == index["shards"][0]["sha256"]
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-00000.safetensors"]
    with pytest.raises(DistillError, match="incomplete"):
        TeacherCache(out)
    server.set_faults(Faults())
    resumed = _served(env, out, api)
    assert resumed["skipped_shards"] == 1 and server.scoring_requests == 24 - SHARD
    assert _hashes(out) == _hashes(env["root"] / "local")


def test_wrong_model_name_is_a_clear_error(env, tmp_path):
    env["server"].set_faults(Faults())
    with pytest.raises(DistillError, match=r"rejected the request \(HTTP 404\).*does not exist"):
        _served(env, tmp_path / "c", "vllm", model_name="not-served")


def test_parsers_follow_documented_schemas():
    """Hand-written payloads in the documented shapes, including vLLM's extra prompt token."""
    vllm = {
        "choices": [
            {
                "index": 0,
                "text": "x",
                "prompt_logprobs": [
                    None,
                    {  # k=2 plus the actual prompt token (rank 7), which must be dropped
                        "5": {"logprob": -0.5, "rank": 1, "decoded_token": "a"},
                        "9": {"logprob": -1.5, "rank": 2, "decoded_token": "b"},
                        "3": {"logprob": -6.0, "rank": 7, "decoded_token": "c"},
                    },
                    {
                        "9": {"logprob": None, "rank": 2, "decoded_token": "b"},  # -inf as null
                        "1": {"logprob": -0.1, "rank": 1, "decoded_token": "d"},
                    },
                ],
            }
        ]
    }
    ids, lps = parse_vllm(vllm, 3, 2)
    assert ids.tolist() == [[5, 9], [1, 9]]
    assert lps[0].tolist() == [-0.5, -1.5] and lps[1, 0] == pytest.approx(-0.1)
    assert math.isinf(lps[1, 1])
    sglang = [
        {
            "text": "x",
            "meta_info": {
                "input_top_logprobs": [
                    None,
                    [[-0.2, 4, None], [-2.0, 8, None]],
                    [[-0.3, 2, None], [-1.0, 6, None]],
                ]
            },
        }
    ]
    ids, lps = parse_sglang(sglang, 3, 2)
    assert ids.tolist() == [[4, 8], [2, 6]] and lps[1].tolist() == pytest.approx([-0.3, -1.0])
    with pytest.raises(DistillError, match="has 2 entries for a prompt of 3 tokens"):
        parse_sglang({"meta_info": {"input_top_logprobs": [None, [[-0.2, 4, None]]]}}, 3, 1)
    with pytest.raises(DistillError, match="prompt_logprobs\\[1\\] is None"):
        parse_vllm({"choices": [{"prompt_logprobs": [None, None]}]}, 2, 1)


def test_served_teacher_discovers_model_name(env):
    env["server"].set_faults(Faults())
    for api in APIS:
        with ServedTeacher(env["server"].url, api, K) as teacher:
            assert teacher.identity() == {"kind": "served", "api": api, "model": "tiny-teacher"}
