"""Peak memory of one export step, measured in a fresh process.

``measure("moe2edge.export.quantize:quantize_bundle", parent, out, "fp16")`` runs the
function in a new Python process and returns its result with that process's peak
resident set size and wall time; ``peak_rss_ratio`` is that peak over the FP32 model's
bytes (``model_bytes``), the figure the issue bounds (<= 2.0 for every step).

The peak is ``VmHWM`` from ``/proc/self/status``: the high-water mark of the process's own
memory, which starts afresh at ``exec``. ``getrusage`` would not do: a child's
``ru_maxrss`` inherits the parent's size at fork. Elsewhere than Linux it falls back to
``ru_maxrss`` of the child itself.
"""

from __future__ import annotations

import importlib
import os
import pickle
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe2edge.export.errors import ExportError
from moe2edge.runtime.manifest import read_manifest


@dataclass
class Measured:
    result: Any
    peak_rss_bytes: int
    seconds: float

    def ratio(self, reference_bytes: int) -> float:
        """Peak RSS over ``reference_bytes`` (the FP32 model's: ``model_bytes``)."""
        return round(self.peak_rss_bytes / reference_bytes, 3)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def model_bytes(bundle_dir: str | Path) -> int:
    """Bytes of a bundle's ONNX model with its external data (the files the manifest lists)."""
    manifest = read_manifest(bundle_dir)
    model_file = manifest["io"]["model_file"]
    return sum(
        int(entry["bytes"])
        for name, entry in manifest["files"].items()
        if name == model_file or name.startswith(model_file)  # model.onnx_data, model.onnx.data
    )


def measure(target: str, *args: Any, **kwargs: Any) -> Measured:
    """Run ``target`` ("package.module:function") with picklable arguments in a new process."""
    import moe2edge

    root = str(Path(moe2edge.__file__).resolve().parent.parent)  # this checkout, not another
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory() as tmp:
        request, reply = Path(tmp) / "request.pkl", Path(tmp) / "reply.pkl"
        request.write_bytes(pickle.dumps((target, args, kwargs)))
        command = [sys.executable, "-m", "moe2edge.export.peak_rss", str(request), str(reply)]
        done = subprocess.run(command, env=env, check=False)
        if not reply.is_file():
            raise ExportError(
                f"{target} ended without a result (exit status {done.returncode}; "
                "-9 is the kernel's out-of-memory killer)"
            )
        ok, value, peak, seconds = pickle.loads(reply.read_bytes())
    if not ok:
        raise value
    return Measured(value, peak, seconds)


def _run(request: Path, reply: Path) -> None:
    target, args, kwargs = pickle.loads(request.read_bytes())
    module, _, name = target.partition(":")
    started = time.perf_counter()
    try:
        value, ok = getattr(importlib.import_module(module), name)(*args, **kwargs), True
    except Exception as exc:  # handed back to the caller, who raises it
        value, ok = exc, False
    seconds = round(time.perf_counter() - started, 2)
    try:
        data = pickle.dumps((ok, value, peak_rss_bytes(), seconds))
    except Exception:  # an exception or result that does not pickle: say what it was
        data = pickle.dumps((False, ExportError(f"{target}: {value!r}"), peak_rss_bytes(), seconds))
    reply.write_bytes(data)


if __name__ == "__main__":
    _run(Path(sys.argv[1]), Path(sys.argv[2]))
