"""A small real HTTP server that answers like vLLM and SGLang from a local HF causal LM.

Test and benchmark infrastructure (the tiny teacher is served on 127.0.0.1), shipped in the
package so ``bench/`` can use it. It implements only what teacher scoring uses, in the
schemas documented in docs/teacher-cache.md:

- vLLM:   ``GET /v1/models``, ``POST /v1/completions`` (token-id ``prompt``, ``prompt_logprobs``,
  ``max_tokens``); a ``prompt_logprobs`` above ``max_logprobs`` gets vLLM's HTTP 400.
- SGLang: ``GET /get_model_info``, ``POST /generate`` (``input_ids``, ``return_logprob``,
  ``logprob_start_len``, ``top_logprobs_num``, ``sampling_params.max_new_tokens``); with
  ``max_logprobs`` set it silently returns fewer entries (as a capping proxy would).

``Faults`` injects what real servers do: 503 for the first N scoring requests, and after N
good ones every request failing with 503, malformed JSON, a missing field, or a dropped
connection. ``python -m moe2edge.distill.teacher_server --teacher DIR`` runs it standalone.
"""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from moe2edge.distill.cache.scorers import topk_logprobs

BREAK_MODES = ("503", "malformed", "schema", "close")


@dataclass
class Faults:
    max_logprobs: int | None = None  # like `vllm serve --max-logprobs N`; None: no cap
    fail_first: int = 0  # the first N scoring requests get HTTP 503
    break_after: int | None = None  # after N answered scoring requests, every one fails ...
    break_mode: str = "503"  # ... with: 503 | malformed (JSON) | schema (field missing) | close
    delay_s: float = 0.0  # added to every scoring request


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # pydantic writes -inf as null


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes | dict | list) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str, param: str | None = None) -> None:
        # vLLM's ErrorResponse: {"error": {"message", "type", "param", "code"}}
        error = {"message": message, "type": kind, "param": param, "code": status}
        self._send(status, {"error": error})

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        app: TeacherServer = self.server.app  # type: ignore[attr-defined]
        if self.path == "/v1/models":
            card = {
                "id": app.model_name,
                "object": "model",
                "owned_by": "vllm",
                "root": app.model_name,
            }
            self._send(200, {"object": "list", "data": [card]})
        elif self.path == "/get_model_info":
            self._send(
                200,
                {
                    "model_path": app.model_name,
                    "tokenizer_path": app.model_name,
                    "is_generation": True,
                },
            )
        elif self.path in ("/health", "/v1/health"):
            self._send(200, b"{}")
        else:
            self._error(404, f"no route {self.path}", "NotFoundError")

    def do_POST(self) -> None:  # noqa: N802
        app: TeacherServer = self.server.app  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path not in ("/v1/completions", "/generate"):
            self._error(404, f"no route {self.path}", "NotFoundError")
            return
        fault = app.next_fault()
        if app.faults.delay_s:
            time.sleep(app.faults.delay_s)
        if fault == "close":
            self.close_connection = True
            return
        if fault == "503":
            self._error(503, "Service Unavailable (injected fault)", "ServiceUnavailableError")
            return
        if fault == "malformed":
            self._send(200, b'{"id": "cmpl-1", "choices": [{"text": "x", "prompt_logpro')
            return
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as exc:
            self._error(400, f"invalid JSON body: {exc}", "BadRequestError")
            return
        if self.path == "/v1/completions":
            self._completions(app, body, drop=fault == "schema")
        else:
            self._generate(app, body, drop=fault == "schema")

    def _completions(self, app: TeacherServer, body: dict, drop: bool) -> None:
        if body.get("model") not in (None, app.model_name):
            self._error(
                404, f"The model `{body.get('model')}` does not exist.", "NotFoundError", "model"
            )
            return
        prompt = body.get("prompt")
        prompts = prompt if prompt and isinstance(prompt[0], list) else [prompt]
        if not all(
            isinstance(p, list) and p and all(isinstance(i, int) for i in p) for p in prompts
        ):
            self._error(
                400, "this test server takes token-id prompts only", "BadRequestError", "prompt"
            )
            return
        k = body.get("prompt_logprobs")
        cap = app.faults.max_logprobs
        if k is not None and cap is not None and k > cap:
            # vLLM's check (vllm/v1/engine/processor.py, sampling_params.py), answered as 400
            message = f"Requested prompt logprobs of {k}, which is greater than max allowed: {cap}"
            self._error(400, message, "BadRequestError", "prompt_logprobs")
            return
        choices = []
        for n, ids in enumerate(prompts):
            logits = app.logits(ids)
            nxt = int(logits[-1].argmax())
            choice = {
                "index": n,
                "text": app.text(nxt),
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
                "prompt_logprobs": None if k is None else app.vllm_prompt_logprobs(ids, logits, k),
            }
            if drop:
                del choice["prompt_logprobs"]
            choices.append(choice)
        tokens = sum(len(p) for p in prompts)
        usage = {
            "prompt_tokens": tokens,
            "completion_tokens": len(prompts),
            "total_tokens": tokens + len(prompts),
        }
        self._send(
            200,
            {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": app.model_name,
                "choices": choices,
                "usage": usage,
            },
        )

    def _generate(self, app: TeacherServer, body: dict, drop: bool) -> None:
        inputs = body.get("input_ids")
        batch = bool(inputs) and isinstance(inputs[0], list)
        seqs = inputs if batch else [inputs]
        if not all(isinstance(s, list) and s and all(isinstance(i, int) for i in s) for s in seqs):
            self._error(
                400, "input_ids must be a list of token ids (or a list of them)", "BadRequestError"
            )
            return
        top_n = int(body.get("top_logprobs_num") or 0)
        if app.faults.max_logprobs is not None:
            top_n = min(top_n, app.faults.max_logprobs)
        want = bool(body.get("return_logprob"))
        start = int(
            body.get("logprob_start_len", -1) if body.get("logprob_start_len") is not None else -1
        )
        new = int((body.get("sampling_params") or {}).get("max_new_tokens", 1))
        answers = []
        for ids in seqs:
            started = time.perf_counter()
            logits = app.logits(ids)
            nxt = int(logits[-1].argmax())
            out_ids = [nxt] if new > 0 else []
            meta = {
                "id": uuid.uuid4().hex,
                "finish_reason": {"type": "length", "length": len(out_ids)},
                "prompt_tokens": len(ids),
                "completion_tokens": len(out_ids),
                "cached_tokens": 0,
            }
            if want:
                meta.update(app.sglang_logprobs(ids, logits, top_n, start, out_ids))
                if drop:
                    del meta["input_top_logprobs"]
            meta["e2e_latency"] = time.perf_counter() - started
            answers.append(
                {"text": app.text(nxt) if out_ids else "", "output_ids": out_ids, "meta_info": meta}
            )
        self._send(200, answers if batch else answers[0])


class TeacherServer:
    """Serve ``model_dir`` on 127.0.0.1 (ephemeral port by default) from a background thread."""

    def __init__(
        self,
        model_dir: str | Path,
        host: str = "127.0.0.1",
        port: int = 0,
        model_name: str | None = None,
        faults: Faults | None = None,
    ):
        from moe2edge.distill.teacher import load_teacher

        self.model = load_teacher(model_dir)
        self.model_name = model_name or Path(model_dir).resolve().name
        self.faults = faults or Faults()
        self._texts = self._vocab_texts(Path(model_dir), self.model.config.vocab_size)
        self._lock = threading.Lock()
        self.scoring_requests = 0  # POSTs to /v1/completions or /generate seen
        self.answered = 0  # of those, answered without an injected fault
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.app = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @staticmethod
    def _vocab_texts(model_dir: Path, vocab: int) -> list[str | None]:
        if not (model_dir / "tokenizer.json").is_file():
            return [None] * vocab
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        return [tok.decode([i], skip_special_tokens=False) for i in range(vocab)]

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> TeacherServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> TeacherServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def set_faults(self, faults: Faults | None = None) -> None:
        """Replace the fault plan and reset the request counters."""
        with self._lock:
            self.faults = faults or Faults()
            self.scoring_requests = self.answered = 0

    def next_fault(self) -> str | None:
        """The fault for this scoring request, if any, and the request counted."""
        with self._lock:
            self.scoring_requests += 1
            f = self.faults
            if self.scoring_requests <= f.fail_first:
                return "503"
            if f.break_after is not None and self.answered >= f.break_after:
                if f.break_mode not in BREAK_MODES:
                    raise ValueError(f"break_mode must be one of {BREAK_MODES}")
                return f.break_mode
            self.answered += 1
            return None

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """float32 logits [T, V]; the same forward as ``cache.scorers.local_scorer``'s."""
        x = torch.tensor([ids])
        return self.model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float()

    def text(self, token: int) -> str | None:
        return self._texts[token] if 0 <= token < len(self._texts) else None

    def vllm_prompt_logprobs(self, ids: list[int], logits: torch.Tensor, k: int) -> list:
        """[None, {id: {logprob, rank, decoded_token}}, ...]: entry t predicts prompt token t.

        As vLLM does, the actual prompt token is added with its rank when not in the top k.
        """
        lse = logits.logsumexp(-1)
        vals, top = topk_logprobs(logits[:-1], k)
        out: list = [None]
        for t in range(1, len(ids)):
            row = {
                str(i): {"logprob": _finite(v), "rank": j + 1, "decoded_token": self.text(i)}
                for j, (v, i) in enumerate(
                    zip(vals[t - 1].tolist(), top[t - 1].tolist(), strict=True)
                )
            }
            actual = ids[t]
            if str(actual) not in row:
                z = logits[t - 1]
                rank = int((z > z[actual]).sum()) + 1
                lp = float(z[actual] - lse[t - 1])
                row[str(actual)] = {
                    "logprob": _finite(lp),
                    "rank": rank,
                    "decoded_token": self.text(actual),
                }
            out.append(row)
        return out

    def sglang_logprobs(
        self, ids: list[int], logits: torch.Tensor, top_n: int, start: int, out_ids: list[int]
    ) -> dict:
        """SGLang's meta_info logprob fields: entries are [logprob, token_id, text (None)]."""
        full = logits - logits.logsumexp(-1, keepdim=True)
        first = len(ids) if start < 0 else min(start, len(ids))
        tok_lp = [
            [None if t == 0 else _finite(float(full[t - 1, ids[t]])), ids[t], None]
            for t in range(first, len(ids))
        ]
        top_lp: list = []
        if top_n > 0:
            vals, top = topk_logprobs(logits, top_n)
            for t in range(first, len(ids)):
                if t == 0:
                    top_lp.append(None)
                else:
                    top_lp.append(
                        [
                            [_finite(v), i, None]
                            for v, i in zip(vals[t - 1].tolist(), top[t - 1].tolist(), strict=True)
                        ]
                    )
        meta = {
            "input_token_logprobs": tok_lp,
            "output_token_logprobs": [[_finite(float(full[-1, i])), i, None] for i in out_ids],
            "input_top_logprobs": top_lp,
            "output_top_logprobs": [],
        }
        if top_n > 0 and out_ids:
            vals, top = topk_logprobs(logits[-1:], top_n)
            meta["output_top_logprobs"] = [
                [
                    [_finite(v), i, None]
                    for v, i in zip(vals[0].tolist(), top[0].tolist(), strict=True)
                ]
            ]
        return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="local HF checkpoint directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: an ephemeral port")
    p.add_argument("--model-name")
    p.add_argument("--max-logprobs", type=int)
    p.add_argument("--fail-first", type=int, default=0)
    p.add_argument("--break-after", type=int)
    p.add_argument("--break-mode", choices=BREAK_MODES, default="503")
    p.add_argument("--delay", type=float, default=0.0, help="seconds added per scoring request")
    args = p.parse_args(argv)
    faults = Faults(
        args.max_logprobs, args.fail_first, args.break_after, args.break_mode, args.delay
    )
    server = TeacherServer(args.teacher, args.host, args.port, args.model_name, faults)
    print(f"listening on {server.url}", flush=True)
    try:
        server._httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._httpd.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
