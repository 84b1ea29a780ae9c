"""Versions (runtime/server/versions.py) on a real uvicorn server on 127.0.0.1: routing by
``model`` (the official openai client), the sticky weighted split, per-version metrics,
404 for an unknown model, a hot load and a retire while streams run (every stream ends
with [DONE] and the text of the version that served it), rollback, the admin API's
errors, config validation and the ``moe2edge versions`` CLI."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from moe2edge.runtime import Generator
from moe2edge.runtime.errors import RuntimeUserError
from moe2edge.runtime.server import ServerConfig, create_app, load_server_config
from moe2edge.runtime.server.config import parse_version
from moe2edge.runtime.server.versions import split_point
from tests.conftest import PYTHON, ROOT, require_tool, subprocess_env
from tests.server_helpers import ServerThread

TOKEN = "versions-token"
PROMPT = "turn on the kitchen lights"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def random_bundle(tokenizer_dir: Path, out: Path, seed: int) -> Path:
    """A second tiny model (random init, ``seed``) on the same tokenizer, as a bundle."""
    import torch

    from moe2edge.distill.student import build_student
    from moe2edge.distill.tokenizer import load_tokenizer, special_token_ids
    from moe2edge.export.onnx_export import export_fp32

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(tokenizer_dir)
    model = build_student(
        "tiny", vocab_size=len(tokenizer), seed=seed, **special_token_ids(tokenizer)
    )
    model.save_pretrained(out / "student")
    tokenizer.save_pretrained(out / "student")
    return export_fp32(out / "student", out / "bundle", max_new_tokens=12)


@pytest.fixture(scope="module")
def bundles(tiny_run, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("versions")
    return {"a": tiny_run["bundle"], "b": random_bundle(tiny_run["tokenizer"], root, seed=7)}


@pytest.fixture(scope="module")
def expected(bundles) -> dict[str, str]:
    """Each version's greedy reply to PROMPT (the server must say exactly this)."""
    return {
        n: Generator.from_bundle(b, threads=1).generate(PROMPT).text for n, b in bundles.items()
    }


def serve(bundles, hook=None, **overrides) -> ServerThread:
    overrides = {
        "voice_enabled": False,
        "token": TOKEN,
        "version_name": "a",
        "rate_limit_rps": 0,  # one client sends many requests here
        **overrides,
    }
    config = ServerConfig(**overrides)
    generator = Generator.from_bundle(bundles["a"], threads=1)
    return ServerThread(create_app(config, generator=generator, step_hook=hook))


def chat(client, **kw) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        messages=[{"role": "user", "content": PROMPT}], max_tokens=kw.pop("max_tokens", 12), **kw
    )


def test_routing_split_and_metrics(bundles, expected) -> None:
    versions = [{"name": "b", "bundle": str(bundles["b"]), "weight": 10}]
    with serve(bundles, model_name="home", version_weight=90, versions=versions) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=TOKEN, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["home", "a", "b"]
        for name in ("a", "b"):  # a version's name routes there
            reply = chat(client, model=name)
            assert reply.model == name and reply.choices[0].message.content == expected[name]
        assert expected["a"] != expected["b"]  # two different models: routing is observable

        with pytest.raises(openai.NotFoundError) as err:
            chat(client, model="nope")
        assert "'nope' does not exist" in str(err.value) and "home, a, b" in str(err.value)

        # the split: sticky per session key, by the key's hash, 90:10
        keys = [f"user-{i}" for i in range(120)]
        served = {k: chat(client, model="home", user=k, max_tokens=1).model for k in keys}
        want = {k: "a" if split_point(k) < 0.9 else "b" for k in keys}
        assert served == want
        assert 0.03 < sum(v == "b" for v in served.values()) / len(keys) < 0.2
        for k in keys[:20]:  # the same session again, by header this time: the same version
            again = chat(client, model="home", max_tokens=1, extra_headers={"X-Session-Id": k})
            assert again.model == served[k]
        # a weight change moves only the sessions in the moved boundary: [0.8, 0.9)
        patched = httpx.patch(srv.url + "/admin/versions", json={"weights": {"a": 80, "b": 20}},
                              headers=AUTH)  # fmt: skip
        assert patched.status_code == 200 and patched.json()["split"] == {"a": 0.8, "b": 0.2}
        moved = {k: chat(client, model="home", user=k, max_tokens=1).model for k in keys}
        changed = {k for k in keys if moved[k] != served[k]}
        assert changed == {k for k in keys if 0.8 <= split_point(k) < 0.9} and changed
        httpx.patch(srv.url + "/admin/versions", json={"weights": {"a": 90, "b": 10}},
                    headers=AUTH).raise_for_status()  # fmt: skip
        # no key: smooth weighted round robin, the shares exactly
        keyless = [chat(client, model="home", max_tokens=1).model for _ in range(20)]
        assert keyless.count("b") == 2

        text = httpx.get(srv.url + "/metrics", headers=AUTH).text
        b_requests = sum(v == "b" for v in served.values()) + 1 + keyless.count("b")
        b_requests += sum(served[k] == "b" for k in keys[:20]) + sum(
            v == "b" for v in moved.values()
        )
        assert f'moe2edge_version_requests_total{{status="200",version="b"}} {b_requests}.0' in text
        assert 'moe2edge_version_weight{version="a"} 90.0' in text
        assert 'moe2edge_version_generated_tokens_total{version="b"}' in text


def stream(url: str, key: str) -> dict:
    """One raw SSE chat stream: its version, text, finish reason, and whether [DONE] came."""
    body = {
        "model": "home",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 12,
        "stream": True,
        "user": key,
    }
    out = {"model": None, "text": "", "finish": None, "done": False, "errors": []}
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60
    ) as r:
        out["status"] = r.status_code
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                out["done"] = True
                continue
            event = json.loads(line[6:])
            if "error" in event:
                out["errors"].append(event["error"])
                continue
            out["model"] = event["model"]
            choice = event["choices"][0]
            out["text"] += choice["delta"].get("content") or ""
            out["finish"] = choice["finish_reason"] or out["finish"]
    return out


def test_hot_load_retire_rollback_while_streaming(bundles, expected) -> None:
    results, stop = [], threading.Event()

    def client(i: int) -> None:
        n = 0
        while not stop.is_set():
            results.append(stream(srv.url, f"client-{i}-{n}"))
            n += 1

    admin = httpx.Client(headers=AUTH, timeout=60)
    gate = threading.Event()  # cleared: every decode step waits (streams pause mid-way)
    gate.set()

    def hook() -> None:
        gate.wait(30)
        time.sleep(0.005)

    def in_flight() -> dict[str, int]:
        return {v["name"]: v["in_flight"] for v in admin.get("/admin/versions").json()["versions"]}

    with serve(bundles, hook=hook, model_name="home") as srv:
        admin.base_url = srv.url
        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        loaded = admin.post("/admin/versions", json={"name": "b", "bundle": str(bundles["b"]),
                                                     "weight": 1})  # fmt: skip
        assert loaded.status_code == 201 and loaded.json()["state"] == "serving"
        for _ in range(200):  # pause the streams while one of them is on a
            gate.clear()
            time.sleep(0.05)
            if in_flight()["a"] >= 1:
                break
            gate.set()
            time.sleep(0.02)
        retired = admin.delete("/admin/versions/a")
        gate.set()
        assert retired.status_code == 202, retired.text
        assert retired.json()["state"] == "draining"
        in_flight_at_retire = retired.json()["in_flight"]
        deadline = time.time() + 30
        while time.time() < deadline:
            states = {
                v["name"]: v["state"] for v in admin.get("/admin/versions").json()["versions"]
            }
            if states["a"] == "retired":
                break
            time.sleep(0.05)
        assert states == {"a": "retired", "b": "serving"}
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(60)

        assert in_flight_at_retire >= 1  # streams on a were running when it was retired
        served = {r["model"] for r in results}
        assert served == {"a", "b"}, served
        for r in results:  # none dropped, none corrupted
            assert r["status"] == 200 and r["done"] and not r["errors"], r
            assert r["finish"] in ("stop", "length") and r["text"] == expected[r["model"]], r
        models = {m["id"] for m in admin.get("/v1/models").json()["data"]}
        assert models == {"home", "b"}
        gone = admin.post("/v1/chat/completions", json={"model": "a", "messages": [
            {"role": "user", "content": PROMPT}]})  # fmt: skip
        assert gone.status_code == 404 and "'a' is retired" in gone.json()["error"]["message"]

        # rollback: a comes back (reloaded), then b goes (the set before the load)
        back = admin.post("/admin/versions/rollback").json()
        assert {v["name"]: v["weight"] for v in back["restored"]} == {"a": 1.0, "b": 1.0}
        assert back["split"] == {"a": 0.5, "b": 0.5}
        back = admin.post("/admin/versions/rollback").json()
        assert back["split"] == {"a": 1.0}
        assert stream(srv.url, "after")["text"] == expected["a"]
        assert admin.post("/admin/versions/rollback").status_code == 409  # nothing left


def test_admin_errors(bundles, tmp_path) -> None:
    with serve(bundles) as srv:
        admin = httpx.Client(base_url=srv.url, headers=AUTH, timeout=30)
        assert httpx.get(srv.url + "/admin/versions").status_code == 401
        bad = [
            ({"name": "b", "bundle": str(tmp_path)}, 400, "manifest.json"),
            ({"name": "b", "bundle": str(bundles["b"]), "weight": -1}, 400, "weight"),
            ({"name": "bad name!", "bundle": str(bundles["b"])}, 400, "name"),
            ({"name": "a", "bundle": str(bundles["b"])}, 409, "exists"),
        ]
        for body, status, words in bad:
            r = admin.post("/admin/versions", json=body)
            assert r.status_code == status and words in r.json()["error"]["message"], r.text
        r = admin.delete("/admin/versions/a")
        assert r.status_code == 409 and "no serving version" in r.json()["error"]["message"]
        assert admin.delete("/admin/versions/zz").status_code == 404
        r = admin.patch("/admin/versions", json={"weights": {"a": 0}})
        assert r.status_code == 409 and "sum to 0" in r.json()["error"]["message"]
        assert admin.patch("/admin/versions", json={"weights": {"zz": 1}}).status_code == 404
        # one version: any model name is still answered (clients with a placeholder name)
        r = admin.post("/v1/completions", json={"model": "any", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "a"


def test_config_and_cli(bundles, tmp_path) -> None:
    assert parse_version(f"b={bundles['b']}:10") == {
        "name": "b", "bundle": str(bundles["b"]), "weight": 10.0}  # fmt: skip
    assert parse_version("b=/x:y/dir") == {"name": "b", "bundle": "/x:y/dir"}
    with pytest.raises(RuntimeUserError, match="NAME=DIR"):
        parse_version("nodir")
    b = str(bundles["b"])
    for overrides, words in [
        ([f"versions=[{{name: b, bundle: {b}}}, {{name: b, bundle: {b}}}]"], "unique"),
        (["version_name=b", f"versions=[{{name: b, bundle: {b}}}]"], "unique"),
        ([f"versions=[{{name: c, bundle: {tmp_path}}}]"], "manifest.json"),
        ([f"versions=[{{name: c, bundle: {b}, weight: -2}}]"], "weight"),
        (["version_weight=0", f"versions=[{{name: c, bundle: {b}, weight: 0}}]"], "sum to 0"),
    ]:
        with pytest.raises(RuntimeUserError, match=words):
            load_server_config(None, overrides)

    from moe2edge.cli import build_parser
    from moe2edge.runtime.serve_cli import server_config

    argv = ["serve", "x", "--version-name", "a:90", "--version", f"b={b}:10"]
    config = server_config(build_parser(argv).parse_args(argv))
    assert (config.version_name, config.version_weight) == ("a", 90.0)
    assert [v.model_dump() for v in config.versions] == [{"name": "b", "bundle": b, "weight": 10}]

    with serve(bundles, model_name="home") as srv:

        def cli(*args: str) -> dict:
            cmd = [PYTHON, "-m", "moe2edge.cli", "versions", *args, "--url", srv.url,
                   "--token", TOKEN]  # fmt: skip
            done = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True,
                                  text=True, timeout=120)  # fmt: skip
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout)

        assert cli("load", "b", b, "--weight", "10")["state"] == "serving"
        assert cli("weights", "a=3", "b=1")["split"] == {"a": 0.75, "b": 0.25}
        assert cli("retire", "b", "--wait")["state"] == "retired"
        listed = cli("list")
        assert listed["split"] == {"a": 1.0} and listed["history"] == 3
        assert cli("rollback")["split"] == {"a": 0.75, "b": 0.25}
        bad = subprocess.run(
            [PYTHON, "-m", "moe2edge.cli", "versions", "retire", "zz", "--url", srv.url,
             "--token", TOKEN], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
        )  # fmt: skip
        assert (
            bad.returncode == 2 and "HTTP 404" in bad.stderr and "no loaded version" in bad.stderr
        )


@require_tool("espeak-ng", install="apt-get install espeak-ng (make system-deps)")
def test_voice_session_routed_and_held(bundles, tiny_run) -> None:
    """``?model=`` routes a voice session; the session holds its version: a retire waits
    for it to close."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    from tests.server_helpers import frames, speech

    versions = [{"name": "b", "bundle": str(bundles["b"]), "weight": 1}]
    with serve(bundles, voice_enabled=True, grammar=str(tiny_run["grammar"]),
               versions=versions) as srv:  # fmt: skip
        admin = httpx.Client(base_url=srv.url, headers=AUTH, timeout=30)
        with (
            pytest.raises(ConnectionClosed),
            connect(f"{srv.ws_url}?model=x", additional_headers=AUTH) as ws,
        ):
            event = json.loads(ws.recv(timeout=10))
            assert (
                event["error"]["code"] == "model_not_found" and "a, b" in event["error"]["message"]
            )
            ws.recv(timeout=5)

        def b() -> dict:
            return next(
                v for v in admin.get("/admin/versions").json()["versions"] if v["name"] == "b"
            )

        with connect(f"{srv.ws_url}?model=b", additional_headers=AUTH) as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
            assert b()["in_flight"] == 1
            ws.send(json.dumps({"type": "session.update", "session": {"turn_detection": None}}))
            for frame in frames(speech("lock the garage door", tail_s=0.2)):
                ws.send(frame)
            ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            deadline = time.time() + 30
            while json.loads(ws.recv(timeout=30))["type"] != "response.done":
                assert time.time() < deadline
            assert admin.delete("/admin/versions/b").json()["state"] == "draining"
            time.sleep(0.3)
            assert b()["state"] == "draining"  # the open session keeps it
        deadline = time.time() + 10
        while b()["state"] != "retired":
            assert time.time() < deadline, b()
            time.sleep(0.05)
        text = httpx.get(srv.url + "/metrics", headers=AUTH).text
        assert 'moe2edge_version_requests_total{status="websocket",version="b"} 1.0' in text
