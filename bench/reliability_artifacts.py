"""Artifact reliability: SIGKILL mid-write, a full disk, and corrupted files, against the real
writers and loaders of bundles, TensorRT engines, teacher caches and checkpoints.

    python bench/reliability_artifacts.py [--faults 50] [--disk-full 10] [--mutations 500]

* ``faults``: each trial runs the writer in a child process (multiprocessing's forkserver:
  the modules are imported once, each child is a fresh fork) and SIGKILLs it at a time drawn
  uniformly over the writer's measured duration; the real loader then runs here. It must
  load a complete artifact equal to one the writer wrote (the old version or the new one), or
  refuse with a user error; then the writer runs again and must finish (resuming a cache or
  checkpoints, rebuilding a bundle or engine). ``corrupt_loaded`` counts loads of anything
  else.
* ``disk_full``: the writer runs in a child with RLIMIT_FSIZE (SIGXFSZ ignored, so a write
  fails with EFBIG) below its largest file. It must fail with a user error naming the path
  and the bytes needed (``clear_errors``), leave no temporary file, and leave nothing a
  loader accepts that is not a whole artifact (``corrupt_left``). A small tmpfs would need
  mount privileges this sandbox does not have.
* ``corruption``: mutations (bit flips, truncation, edited JSON, swapped files, ``../`` and
  absolute names, symlinks out, ``model_file`` not hashed, an altered plan, ...) of copies of
  intact artifacts, each opened with the real loader in this process: ``refused`` = a user
  error with a message, ``tracebacks`` = any other exception, ``accepted`` = it loaded.

The artifacts and their writers/loaders are in bench/_artifact_kit.py. Prints the JSON and
writes bench/results/reliability_artifacts.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # last: bench/gguf.py is no gguf
    sys.path.append(str(Path(__file__).resolve().parent))
import _artifact_kit as kit  # noqa: E402
from _corruptions import MUTATORS, STEP, mutate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "reliability_artifacts.json"
PRELOAD = ["torch", "onnx", "onnxruntime", "tokenizers", "moe2edge.export.bundle",
           "moe2edge.runtime.tensorrt.build", "moe2edge.distill.cache",
           "moe2edge.distill.checkpoint", "torch.distributed.checkpoint"]  # fmt: skip
os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported here or in the children
_CTX = None


def _context() -> mp.context.BaseContext:
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["_artifact_kit", *PRELOAD])
    return _CTX


def _child(kind: str, target: str, variant: int, conn, fsize: int | None) -> None:
    """The writer, in a child: report "start", write, report the duration or the error."""
    import logging

    logging.disable(logging.WARNING)
    if fsize is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.RLIM_INFINITY))
    kit.warm(kind)
    conn.send(("start", time.perf_counter()))
    start = time.perf_counter()
    try:
        kit.write(kind, Path(target), variant)
    except BaseException as exc:  # reported to the parent, which classifies it
        user = isinstance(exc, kit.user_errors())
        conn.send(("error", user, type(exc).__name__, str(exc)))
        return
    conn.send(("done", time.perf_counter() - start))


def _run_child(kind: str, target: Path, variant: int, kill_after: float | None = None,
               fsize: int | None = None) -> tuple:  # fmt: skip
    parent, child = _context().Pipe()
    proc = _context().Process(target=_child, args=(kind, str(target), variant, child, fsize))
    proc.start()
    try:
        if not parent.poll(120):
            raise RuntimeError(f"the {kind} writer did not start")
        parent.recv()
        if kill_after is not None:
            time.sleep(kill_after)
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.join()
                return ("killed",)
        proc.join(120)
        return parent.recv() if parent.poll(1) else ("killed",)
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()


def _prepare(kind: str, target: Path) -> dict[str, Any]:
    """What is on disk before the write under test: the old version (variant 0) for a bundle
    and an engine (over a variant 0 bundle), nothing for a cache or checkpoints."""
    kit.fresh_dir(target.parent)
    if kind == "engine":
        kit.write("bundle", target, 0)
        return {0: kit.write("engine", target, 0)}
    if kind == "bundle":
        return {0: kit.write("bundle", target, 0)}
    return {}


def _expected(kind: str, work: Path) -> tuple[dict[Any, dict], dict]:
    """What the loader sees of each complete version a trial may leave (the old one, the new
    one; every step for checkpoints), and of the final one a completed rerun must leave."""
    target = work / "reference" / kind
    if kind == "checkpoint":
        kit.fresh_dir(target.parent)
        digests = kit.write_checkpoint_artifact(target)["digests"]
        views = {step: {"step": step, "digest": d} for step, d in digests.items()}
        return views, views[max(views)]
    old = _prepare(kind, target)
    kit.write(kind, target, 1)
    final = kit.load(kind, target)
    views = {1: final}
    if old:
        ref0 = work / "reference0" / kind
        _prepare(kind, ref0)
        views[0] = kit.load(kind, ref0)
    return views, final


def _classify(kind: str, target: Path, views: dict) -> str:
    """loaded (a whole version), refused (a user error), corrupt (anything else loaded), or
    traceback (the loader failed with another exception)."""
    try:
        got = kit.load(kind, target)
    except kit.user_errors():
        return "refused"
    except Exception as exc:  # noqa: BLE001 - counted, with its type
        return f"traceback:{type(exc).__name__}: {str(exc)[:120]}"
    if kind == "bundle" and got["files"] != got["on_disk"]:
        return "corrupt"
    if kind == "checkpoint" and got["step"] == 0:
        return "nothing"  # no complete checkpoint yet: a fresh start
    return "loaded" if any(_same(got, v) for v in views.values()) else "corrupt"


def _same(got: dict, view: dict) -> bool:
    keys = [k for k in view if k != "finite"]
    return all(got.get(k) == view[k] for k in keys)


def _duration(kind: str, work: Path, runs: int = 2) -> float:
    times = []
    for n in range(runs):
        target = work / f"calibrate{n}" / kind
        _prepare(kind, target)
        result = _run_child(kind, target, 1)
        if result[0] != "done":
            raise RuntimeError(f"the {kind} writer failed: {result}")
        times.append(result[1])
    return max(times)


def faults(trials: int = 50, seed: int = 0) -> dict[str, Any]:
    """SIGKILL each writer ``trials`` times at a uniform time over its duration."""
    rng = random.Random(seed)
    per: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        work = Path(tmp)
        for kind in kit.KINDS:
            views, final = _expected(kind, work)
            duration = _duration(kind, work)
            outcomes: Counter = Counter()
            resumed = 0
            for trial in range(trials):
                target = work / f"t{trial}" / kind
                _prepare(kind, target)
                killed = _run_child(kind, target, 1, kill_after=rng.uniform(0, duration))
                outcomes["killed_mid_write"] += killed[0] == "killed"
                outcomes[_classify(kind, target, views).split(":")[0]] += 1
                again = _run_child(kind, target, 1)  # the next run resumes or rebuilds
                if again[0] == "done" and _classify(kind, target, {"final": final}) == "loaded":
                    resumed += 1
                shutil.rmtree(target.parent, ignore_errors=True)
            per[kind] = {"trials": trials, "writer_s": round(duration, 4), **outcomes,
                         "resumed_or_rebuilt": resumed}  # fmt: skip
    return {
        "trials": sum(p["trials"] for p in per.values()),
        "per_artifact": per,
        "corrupt_loaded": sum(p.get("corrupt", 0) for p in per.values()),
        "tracebacks": sum(p.get("traceback", 0) for p in per.values()),
        "resumed_or_rebuilt": sum(p["resumed_or_rebuilt"] for p in per.values()),
    }


def _largest_file(root: Path) -> int:
    return max((p.stat().st_size for p in root.rglob("*") if p.is_file()), default=1)


def disk_full(trials: int = 10, seed: int = 0) -> dict[str, Any]:
    """Each writer ``trials`` times under a file-size limit below its largest file."""
    rng = random.Random(seed)
    per: dict[str, Any] = {}
    examples: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="diskfull-") as tmp:
        work = Path(tmp)
        for kind in kit.KINDS:
            views, _ = _expected(kind, work)
            largest = _largest_file(work / "reference" / kind)
            counts: Counter = Counter()
            for trial in range(trials):
                target = work / f"t{trial}" / kind
                _prepare(kind, target)
                limit = int(largest * rng.uniform(0.05, 0.95))
                result = _run_child(kind, target, 1, fsize=limit)
                counts["failed"] += result[0] == "error"
                clear = result[0] == "error" and result[1] and _names_path_and_space(result[3])
                counts["clear_errors"] += bool(clear)
                if result[0] == "error":
                    examples.setdefault(kind, result[3][:400])
                outcome = _classify(kind, target, views).split(":")[0]
                counts["corrupt_left"] += outcome in ("corrupt", "traceback")
                counts["tmp_left"] += any(".tmp" in p.name for p in target.parent.rglob("*"))
                shutil.rmtree(target.parent, ignore_errors=True)
            per[kind] = {"trials": trials, **counts}
    return {
        "trials": sum(p["trials"] for p in per.values()),
        "corrupt_left": sum(p["corrupt_left"] for p in per.values()),
        "clear_errors": sum(p["clear_errors"] for p in per.values()),
        "tmp_left": sum(p["tmp_left"] for p in per.values()),
        "per_artifact": per,
        "example_errors": examples,
        "method": "RLIMIT_FSIZE in the writer's process (a tmpfs needs mount rights: not here)",
    }


def _names_path_and_space(message: str) -> bool:
    return "not enough space to write /" in message and "bytes" in message


def corruption(mutations: int = 500, seed: int = 0) -> dict[str, Any]:
    """``mutations`` corruptions, spread over every artifact file and kind of damage."""
    import logging

    logging.disable(logging.WARNING)
    rng = random.Random(seed)
    by_kind: dict[str, Counter] = {}
    tracebacks: list[str] = []
    accepted: list[str] = []
    messages: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="corrupt-") as tmp:
        work = Path(tmp)
        pristine = {kind: work / f"pristine-{kind}" / kind for kind in kit.KINDS}
        for kind, target in pristine.items():
            _prepare(kind, target)
            kit.write(kind, target, 1)
        controls = {}  # an undamaged copy must load, or "refused" would mean nothing
        for artifact, target in pristine.items():
            copy = work / "control" / artifact
            shutil.copytree(target, copy, symlinks=True)
            path = copy / STEP if artifact == "checkpoint" else None
            got = kit.load_checkpoint_artifact(copy, path) if path else kit.load(artifact, copy)
            controls[artifact] = bool(got)
        outside = work / "outside"
        outside.mkdir()
        plan = [MUTATORS[i % len(MUTATORS)] for i in range(mutations)]
        for n, (artifact, name, how) in enumerate(plan):
            copy = work / f"m{n}" / artifact
            shutil.copytree(pristine[artifact], copy, symlinks=True)
            what = mutate(copy, artifact, name, how, rng, outside)
            try:
                if artifact == "checkpoint":  # by its path: resume=auto would skip it
                    kit.load_checkpoint_artifact(copy, copy / STEP)
                else:
                    kit.load(artifact, copy)
                outcome = "accepted"
                accepted.append(what)
            except kit.user_errors() as exc:
                outcome = "refused" if str(exc).strip() else "no_message"
                messages.setdefault(f"{artifact}:{name}:{how}", str(exc)[:200])
            except Exception as exc:  # noqa: BLE001 - what the harness counts
                outcome = "traceback"
                tracebacks.append(f"{what}: {type(exc).__name__}: {str(exc)[:200]}")
            by_kind.setdefault(f"{artifact}:{name}:{how}", Counter())[outcome] += 1
            shutil.rmtree(copy.parent, ignore_errors=True)
    total = Counter()
    for counts in by_kind.values():
        total.update(counts)
    return {
        "mutations": mutations,
        "refused": total["refused"],
        "tracebacks": total["traceback"],
        "accepted": total["accepted"],
        "no_message": total["no_message"],
        "controls_loaded": controls,
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "example_messages": messages,
        "traceback_examples": tracebacks[:10],
        "accepted_examples": accepted[:10],
    }


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=50, help="SIGKILL trials per artifact")
    parser.add_argument("--disk-full", type=int, default=10, help="trials per artifact")
    parser.add_argument("--mutations", type=int, default=500)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = {
        "machine": machine(),
        "faults": faults(args.faults),
        "disk_full": disk_full(args.disk_full),
        "corruption": corruption(args.mutations),
    }
    result["seconds"] = round(time.perf_counter() - start, 1)
    from moe2edge.fileio import atomic_write_json

    atomic_write_json(RESULTS, result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
