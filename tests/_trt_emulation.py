"""A stand-in for TensorRT and the CUDA runtime on host memory, for the native runner's
layout logic where no GPU exists.

``HostCuda`` keeps "device" buffers in host memory (ctypes copies, 2D copies row by row,
and a count of device-to-device bytes). ``emulated_tensorrt`` returns a ``tensorrt``
module whose engine has the bundle's ONNX tensors and the build's profiles, and whose
execution context behaves like TensorRT 10's where the runner depends on it:
``set_input_shape`` returns False outside the selected profile, ``execute_async_v3``
returns False while an input or output is unbound or a shape unset, and the run reads
the bound addresses, runs the ONNX model in ONNX Runtime (CPU) and writes the outputs
to their addresses. The numerics are ONNX Runtime's, so what this checks is the runner:
which shapes, masks, positions and buffers it binds.
"""

from __future__ import annotations

import ctypes
import types
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort

ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


class HostCuda:
    def __init__(self) -> None:
        self.buffers: dict[int, np.ndarray] = {}
        self.bytes = Counter()  # cudaMemcpyKind -> bytes copied
        self._streams = 0

    def new_stream(self) -> int:
        self._streams += 1
        return self._streams

    def malloc(self, nbytes: int) -> int:
        buf = np.zeros(max(nbytes, 1), dtype=np.uint8)
        self.buffers[buf.ctypes.data] = buf
        return buf.ctypes.data

    def free(self, ptr: int) -> None:
        self.buffers.pop(ptr)

    def copy(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        ctypes.memmove(dst, src, nbytes)
        self.bytes[kind] += nbytes

    def copy_2d(self, dst, dpitch, src, spitch, width, rows, kind, stream) -> None:
        for r in range(rows):
            ctypes.memmove(dst + r * dpitch, src + r * spitch, width)
        self.bytes[kind] += width * rows

    def sync(self, stream: int) -> None:
        pass


def _host_array(address: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    count = int(np.prod(shape))
    raw = (ctypes.c_char * (count * np.dtype(dtype).itemsize)).from_address(address)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


class EmulatedContext:
    def __init__(self, engine: EmulatedEngine):
        self.engine, self.profile = engine, 0
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.calls = Counter()

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        if not 0 <= index < self.engine.num_optimization_profiles:
            return False
        self.profile, self.shapes = index, {}
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        self.calls["set_input_shape"] += 1
        if name in self.engine.refuse:
            return False
        lo, _, hi = self.engine.get_tensor_profile_shape(name, self.profile)
        shape = tuple(int(d) for d in shape)
        if len(shape) != len(lo) or any(
            not a <= d <= b for a, d, b in zip(lo, shape, hi, strict=True)
        ):
            return False
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        if name not in self.engine.dtypes or not address:
            return False
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream: int) -> bool:
        eng = self.engine
        if any(n not in self.addresses for n in eng.dtypes):
            return False
        if any(n not in self.shapes for n in eng.input_names):
            return False
        feeds = {
            n: _host_array(self.addresses[n], self.shapes[n], eng.dtypes[n]).copy()
            for n in eng.input_names
        }
        outs = eng.session.run(eng.output_names, feeds)
        for name, value in zip(eng.output_names, outs, strict=True):
            value = np.ascontiguousarray(value, dtype=eng.dtypes[name])
            ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
        eng.runs.append({n: self.shapes[n] for n in ("input_ids",)} | {"profile": self.profile})
        return True


class EmulatedEngine:
    def __init__(self, model: Path, profiles: list[dict], extra_inputs=(), refuse=()):
        self.session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()] + list(extra_inputs)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.dtypes = {i.name: ORT_TYPES[i.type] for i in self.session.get_inputs()}
        self.dtypes |= {o.name: ORT_TYPES[o.type] for o in self.session.get_outputs()}
        self.dtypes |= {n: np.int64 for n in extra_inputs}
        self.profiles, self.refuse, self.runs = profiles, set(refuse), []
        names = self.input_names + self.output_names
        self.num_io_tensors, self._names = len(names), names
        self.num_optimization_profiles = len(profiles)

    def get_tensor_name(self, i: int) -> str:
        return self._names[i]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name in self.input_names else "OUTPUT"

    def get_tensor_dtype(self, name: str):
        return self.dtypes[name]

    def get_tensor_profile_shape(self, name: str, index: int):
        return [tuple(s) for s in self.profiles[index]["shapes"][name]]

    def create_execution_context(self) -> EmulatedContext:
        ctx = EmulatedContext(self)
        self.contexts.append(ctx)
        return ctx

    contexts: list[EmulatedContext] = []


def emulated_tensorrt(model: Path, profiles: list[dict], **kwargs) -> types.SimpleNamespace:
    """A ``tensorrt`` module whose Runtime deserializes any plan into an EmulatedEngine."""
    state = {"engine": None, "runtimes": 0}

    class Runtime:
        def __init__(self, logger):
            state["runtimes"] += 1

        def deserialize_cuda_engine(self, plan: bytes) -> EmulatedEngine:
            engine = EmulatedEngine(model, profiles, **kwargs)
            engine.contexts = []
            state["engine"] = engine
            return engine

    class Logger:
        WARNING, VERBOSE = 2, 4

        def __init__(self, level):
            pass

    return types.SimpleNamespace(
        __version__="10.3.0",
        Logger=Logger,
        Runtime=Runtime,
        TensorIOMode=types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"),
        nptype=lambda dtype: dtype,
        state=state,
    )
