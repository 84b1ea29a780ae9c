"""Runtime benchmark: this runtime vs onnxruntime-genai vs transformers, on one machine, one run.

A randomly initialised ~100M-parameter Llama student (preset ``100m``, vocabulary 16384) so
decode is bound by memory bandwidth. Measured on the same prompts (random ids, lengths
16/128/512) and the same number of greedy tokens (end tokens ignored):

- ``moe2edge_fp32`` / ``moe2edge_int4``: our engine (``moe2edge.runtime.engine.OnnxEngine`` + greedy
  ``Sampler``) on our fast bundles (``moe2edge.export.genai_graph.export_fast``: the model builder's
  GroupQueryAttention graph, KV updated in place through IO binding);
- ``genai_fp32`` / ``genai_int4``: onnxruntime-genai's own generator loop (``og.Generator``)
  on its model builder's output of the same student (the same ONNX files);
- ``hf_eager_fp32``: transformers' ``generate`` in PyTorch eager mode (default attention).

Every runtime runs in its own process (its peak RSS, VmHWM, is its own), started afresh
each round in alternating order (the process started first measured slower). By default
(``--schedule burst``) each runtime in turn, in a shuffled order for every prompt, runs a
whole generation with its decode steps back to back, as a user runs it (prefill and steps
timed inside its process; 0.2 s between runtimes so workers left spinning stop first).
``--schedule lockstep`` drives the ORT runtimes one decode step at a time instead (step 1
on each, step 2 on each, ...; the order shuffled at every step), so the load other processes
put on a shared machine falls on all of them alike; transformers then runs whole
``generate`` calls after each prompt's lockstep (``--hf-stepped`` steps it through its
streamer hook instead, which costs it 15-20%). Medians over ``--repeats`` rounds are
reported. All ORT-based runtimes get the same intra-op thread count (``--threads``), torch
the same number of threads. The machine's memory bandwidth is measured in the same run and
``floor_ms_per_token`` = weight bytes read per token / bandwidth (per precision).

``concurrency``: aggregate tokens/s and p95 inter-token latency of 1, 2, 4, 8 concurrent
streaming chat completions through the real HTTP server (``moe2edge serve``, its batching
loop), per precision (``bench/concurrency.py``; ``--concurrency ''`` skips it;
``--concurrency-speculate off,ngram`` adds ``concurrency_ngram``, the servers with prompt
lookup speculation; ``--concurrency-new-tokens`` per reply, 128 by default).
Then (unless ``--skip-spec``) bench/speculative.py adds ``speculative`` on the 100M student
(our plain decoding vs prompt lookup, and onnxruntime-genai plain and with its own n-gram
speculative decoding, per precision, end tokens ignored; ``greedy_equal_to_plain``: every
method's tokens against our plain decoding's) with ``speedup`` entries
``moe2edge_spec_vs_genai_{fp32,int4}`` (our fastest speculative method over genai's fastest
configuration) and ``prefix_reuse`` (TTFT of the turn after a ``--history-tokens`` history,
with and without reuse). ``--spec-fp32``/``--spec-int4``/``--spec-draft`` (and genai's
bundles of the same, ``--spec-genai-*``) add ``speculative_demo``, the same on a trained
student (the demo domain's) with its draft, and ``moe2edge_spec_vs_genai_demo_*``.

    python bench/runtime.py                      # a few minutes on 2 cores
    python bench/runtime.py --new-tokens 32 --repeats 1   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RUNTIMES = ["moe2edge_fp32", "moe2edge_int4", "genai_fp32", "genai_int4", "hf_eager_fp32"]
VOCAB = 16384
SETTLE_S = float(os.environ.get("BENCH_SETTLE_S", "0.002"))
# before each whole generation: ORT workers left spinning by the runtime before (genai keeps
# ORT's default, spin on after a run) would take the cores from the next one; 0.2 s was not
# enough here (our TTFT at 16 tokens 60 ms right after genai vs 29 ms after 1 s, 2026-12-03)
BURST_SETTLE_S = float(os.environ.get("BENCH_BURST_SETTLE_S", "1.0"))


# --- children: one runtime each, nothing else imported --------------------------------------
# A child loads its runtime, answers READY, then runs one prompt per stdin line (JSON) and
# answers RESULT {ttft_s, decode_s, decode_tokens, tokens, peak_rss_mb, torch_in_sys_modules}.


def peak_rss_mb() -> float:
    """VmHWM: this process's peak RSS. (ru_maxrss would also count the parent's memory at
    fork time, which Linux carries over exec into the child's rusage.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Moe2edge:
    """Our engine + greedy sampler, one decode step per call."""

    def __init__(self, spec: dict):
        from moe2edge.runtime.engine import OnnxEngine
        from moe2edge.runtime.sampling import Sampler, SamplingParams

        self.engine = OnnxEngine(
            spec["path"],
            threads=spec["threads"],
            spinning=spec["spinning"],
            verify=spec.get("verify", True),
        )
        self.sampler = Sampler(SamplingParams())

    def start(self, prompt: list[int], new_tokens: int) -> None:
        self.cache = self.engine.new_cache()
        self.tokens = [self.sampler(self.engine.forward(prompt, self.cache), self.cache.tokens)]

    def step(self) -> None:
        logits = self.engine.forward([self.tokens[-1]], self.cache)
        self.tokens.append(self.sampler(logits, self.cache.tokens))

    def finish(self) -> list[int]:
        return self.tokens


class Genai:
    """onnxruntime-genai's own generator loop (greedy, a fixed length)."""

    def __init__(self, spec: dict):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(spec["path"])
        options: dict = {"intra_op_num_threads": spec["threads"]} if spec["threads"] else {}
        # genai passes session_options keys it does not know to ORT as config entries
        if spec["spinning"] in ("run", "off"):
            options["session.intra_op.allow_spinning"] = "0" if spec["spinning"] == "off" else "1"
        if spec["spinning"] == "run":
            options["session.force_spinning_stop"] = "1"
        if options:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)

    def start(self, prompt: list[int], new_tokens: int) -> None:
        total = len(prompt) + new_tokens
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        self.generator = self.og.Generator(self.model, params)
        self.generator.append_tokens(np.asarray(prompt, dtype=np.int32))
        self.generator.generate_next_token()
        self.prompt_len = len(prompt)

    def step(self) -> None:
        self.generator.generate_next_token()

    def finish(self) -> list[int]:
        assert self.generator.is_done()
        return [int(t) for t in self.generator.get_sequence(0)[self.prompt_len :]]


class HfEager:
    """transformers' ``generate`` (PyTorch eager), stepped through its streamer hook.

    ``generate`` runs in a thread; the streamer's ``put`` (called once with the prompt,
    then once per new token) blocks until the parent asks for the next step, so the time
    from a ``step`` command to the next ``put`` is exactly one of generate's decode steps.
    """

    def __init__(self, spec: dict):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        if spec["threads"]:
            torch.set_num_threads(spec["threads"])
        self.model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=torch.float32).eval()

    def put(self, value) -> None:  # the streamer interface generate() calls
        if self.calls:  # not the prompt
            self.produced.release()
            self.go.acquire()
        self.calls += 1

    def end(self) -> None:
        pass

    def start(self, prompt: list[int], new_tokens: int) -> None:
        self.calls, self.out = 0, None
        self.go, self.produced = threading.Semaphore(0), threading.Semaphore(0)
        ids = self.torch.tensor([prompt])

        def generate() -> None:
            with self.torch.inference_mode():
                self.out = self.model.generate(
                    ids,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                    streamer=self,
                )[0, len(prompt) :].tolist()

        self.thread = threading.Thread(target=generate)
        self.thread.start()
        self.produced.acquire()  # the first new token

    def step(self) -> None:
        self.go.release()
        self.produced.acquire()

    def finish(self) -> list[int]:
        self.go.release()  # let generate() return after its last token
        self.thread.join()
        return self.out

    def run(self, prompt: list[int], new_tokens: int) -> dict:
        """Whole generate() calls, as users run it: TTFT = a one-token generate."""
        ids = self.torch.tensor([prompt])
        times, tokens = [], None
        for new in (1, new_tokens):
            t0 = time.perf_counter()
            with self.torch.inference_mode():
                seq = self.model.generate(
                    ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
                )
            times.append(time.perf_counter() - t0)
            tokens = seq[0, len(prompt) :].tolist()
        return {"ttft_s": times[0], "decode_s": max(times[1] - times[0], 1e-9), "tokens": tokens}


def serve_child(spec_file: str) -> None:
    """Commands on stdin, one JSON per line: start (prefill and the first token), step (one
    more token), finish (the tokens), so the parent can interleave the runtimes' steps."""
    spec = json.loads(Path(spec_file).read_text())
    runner = {"moe2edge": Moe2edge, "genai": Genai, "hf": HfEager}[spec["kind"]](spec)
    print("READY", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        t0 = time.perf_counter()
        if cmd["cmd"] == "start":
            runner.start(cmd["prompt"], cmd["new_tokens"])
            out = {"s": time.perf_counter() - t0}
        elif cmd["cmd"] == "step":
            runner.step()
            out = {"s": time.perf_counter() - t0}
        elif cmd["cmd"] == "finish":
            out = {"tokens": runner.finish()}
        elif cmd["cmd"] == "generate" and not isinstance(runner, HfEager):
            # a whole generation, steps back to back (as a user runs it)
            runner.start(cmd["prompt"], cmd["new_tokens"])
            t1 = time.perf_counter()
            for _ in range(cmd["new_tokens"] - 1):
                runner.step()
            out = {"ttft_s": t1 - t0, "decode_s": time.perf_counter() - t1}
            out["tokens"] = runner.finish()
        else:
            out = runner.run(cmd["prompt"], cmd["new_tokens"])
        out["peak_rss_mb"] = peak_rss_mb()
        out["torch_in_sys_modules"] = "torch" in sys.modules
        print("RESULT " + json.dumps(out), flush=True)


class Child:
    """One runtime in its own process, driven over stdin/stdout."""

    def __init__(self, name: str, spec: dict, work: Path):
        self.name = name
        spec_file = work / f"spec_{name}.json"
        spec_file.write_text(json.dumps(spec))
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child", str(spec_file)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        )  # fmt: skip
        self._read("READY")
        self.peak_rss_mb, self.torch_loaded = 0.0, False

    def _read(self, marker: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(marker):
                return line[len(marker) :].strip()
        raise RuntimeError(f"{self.name} exited (code {self.proc.wait()}) before {marker}")

    def __call__(self, cmd: str, **kwargs) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kwargs}) + "\n")
        self.proc.stdin.flush()
        out = json.loads(self._read("RESULT "))
        self.peak_rss_mb = max(self.peak_rss_mb, out["peak_rss_mb"])
        self.torch_loaded |= out["torch_in_sys_modules"]
        return out

    def generation(self, prompt: list[int], new_tokens: int) -> dict:
        """A whole generation of a stepped runtime, not interleaved (warm-up)."""
        self("start", prompt=prompt, new_tokens=new_tokens)
        for _ in range(new_tokens - 1):
            self("step")
        return self("finish")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def interleaved(
    children: list[Child], prompt: list[int], new_tokens: int, rng: np.random.Generator
) -> dict[str, dict]:
    """Prefill on each runtime in turn, then their decode steps one at a time in lockstep:
    whatever else the machine does falls on all of them alike. The order is shuffled for
    every step, so no runtime always runs right after the same other one (caches, a
    neighbour's worker threads still spinning)."""
    out = {}
    for i in rng.permutation(len(children)):
        child = children[i]
        out[child.name] = {"ttft_s": child("start", prompt=prompt, new_tokens=new_tokens)["s"]}
        out[child.name]["decode_s"] = 0.0
    for _ in range(new_tokens - 1):
        for i in rng.permutation(len(children)):
            child = children[i]
            time.sleep(SETTLE_S)  # the previous runtime's spinning workers go idle first
            out[child.name]["decode_s"] += child("step")["s"]
    for child in children:
        out[child.name]["tokens"] = child("finish")["tokens"]
    return out


# --- parent: build, measure, compare ----------------------------------------------------------


def prepare(work: Path, seed: int) -> dict[str, Path]:
    """The random 100M student, the builder's fp32/int4 outputs and our bundles (cached)."""
    student = work / "student"
    paths = {
        "student": student,
        **{f"genai_{p}": work / f"genai_{p}" for p in ("fp32", "int4")},
        **{f"moe2edge_{p}": work / f"bundle_{p}" for p in ("fp32", "int4")},
    }
    sources = [paths[k] for k in ("student", "genai_fp32", "genai_int4")]
    bundles = {p: paths[f"moe2edge_{p}"] for p in ("fp32", "int4")}
    if all(p.exists() for p in sources) and all(p.exists() for p in bundles.values()):
        return paths
    from moe2edge.export.genai_graph import export_fast, run_builder

    if not all(p.exists() for p in sources):
        import torch

        from moe2edge.distill.demo_data import write_demo_data
        from moe2edge.distill.pipeline import make_tokenizer
        from moe2edge.distill.student import build_student
        from moe2edge.distill.tokenizer import load_tokenizer

        torch.set_num_threads(os.cpu_count() or 1)
        data = write_demo_data(work / "data", seed=seed, train_size=400, eval_size=4)
        make_tokenizer(data["train"], work / "tokenizer", vocab_size=320)
        tokenizer = load_tokenizer(work / "tokenizer")
        # one text token per id of the model's vocabulary, so every id the random model
        # emits streams as text (the server's chunks, and their gaps, are then per token)
        tokenizer.add_tokens([f"<t{i}>" for i in range(len(tokenizer), VOCAB)])
        model = build_student("100m", vocab_size=VOCAB, seed=seed)
        model.save_pretrained(student)
        tokenizer.save_pretrained(student)
        n = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"student: {n:.1f}M parameters", file=sys.stderr)
        run_builder(student, {p: paths[f"genai_{p}"] for p in ("fp32", "int4")})
    for precision, bundle in bundles.items():
        src = paths[f"genai_{precision}"]
        export_fast(student, bundle, precision, builder_dir=src, overwrite=True)
    return paths


def memory_bandwidth_gb_s(mib: int = 256, repeats: int = 5) -> dict[str, float]:
    """Read bandwidth (sum of a large array, 1 and all threads) and copy bandwidth, GB/s."""
    a = np.ones(mib * (1 << 20) // 4, dtype=np.float32)
    b = np.empty_like(a)
    threads = os.cpu_count() or 1

    def best(fn, nbytes: int) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return nbytes / min(times) / 1e9

    def parallel_sum() -> None:
        parts = np.array_split(a, threads)
        workers = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    return {
        "read_1_thread": best(lambda: a.sum(), a.nbytes),
        f"read_{threads}_threads": best(parallel_sum, a.nbytes),
        "copy": best(lambda: np.copyto(b, a), 2 * a.nbytes),
    }


def weight_bytes_per_token(model_path: Path) -> int:
    """Bytes of initializers a decode step reads: all, except tables only gathered from
    (the embedding), of which one row is read."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    users: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, set()).add(node.op_type)
    total = 0
    for init in model.graph.initializer:
        dims = list(init.dims)
        size = int(np.prod(dims)) if dims else 1
        nbytes = size * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        if users.get(init.name) == {"Gather"} and len(dims) == 2:
            nbytes = dims[1] * nbytes // size  # one row of the table
        total += nbytes
    return total


def count_params(safetensors_file: Path) -> int:
    with open(safetensors_file, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return sum(int(np.prod(v["shape"])) for k, v in header.items() if k != "__metadata__")


def child_spec(name: str, paths: dict[str, Path], args) -> dict:
    """``name`` is a runtime, optionally ``@THREADS`` (e.g. ``genai_int4@2``)."""
    base, _, at = name.partition("@")
    kind = "hf" if base.startswith("hf") else base.split("_")[0]
    threads = {"moe2edge": args.threads, "genai": args.genai_threads, "hf": args.threads}[kind]
    threads = int(at) if at else threads
    path = paths["student"] if kind == "hf" else paths[base]
    spinning = {"moe2edge": args.spinning, "genai": args.genai_spinning, "hf": None}[kind]
    return {"kind": kind, "path": str(path), "threads": threads, "spinning": spinning}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-runtime"))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="rounds (even: balanced order)")
    parser.add_argument("--prompt-lengths", default="16,128,512")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="ORT intra-op / torch threads"
    )
    parser.add_argument(
        "--genai-threads",
        type=int,
        default=None,
        help="onnxruntime-genai's intra-op threads (default: --threads; 0: genai's own default)",
    )
    parser.add_argument(
        "--spinning",
        choices=["run", "on", "off"],
        default="run",
        help="our engine's ORT workers between operators: spin while a step runs (run: the "
        "engine's default), spin on after it too (on: ORT's default) or sleep (off)",
    )
    parser.add_argument(
        "--genai-spinning",
        choices=["default", "run", "on", "off"],
        default="default",
        help="the same for onnxruntime-genai (default: its own, which is ORT's: on)",
    )
    parser.add_argument(
        "--schedule",
        choices=["burst", "lockstep"],
        default="burst",
        help="burst: each runtime runs whole generations, steps back to back, the runtimes "
        "taking turns in a shuffled order; lockstep: one decode step of each in turn",
    )
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument(
        "--hf-stepped", action="store_true", help="step transformers in the lockstep too"
    )
    parser.add_argument(
        "--concurrency", default="1,2,4,8", help="concurrent HTTP streams to measure ('': none)"
    )
    parser.add_argument(
        "--concurrency-rounds", type=int, default=4, help="replies per stream, in a row"
    )
    # long enough that a measurement is seconds, not the ramp-up of the streams (64 tokens
    # x 2 rounds took 0.7-3 s at int4, and its 8-stream figure moved by 15% between runs)
    parser.add_argument("--concurrency-new-tokens", type=int, default=128)
    parser.add_argument(
        "--concurrency-speculate",
        default="off",
        help="the servers' speculative decoding, comma-separated: off (key concurrency), "
        "ngram (key concurrency_ngram)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json", default=str(ROOT / "bench/results/runtime.json"), help="'' : print only"
    )
    # the speculative / prefix_reuse sections (bench/speculative.py)
    parser.add_argument("--spec-fp32", help="a trained student's fp32 bundle (speculative_demo)")
    parser.add_argument("--spec-int4", help="its int4 bundle")
    parser.add_argument("--spec-draft", help="its draft bundle (omit: prompt lookup only)")
    # a demo student's reply takes ~3 ms: 2 rounds of 8 prompts moved its ratios by 2x
    parser.add_argument("--spec-demo-repeats", type=int, default=20, help="its rounds")
    parser.add_argument("--spec-genai-fp32", help="genai's bundle of --spec-fp32 (its builder dir)")
    parser.add_argument("--spec-genai-int4", help="genai's bundle of --spec-int4")
    parser.add_argument("--history-tokens", type=int, default=256, help="prefix_reuse history")
    parser.add_argument("--skip-spec", action="store_true", help="no speculative/prefix_reuse")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return serve_child(args.child)
    if args.genai_threads is None:
        args.genai_threads = args.threads

    started = time.time()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    paths = prepare(work, args.seed)
    rng = np.random.default_rng(args.seed)
    lengths = [int(x) for x in args.prompt_lengths.split(",")]
    prompts = [[int(t) for t in rng.integers(3, VOCAB, n)] for n in lengths]
    names = args.runtimes.split(",")
    bandwidth = memory_bandwidth_gb_s()
    samples: dict[str, list[dict]] = {n: [] for n in names}
    peak_rss = dict.fromkeys(names, 0.0)
    torch_in_ours = False
    order_rng = np.random.default_rng(args.seed)
    # transformers runs whole generate() calls after each prompt's lockstep: stepping it
    # through its streamer hook measured 15-20% slower than generate() alone (thread
    # hand-offs, OpenMP teams waking), more under load; --hf-stepped steps it anyway
    whole = set() if args.hf_stepped else {n for n in names if n.startswith("hf")}
    for round_ in range(args.repeats):
        # fresh processes every round, started in alternating order: the process started
        # first measured up to ~15% slower here, whatever ran in it
        spawn = names if round_ % 2 == 0 else names[::-1]
        children = [Child(n, child_spec(n, paths, args), work) for n in spawn]
        for child in children:
            child.generation(prompts[0][:8], 4)  # warm-up: first-run allocations, not measured
        for prompt in prompts:
            if args.schedule == "burst":
                for i in order_rng.permutation(len(children)):
                    child = children[i]
                    cmd = "run" if child.name in whole else "generate"
                    time.sleep(BURST_SETTLE_S)
                    r = child(cmd, prompt=prompt, new_tokens=args.new_tokens)
                    samples[child.name].append({**r, "round": round_, "length": len(prompt)})
                continue
            stepped = [c for c in children if c.name not in whole]
            for name, r in interleaved(stepped, prompt, args.new_tokens, order_rng).items():
                samples[name].append({**r, "round": round_, "length": len(prompt)})
            for child in (c for c in children if c.name in whole):
                r = child("run", prompt=prompt, new_tokens=args.new_tokens)
                samples[child.name].append({**r, "round": round_, "length": len(prompt)})
        for child in children:
            child.close()
            peak_rss[child.name] = max(peak_rss[child.name], child.peak_rss_mb)
            torch_in_ours |= child.name.startswith("moe2edge") and child.torch_loaded
        print(f"round {round_} done after {time.time() - started:.0f} s", file=sys.stderr)
    result = summarize(samples, names, lengths, bandwidth, paths, args, started)
    result["peak_rss_mb"] = {n: round(v, 1) for n, v in peak_rss.items()}
    result["moe2edge_torch_free"] = not torch_in_ours
    if args.concurrency:
        from concurrency import measure as measure_concurrency  # bench/concurrency.py

        streams = [int(n) for n in args.concurrency.split(",")]
        for speculate in args.concurrency_speculate.split(","):
            key = "concurrency" if speculate == "off" else f"concurrency_{speculate}"
            result[key] = {
                p: measure_concurrency(
                    paths[f"moe2edge_{p}"],
                    streams,
                    args.concurrency_new_tokens,
                    args.concurrency_rounds,
                    args.threads,
                    speculate,
                )
                for p in ("fp32", "int4")
            }
    if not args.skip_spec:
        from speculative import measure as measure_speculative  # bench/speculative.py
        from speculative import spec_vs_genai

        # the 100M random student (it never ends a reply): prompt lookup, and prefix reuse
        random_student = measure_speculative(
            {p: paths[f"moe2edge_{p}"] for p in ("fp32", "int4")},
            None,
            args.threads,
            args.repeats,
            args.new_tokens,
            args.history_tokens,
            ignore_eos=True,
            genai={p: paths[f"genai_{p}"] for p in ("fp32", "int4")},
        )
        result.update(random_student)
        sections = ["speculative"]
        student = {"fp32": args.spec_fp32, "int4": args.spec_int4}
        if any(student.values()):  # a trained student (the demo domain's), with its draft
            given = {"fp32": args.spec_genai_fp32, "int4": args.spec_genai_int4}
            demo = measure_speculative(
                {p: b for p, b in student.items() if b},
                args.spec_draft,
                args.threads,
                args.spec_demo_repeats,
                args.new_tokens,
                genai={p: g for p, g in given.items() if g},
                prefix_reuse=False,
            )
            result["speculative_demo"] = demo["speculative"]
            sections.append("speculative_demo")
        for key in sections:
            versus = spec_vs_genai(result[key], suffix=key.removeprefix("speculative"))
            result[key]["vs_genai"] = versus
            result.setdefault("speedup", {}).update(versus["speedup"])
    print(json.dumps(result))
    if args.json:
        from moe2edge.fileio import atomic_write_json

        atomic_write_json(args.json, result)


def summarize(samples, names, lengths, bandwidth, paths, args, started) -> dict:
    bw = max(bandwidth.values())
    floor = {
        p: round(
            weight_bytes_per_token(paths[f"moe2edge_{p}"] / "model.onnx") / (bw * 1e9) * 1000, 3
        )
        for p in ("fp32", "int4")
    }

    def per_round(name: str) -> list[float]:
        """decode tok/s of each round: its tokens over its time, all prompt lengths together."""
        out = []
        for r in sorted({s["round"] for s in samples[name]}):
            rs = [s for s in samples[name] if s["round"] == r]
            out.append(len(rs) * (args.new_tokens - 1) / sum(s["decode_s"] for s in rs))
        return out

    def ttft(name: str, length: int) -> float:
        values = [s["ttft_s"] * 1000 for s in samples[name] if s["length"] == length]
        return round(statistics.median(values), 2)

    def tokens(name: str) -> dict[int, list[int]] | None:
        if name not in samples:
            return None
        return {s["length"]: s["tokens"] for s in samples[name] if s["round"] == 0}

    rounds = {n: per_round(n) for n in names}
    decode = {n: round(statistics.median(rounds[n]), 2) for n in names}
    pairs = (
        ("moe2edge_vs_genai_fp32", "moe2edge_fp32", "genai_fp32"),
        ("moe2edge_vs_genai_int4", "moe2edge_int4", "genai_int4"),
        ("moe2edge_vs_hf_eager_fp32", "moe2edge_fp32", "hf_eager_fp32"),
    )
    return {
        "decode_tok_s": decode,
        "ttft_ms": {n: {str(p): ttft(n, p) for p in lengths} for n in names},
        "bandwidth_gb_s": round(bw, 2),
        "floor_ms_per_token": floor,
        "ratio_to_floor": {
            n: round(1000 / decode[n] / floor["int4" if n.endswith("int4") else "fp32"], 2)
            for n in names
        },
        "speedup": {
            k: round(decode[a] / decode[b], 3) for k, a, b in pairs if a in decode and b in decode
        },
        "decode_tok_s_rounds": {n: [round(x, 2) for x in rounds[n]] for n in names},
        "bandwidth_detail_gb_s": {k: round(v, 2) for k, v in bandwidth.items()},
        "greedy_equals_pytorch_fp32": (
            tokens("moe2edge_fp32") == tokens("hf_eager_fp32")
            if "moe2edge_fp32" in samples and "hf_eager_fp32" in samples
            else None
        ),
        "greedy_equals_genai": {
            p: tokens(f"moe2edge_{p}") == tokens(f"genai_{p}")
            for p in ("fp32", "int4")
            if f"moe2edge_{p}" in samples and f"genai_{p}" in samples
        },
        "setup": {
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "schedule": args.schedule,
            "interleaving": (
                "whole generations, runtimes in a shuffled order for every prompt"
                if args.schedule == "burst"
                else "ORT decode steps in lockstep, order shuffled every step; "
                + ("transformers stepped too" if args.hf_stepped else "transformers: whole runs")
            ),
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "prompt_lengths": lengths,
            "threads": args.threads,
            "moe2edge_spinning": args.spinning,
            "genai_spinning": args.genai_spinning,
            "genai_threads": args.genai_threads or "genai default",
            "cpu_count": os.cpu_count(),
            "student": "moe2edge.distill.student preset 100m, random init, vocab 16384",
            "params_m": round(count_params(paths["student"] / "model.safetensors") / 1e6, 1),
            "total_s": round(time.time() - started, 1),
        },
    }


if __name__ == "__main__":
    main()
