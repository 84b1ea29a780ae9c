"""A native TensorRT runner for plans built by ``moe2edge.runtime.tensorrt.build`` (``build-engine``).

Same API as ``OnnxEngine`` (``manifest``, ``max_length``, ``new_cache``, ``forward``), so
``Generator`` and ``Conversation`` run on it unchanged. The plan comes from a bundle with
standard ONNX ops (optimum's graph: the past comes in, a present one position longer goes
out), so every cache keeps two device buffers per layer and side, each big enough for
``max_length`` positions, and alternates between them: the step reads the past from one and
TensorRT writes the present into the other. Nothing crosses to the host but the token ids,
positions and the last position's logits.

Device memory goes through the CUDA runtime (``libcudart``) with ctypes: no torch, no
pycuda. ``tensorrt`` is imported only when an engine is opened. The plan must have been
built on this GPU with this TensorRT (``check_engine_matches_device``) from this bundle's
model (``check_engine_matches_bundle``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moe2edge.runtime.errors import BundleError, ContextOverflowError
from moe2edge.runtime.kv_cache import KVCache
from moe2edge.runtime.manifest import read_manifest, verify_bundle
from moe2edge.runtime.tensorrt.device import TensorRTUnavailable, device_info, import_tensorrt
from moe2edge.runtime.tensorrt.plan import (
    ENGINE_MANIFEST,
    check_engine_matches_bundle,
    check_engine_matches_device,
)

log = logging.getLogger(__name__)

H2D, D2H, D2D = 1, 2, 3  # cudaMemcpyKind


class Cuda:
    """The few CUDA runtime calls the runner needs, through ctypes."""

    def __init__(self) -> None:
        names = [ctypes.util.find_library("cudart"), "libcudart.so", "libcudart.so.12"]
        names += ["libcudart.so.11.0"]
        for name in filter(None, names):
            try:
                self.lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        else:
            raise TensorRTUnavailable(
                "the CUDA runtime (libcudart) is not installed: the native TensorRT runner needs "
                "a CUDA GPU (on a Jetson it ships with JetPack)"
            )
        stream = ctypes.c_void_p()
        self.check(self.lib.cudaStreamCreate(ctypes.byref(stream)), "cudaStreamCreate")
        self.stream = stream.value or 0

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise BundleError(f"CUDA call {what} failed with error {rc}")

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self.check(
            self.lib.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, 1))), "cudaMalloc"
        )
        return int(ptr.value)

    def free(self, ptr: int) -> None:
        self.lib.cudaFree(ctypes.c_void_p(ptr))

    def copy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        if nbytes:
            rc = self.lib.cudaMemcpyAsync(
                ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes), kind,
                ctypes.c_void_p(self.stream),
            )  # fmt: skip
            self.check(rc, "cudaMemcpyAsync")

    def copy_2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, rows: int) -> None:
        rc = self.lib.cudaMemcpy2DAsync(
            ctypes.c_void_p(dst), ctypes.c_size_t(dpitch), ctypes.c_void_p(src),
            ctypes.c_size_t(spitch), ctypes.c_size_t(width), ctypes.c_size_t(rows), D2D,
            ctypes.c_void_p(self.stream),
        )  # fmt: skip
        self.check(rc, "cudaMemcpy2DAsync")

    def sync(self) -> None:
        self.check(self.lib.cudaStreamSynchronize(ctypes.c_void_p(self.stream)), "sync")


class DeviceKV:
    """Per-layer key and value buffers of ``capacity`` positions on the GPU (freed on GC)."""

    def __init__(self, runner: TensorRTEngine):
        self.cuda, nbytes = runner.cuda, runner.kv_bytes(runner.max_length)
        self.keys = [self.cuda.malloc(nbytes) for _ in range(runner.num_layers)]
        self.values = [self.cuda.malloc(nbytes) for _ in range(runner.num_layers)]
        self.shared = False  # read by more than one cache: never written again

    def __del__(self) -> None:
        for ptr in getattr(self, "keys", []) + getattr(self, "values", []):
            self.cuda.free(ptr)


class TrtCacheState:
    """A cache's device KV: ``current`` holds ``length`` positions contiguously, ``spare``
    is the private buffer the next step writes."""

    def __init__(self, runner: TensorRTEngine, current: DeviceKV | None = None):
        self.runner, self.current, self.spare = runner, current, None

    def share(self, clone: KVCache) -> TrtCacheState:
        if self.current is not None:
            self.current.shared = True
        return TrtCacheState(self.runner, self.current)

    def truncate(self, cache: KVCache, length: int) -> None:
        if self.current is not None:
            self.runner._relayout(self, cache.length, length)


class TensorRTEngine:
    """Runs a TensorRT plan of a bundle's decoder with a KV cache on the GPU."""

    def __init__(
        self,
        bundle_dir: str | Path,
        engine_dir: str | Path | None = None,
        verify: bool = True,
        max_length: int | None = None,
    ):
        self.bundle_dir = Path(bundle_dir)
        self.manifest = verify_bundle(bundle_dir) if verify else read_manifest(bundle_dir)
        engine_dir = Path(engine_dir) if engine_dir else self.bundle_dir / "engine"
        meta_path = engine_dir / ENGINE_MANIFEST
        if not meta_path.is_file():
            raise BundleError(
                f"no TensorRT engine at {engine_dir}: build it on this device with "
                f"`moe2edge jetson build-engine {bundle_dir}`"
            )
        self.engine_meta = json.loads(meta_path.read_text(encoding="utf-8"))
        check_engine_matches_bundle(self.engine_meta, self.manifest)
        check_engine_matches_device(self.engine_meta, device_info())
        trt = import_tensorrt()
        self.trt = trt
        io = self.manifest["io"]
        self.kv = io["kv_cache"]
        if self.kv.get("shared_buffer"):
            raise BundleError(
                "this bundle's graph uses ONNX Runtime's in-place KV cache (com.microsoft ops); "
                "TensorRT engines are built from optimum's graph (`moe2edge export onnx`)"
            )
        self.num_layers = int(self.kv["num_layers"])
        self.kv_heads, self.head_dim = int(self.kv["num_kv_heads"]), int(self.kv["head_dim"])
        self.cuda = Cuda()
        self.logger = trt.Logger(trt.Logger.WARNING)
        plan = (engine_dir / self.engine_meta["plan"]).read_bytes()
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BundleError(f"TensorRT could not load {engine_dir}: rebuild the engine here")
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = {
            n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
        }
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in self.names}
        self.profiles = {p["name"]: i for i, p in enumerate(self.engine_meta.get("profiles", []))}
        self.profile = -1
        past0 = self._name("past_key", 0)
        limit = self.engine.get_tensor_profile_shape(past0, self.profiles.get("prefill", 0))[2][2]
        self.max_length = min(int(max_length or limit + 1), int(limit) + 1)
        self.max_prefill = int(
            self.engine.get_tensor_profile_shape("input_ids", self.profiles.get("prefill", 0))[2][1]
        )
        self.kv_itemsize = self.dtypes[past0].itemsize
        self.vocab_size = int(self.manifest["model"]["vocab_size"])
        self._lock = threading.Lock()
        self._ids = self.cuda.malloc(self.max_prefill * 8)
        self._positions = self.cuda.malloc(self.max_prefill * 8)
        self._mask = self.cuda.malloc(self.max_length * 8)
        ones = np.ones(self.max_length, dtype=self.dtypes.get("attention_mask", np.int64))
        self.cuda.copy(self._mask, ones.ctypes.data, ones.nbytes, H2D)
        self._logits = self.cuda.malloc(self.max_prefill * self.vocab_size * 4)
        self.cuda.sync()

    def _name(self, kind: str, layer: int) -> str:
        return self.kv[kind].format(layer=layer)

    def kv_bytes(self, positions: int) -> int:
        return self.kv_heads * positions * self.head_dim * self.kv_itemsize

    def new_cache(self) -> KVCache:
        cache = KVCache(keys=[], values=[])
        cache.storage = TrtCacheState(self)
        return cache

    def _relayout(self, state: TrtCacheState, old: int, new: int) -> None:
        """Keep the first ``new`` of ``old`` positions: per-head rows get a shorter pitch."""
        dst = DeviceKV(self)
        src = state.current
        row, width = old * self.head_dim * self.kv_itemsize, new * self.head_dim * self.kv_itemsize
        with self._lock:
            for s, d in zip(src.keys + src.values, dst.keys + dst.values, strict=True):
                self.cuda.copy_2d(d, width, s, row, width, self.kv_heads)
            self.cuda.sync()
        state.current, state.spare = dst, None if src.shared else src

    def _set_profile(self, index: int) -> None:
        if index != self.profile:
            self.context.set_optimization_profile_async(index, self.cuda.stream)
            self.profile = index

    def forward(
        self, token_ids: Sequence[int], cache: KVCache, all_logits: bool = False
    ) -> np.ndarray:
        """Run ``token_ids`` after what ``cache`` holds (prefill in chunks of the plan's
        largest profile); returns the last position's logits or all new ones."""
        ids = [int(t) for t in token_ids]
        if not ids:
            raise ValueError("forward() needs at least one token")
        if cache.length + len(ids) > self.max_length:
            raise ContextOverflowError(
                f"{cache.length} cached + {len(ids)} new tokens exceed the engine's context of "
                f"{self.max_length} tokens; start a new conversation or shorten the prompt"
            )
        outs = []
        for at in range(0, len(ids), self.max_prefill):
            outs.append(self._step(ids[at : at + self.max_prefill], cache, all_logits))
        return np.concatenate(outs) if all_logits else outs[-1]

    def _step(self, ids: list[int], cache: KVCache, all_logits: bool) -> np.ndarray:
        state: TrtCacheState = cache.storage
        n, past = len(ids), cache.length
        if state.spare is None or state.spare.shared:
            state.spare = DeviceKV(self)
        src, dst = state.current, state.spare
        ctx, trt_names = self.context, self.inputs
        with self._lock:
            decode = n == 1 and past >= 1 and "decode" in self.profiles
            self._set_profile(
                self.profiles["decode"] if decode else self.profiles.get("prefill", 0)
            )
            host_ids = np.asarray(ids, dtype=self.dtypes["input_ids"])
            self.cuda.copy(self._ids, host_ids.ctypes.data, host_ids.nbytes, H2D)
            ctx.set_input_shape("input_ids", (1, n))
            ctx.set_tensor_address("input_ids", self._ids)
            if "attention_mask" in trt_names:
                ctx.set_input_shape("attention_mask", (1, past + n))
                ctx.set_tensor_address("attention_mask", self._mask)
            if "position_ids" in trt_names:
                pos = np.arange(past, past + n, dtype=self.dtypes["position_ids"])
                self.cuda.copy(self._positions, pos.ctypes.data, pos.nbytes, H2D)
                ctx.set_input_shape("position_ids", (1, n))
                ctx.set_tensor_address("position_ids", self._positions)
            shape = (1, self.kv_heads, past, self.head_dim)
            for layer in range(self.num_layers):
                for kind, i in (("key", 0), ("value", 1)):
                    read = (src.keys, src.values)[i][layer] if src is not None else dst.keys[0]
                    ctx.set_input_shape(self._name(f"past_{kind}", layer), shape)
                    ctx.set_tensor_address(self._name(f"past_{kind}", layer), read)
                    ctx.set_tensor_address(
                        self._name(f"present_{kind}", layer), (dst.keys, dst.values)[i][layer]
                    )
            ctx.set_tensor_address("logits", self._logits)
            if not ctx.execute_async_v3(self.cuda.stream):
                raise BundleError("TensorRT failed to run the engine (see its log above)")
            itemsize = self.dtypes["logits"].itemsize
            rows = n if all_logits else 1
            host = np.empty((rows, self.vocab_size), dtype=self.dtypes["logits"])
            offset = 0 if all_logits else (n - 1) * self.vocab_size * itemsize
            self.cuda.copy(host.ctypes.data, self._logits + offset, host.nbytes, D2H)
            self.cuda.sync()
        state.current = dst
        state.spare = None if (src is None or src.shared) else src
        cache.length += n
        cache.tokens.extend(ids)
        out = host.astype(np.float32, copy=False)
        return out if all_logits else out[0]

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "tensorrt-native",
            "gpu": self.engine_meta.get("gpu_name"),
            "tensorrt": self.trt.__version__,
            "max_length": self.max_length,
            "max_prefill": self.max_prefill,
        }
