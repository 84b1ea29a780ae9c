"""A native TensorRT runner for plans built by ``moe2edge.runtime.tensorrt.build`` (``build-engine``).

Same API as ``OnnxEngine`` (``manifest``, ``max_length``, ``new_cache``, ``forward``), so
``Generator`` and ``Conversation`` run on it unchanged, plus ``forward_batch`` for several
sequences of different lengths in one step. The plan comes from optimum's graph (the past
comes in, a present ``new`` positions longer goes out), so a step reads the past from one
device buffer and TensorRT writes the present into another.

Device KV buffers are immutable once written and shared by reference count: ``copy()``
of a cache costs nothing, ``truncate`` only masks the positions it forgets, and a step
always writes a fresh buffer (recycled from a small pool). When the rows of a step are
not laid out as the last step wrote them (a cache joins or leaves a batch, or holes must
be squeezed out to fit the context), their real positions are gathered into one buffer,
left-padded to the longest row; otherwise nothing is copied. The layout logic, the
binding plan and the profile choice are in ``moe2edge.runtime.tensorrt.binding``.

Each optimization profile (prefill, decode) has its own execution context, CUDA stream
and scratch buffers, selected once when the engine is opened. The ``trt.Runtime`` is kept
for as long as the engine. Device memory goes through the CUDA runtime (``libcudart``)
with ctypes: no torch, no pycuda. ``tensorrt`` is imported only when an engine is opened.
The plan must have been built on this GPU with this TensorRT
(``check_engine_matches_device``) from this bundle's model (``check_engine_matches_bundle``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moe2edge.runtime.errors import BundleError, ContextOverflowError
from moe2edge.runtime.kv_cache import KVCache
from moe2edge.runtime.manifest import read_manifest, verify_bundle
from moe2edge.runtime.tensorrt.binding import (
    StepPlan,
    binding_plan,
    check_call,
    next_chunk,
    plan_step,
    ranges_from_shapes,
    valid_runs,
)
from moe2edge.runtime.tensorrt.device import TensorRTUnavailable, device_info, import_tensorrt
from moe2edge.runtime.tensorrt.plan import (
    ENGINE_MANIFEST,
    check_engine_matches_bundle,
    check_engine_matches_device,
    read_engine_manifest,
    read_plan,
)

log = logging.getLogger(__name__)

H2D, D2H, D2D = 1, 2, 3  # cudaMemcpyKind
POOL_SIZE = 4  # free KV buffers kept for reuse


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

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise BundleError(f"CUDA call {what} failed with error {rc}")

    def new_stream(self) -> int:
        stream = ctypes.c_void_p()
        self.check(self.lib.cudaStreamCreate(ctypes.byref(stream)), "cudaStreamCreate")
        return stream.value or 0

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self.check(
            self.lib.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, 1))), "cudaMalloc"
        )
        return int(ptr.value)

    def free(self, ptr: int) -> None:
        self.lib.cudaFree(ctypes.c_void_p(ptr))

    def copy(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        if nbytes:
            rc = self.lib.cudaMemcpyAsync(
                ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes), kind,
                ctypes.c_void_p(stream),
            )  # fmt: skip
            self.check(rc, "cudaMemcpyAsync")

    def copy_2d(
        self, dst: int, dpitch: int, src: int, spitch: int, width: int, rows: int, kind: int,
        stream: int,
    ) -> None:  # fmt: skip
        if width and rows:
            rc = self.lib.cudaMemcpy2DAsync(
                ctypes.c_void_p(dst), ctypes.c_size_t(dpitch), ctypes.c_void_p(src),
                ctypes.c_size_t(spitch), ctypes.c_size_t(width), ctypes.c_size_t(rows), kind,
                ctypes.c_void_p(stream),
            )  # fmt: skip
            self.check(rc, "cudaMemcpy2DAsync")

    def sync(self, stream: int) -> None:
        self.check(self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)), "sync")


class DeviceKV:
    """Keys and values of up to ``capacity`` rows of ``max_length`` positions per layer,
    laid out (rows, kv heads, slots, head dim) as the step that wrote them left them.
    Never written again while a cache points at it (``users``)."""

    def __init__(self, runner: TensorRTEngine, capacity: int):
        self.cuda, self.capacity = runner.cuda, capacity
        nbytes = runner.kv_bytes(runner.max_length) * capacity
        self.keys = [self.cuda.malloc(nbytes) for _ in range(runner.num_layers)]
        self.values = [self.cuda.malloc(nbytes) for _ in range(runner.num_layers)]
        self.rows, self.slots, self.users = 0, 0, 0

    def free(self) -> None:
        for ptr in self.keys + self.values:
            self.cuda.free(ptr)
        self.keys, self.values = [], []


class TrtCacheState:
    """Where a cache's KV lives: row ``row`` of ``kv``; ``valid`` marks which of the
    ``len(valid)`` stored positions are real (truncation and padding leave holes)."""

    def __init__(self, runner: TensorRTEngine):
        self.runner, self.kv, self.row = runner, None, 0
        self.valid = np.zeros(0, dtype=bool)

    def point(self, kv: DeviceKV | None, row: int, valid: np.ndarray) -> None:
        with self.runner._pool_lock:
            if kv is not None:
                kv.users += 1
            old, self.kv, self.row, self.valid = self.kv, kv, row, valid
            if old is not None:
                self.runner._release(old)

    def share(self, clone: KVCache) -> TrtCacheState:
        state = TrtCacheState(self.runner)
        state.point(self.kv, self.row, self.valid.copy())
        return state

    def truncate(self, cache: KVCache, length: int) -> None:
        valid = self.valid.copy()
        valid[np.flatnonzero(valid)[length:]] = False
        self.valid = valid

    def __del__(self) -> None:
        if getattr(self, "kv", None) is not None:
            try:
                self.point(None, 0, np.zeros(0, dtype=bool))
            except Exception:  # interpreter shutdown: the process frees the GPU anyway
                pass


class ProfileContext:
    """One execution context with its optimization profile, stream and scratch buffers."""

    def __init__(self, runner: TensorRTEngine, index: int, ranges: dict[str, tuple[int, ...]]):
        cuda, self.index, self.ranges = runner.cuda, index, ranges
        self.context = runner.engine.create_execution_context()
        if self.context is None:
            raise BundleError("TensorRT could not create an execution context (GPU memory?)")
        self.stream = cuda.new_stream()
        check_call(
            self.context.set_optimization_profile_async(index, self.stream),
            f"set_optimization_profile_async({index})",
        )
        tokens = ranges["batch"][2] * ranges["new"][2]
        self.ids = cuda.malloc(tokens * 8)
        self.positions = cuda.malloc(tokens * 8)
        self.mask = cuda.malloc(ranges["batch"][2] * runner.max_length * 8)
        self.logits = cuda.malloc(tokens * runner.vocab_size * runner.logits_dtype.itemsize)
        self.lock = threading.Lock()


class TensorRTEngine:
    """Runs a TensorRT plan of a bundle's decoder with KV caches on the GPU."""

    def __init__(
        self,
        bundle_dir: str | Path,
        engine_dir: str | Path | None = None,
        verify: bool = True,
        max_length: int | None = None,
        cuda: Any = None,
    ):
        self.bundle_dir = Path(bundle_dir)
        self.manifest = verify_bundle(bundle_dir) if verify else read_manifest(bundle_dir)
        engine_dir = Path(engine_dir) if engine_dir else self.bundle_dir / "engine"
        if not (engine_dir / ENGINE_MANIFEST).is_file():
            raise BundleError(
                f"no TensorRT engine at {engine_dir}: build it on this device with "
                f"`moe2edge jetson build-engine {bundle_dir}`"
            )
        self.engine_meta = read_engine_manifest(engine_dir)
        check_engine_matches_bundle(self.engine_meta, self.manifest)
        check_engine_matches_device(self.engine_meta, device_info())
        trt = self.trt = import_tensorrt()
        self.kv = self.manifest["io"]["kv_cache"]
        if self.kv.get("shared_buffer"):
            raise BundleError(
                "this bundle's graph uses ONNX Runtime's in-place KV cache (com.microsoft ops); "
                "TensorRT engines are built from optimum's graph (`moe2edge export onnx`)"
            )
        self.num_layers = int(self.kv["num_layers"])
        self.kv_heads, self.head_dim = int(self.kv["num_kv_heads"]), int(self.kv["head_dim"])
        self.vocab_size = int(self.manifest["model"]["vocab_size"])
        self.cuda = cuda or Cuda()
        self.logger = trt.Logger(trt.Logger.WARNING)
        # The runtime must outlive every engine it deserializes: keep it as long as the engine.
        self.runtime = trt.Runtime(self.logger)
        plan = read_plan(engine_dir, self.engine_meta)  # size and sha256 checked
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BundleError(f"TensorRT could not load {engine_dir}: rebuild the engine here")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        self.plan = binding_plan(inputs, outputs, self.kv, self.num_layers)
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.logits_dtype = self.dtypes[self.plan.logits]
        self.kv_itemsize = self.dtypes[self.plan.past[0][0]].itemsize
        self.ranges = self._profile_ranges()
        built = max(r["past"][2] + r["new"][2] for r in self.ranges.values())
        self.max_length = min(int(max_length or built), built)
        self.max_batch = max(r["batch"][2] for r in self.ranges.values())
        self.max_prefill = max(r["new"][2] for r in self.ranges.values())
        self._pool_lock = threading.Lock()
        self._pool: list[DeviceKV] = []
        self.contexts = {
            name: ProfileContext(self, i, r)
            for i, (name, r) in enumerate(self.ranges.items())  # dicts keep profile order
        }

    def _profile_ranges(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """Each profile's batch/new/past ranges, read from the engine itself."""
        metas = self.engine_meta.get("profiles") or [{"name": "prefill"}]
        count = int(getattr(self.engine, "num_optimization_profiles", len(metas)))
        if count != len(metas):
            raise BundleError(
                f"engine.json lists {len(metas)} profiles, the plan has {count}: rebuild the engine"
            )
        return {
            meta["name"]: ranges_from_shapes(
                self.engine.get_tensor_profile_shape(self.plan.input_ids, i),
                self.engine.get_tensor_profile_shape(self.plan.past[0][0], i),
            )
            for i, meta in enumerate(metas)
        }

    def kv_bytes(self, positions: int) -> int:
        return self.kv_heads * positions * self.head_dim * self.kv_itemsize

    def new_cache(self) -> KVCache:
        cache = KVCache(keys=[], values=[])
        cache.storage = TrtCacheState(self)
        return cache

    # --- device buffers -------------------------------------------------------------

    def _take(self, rows: int) -> DeviceKV:
        with self._pool_lock:
            for i, kv in enumerate(self._pool):
                if kv.capacity >= rows:
                    return self._pool.pop(i)
        return DeviceKV(self, max(rows, 1))

    def _release(self, kv: DeviceKV) -> None:
        """Called under ``_pool_lock`` when a cache stops pointing at ``kv``."""
        kv.users -= 1
        if kv.users == 0:
            self._pool.append(kv)
            if len(self._pool) > POOL_SIZE:
                self._pool.pop(0).free()

    def _gather(self, states: list[TrtCacheState], stream: int) -> None:
        """Copy each row's real positions into one new buffer, left-padded to the longest."""
        lengths = [int(np.count_nonzero(s.valid)) for s in states]
        width = max(lengths)
        dst = self._take(len(states))
        dst.rows, dst.slots = len(states), width
        pos = self.head_dim * self.kv_itemsize  # bytes per position of one head
        for i, state in enumerate(states):
            src = state.kv
            if src is not None:
                at = width - lengths[i]
                for start, stop in valid_runs(state.valid):
                    for s_buf, d_buf in zip(
                        src.keys + src.values, dst.keys + dst.values, strict=True
                    ):
                        self.cuda.copy_2d(
                            d_buf + (i * self.kv_heads * width + at) * pos, width * pos,
                            s_buf + (state.row * self.kv_heads * src.slots + start) * pos,
                            src.slots * pos, (stop - start) * pos, self.kv_heads, D2D, stream,
                        )  # fmt: skip
                    at += stop - start
            valid = np.zeros(width, dtype=bool)
            valid[width - lengths[i] :] = True
            state.point(dst, i, valid)

    def _in_place(self, states: list[TrtCacheState]) -> bool:
        """True when the rows are already row 0..B-1 of one buffer, as the last step wrote it."""
        kv = states[0].kv
        if kv is None:
            return all(s.kv is None for s in states)
        return all(s.kv is kv and s.row == i for i, s in enumerate(states)) and (
            len(states) <= kv.rows
        )

    # --- steps ------------------------------------------------------------------------

    def forward(
        self, token_ids: Sequence[int], cache: KVCache, all_logits: bool = False
    ) -> np.ndarray:
        """Run ``token_ids`` after what ``cache`` holds (prefill in chunks the profiles
        allow); returns the last position's logits or all new ones."""
        out = self.forward_batch([token_ids], [cache], all_logits)
        return out[0]

    def forward_batch(
        self,
        rows: Sequence[Sequence[int]],
        caches: Sequence[KVCache],
        all_logits: bool = False,
    ) -> np.ndarray:
        """Run the same number of new tokens for each of several caches of any lengths.

        Returns (rows, vocab) last-position logits, or (rows, new, vocab) with ``all_logits``.
        """
        ids = [[int(t) for t in r] for r in rows]
        if len(ids) != len(caches) or not ids:
            raise ValueError(f"{len(ids)} token rows for {len(caches)} caches")
        n = len(ids[0])
        if n == 0 or any(len(r) != n for r in ids):
            raise ValueError("forward_batch() needs the same number (>= 1) of tokens per row")
        if len(caches) > self.max_batch:
            raise BundleError(
                f"{len(caches)} rows exceed the engine's batch of {self.max_batch}; rebuild it "
                "with a larger --max-batch"
            )
        if len({id(c) for c in caches}) != len(caches):
            raise ValueError("a cache appears twice in one batch")
        for cache in caches:
            if cache.length + n > self.max_length:
                raise ContextOverflowError(
                    f"{cache.length} cached + {n} new tokens exceed the engine's context of "
                    f"{self.max_length} tokens; start a new conversation or shorten the prompt"
                )
        outs, at = [], 0
        while at < n:
            logits, size = self._step([r[at:] for r in ids], caches, all_logits)
            outs.append(logits)
            at += size
        return np.concatenate(outs, axis=1) if all_logits else outs[-1]

    def _step(
        self, rows: list[list[int]], caches: Sequence[KVCache], all_logits: bool
    ) -> tuple[np.ndarray, int]:
        """One engine run over as many of ``rows``' tokens as a profile takes."""
        states: list[TrtCacheState] = [c.storage for c in caches]
        batch, remaining = len(rows), len(rows[0])
        slots = max(len(s.valid) for s in states)
        in_place = self._in_place(states) and all(len(s.valid) == slots for s in states)
        try:
            name, size = next_chunk(self.ranges, batch, slots, remaining, self.max_length)
        except BundleError:
            in_place = False  # squeezing out the holes may bring the past into a profile
        if not in_place or slots + size > self.max_length:
            length = max(int(np.count_nonzero(s.valid)) for s in states)
            name, size = next_chunk(self.ranges, batch, length, remaining, self.max_length)
            in_place = False
        ctx = self.contexts[name]
        with ctx.lock:
            if not in_place:
                self._gather(states, ctx.stream)
            step = plan_step(
                [s.valid for s in states], size, self.plan, self.kv_heads, self.head_dim
            )
            host = self._run(ctx, step, [r[:size] for r in rows], states, all_logits)
        for cache, row in zip(caches, rows, strict=True):
            cache.length += size
            cache.tokens.extend(row[:size])
        return host.astype(np.float32, copy=False), size

    def _run(
        self, ctx: ProfileContext, step: StepPlan, ids: list[list[int]],
        states: list[TrtCacheState], all_logits: bool,
    ) -> np.ndarray:  # fmt: skip
        dst = self._take(step.batch)
        dst.rows, dst.slots = step.batch, step.past + step.new
        try:
            host = self._execute(ctx, step, ids, states[0].kv, dst, all_logits)
        except BaseException:
            with self._pool_lock:
                dst.users += 1
                self._release(dst)  # back to the pool: nothing points at it
            raise
        for i, state in enumerate(states):
            state.point(dst, i, step.mask[i].astype(bool))
        return host

    def _execute(
        self, ctx: ProfileContext, step: StepPlan, ids: list[list[int]], src: DeviceKV | None,
        dst: DeviceKV, all_logits: bool,
    ) -> np.ndarray:  # fmt: skip
        """Bind every input and output (each call checked), run, copy the logits back."""
        context, plan, cuda, stream = ctx.context, self.plan, self.cuda, ctx.stream

        def bind(name: str, address: int) -> None:
            if name in step.shapes:
                shape = step.shapes[name]
                check_call(context.set_input_shape(name, shape), f"set_input_shape({name}, {shape})",
                           "outside the optimization profile")  # fmt: skip
            check_call(context.set_tensor_address(name, address), f"set_tensor_address({name})")

        def upload(name: str, array: np.ndarray, address: int) -> np.ndarray:
            host = np.ascontiguousarray(array, dtype=self.dtypes[name])
            cuda.copy(address, host.ctypes.data, host.nbytes, H2D, stream)
            bind(name, address)
            return host  # kept alive until the stream syncs

        keep = [upload(plan.input_ids, np.asarray(ids), ctx.ids)]
        if plan.attention_mask:
            keep.append(upload(plan.attention_mask, step.mask, ctx.mask))
        if plan.position_ids:
            keep.append(upload(plan.position_ids, step.positions, ctx.positions))
        for layer, ((pk, pv), (ok, ov)) in enumerate(zip(plan.past, plan.present, strict=True)):
            read = src if src is not None and step.past else dst  # an empty past: any address
            bind(pk, read.keys[layer])
            bind(pv, read.values[layer])
            bind(ok, dst.keys[layer])
            bind(ov, dst.values[layer])
        bind(plan.logits, ctx.logits)
        check_call(context.execute_async_v3(stream), "execute_async_v3")
        itemsize = self.logits_dtype.itemsize
        row_bytes = self.vocab_size * itemsize
        if all_logits:
            host = np.empty((step.batch, step.new, self.vocab_size), dtype=self.logits_dtype)
            cuda.copy(host.ctypes.data, ctx.logits, host.nbytes, D2H, stream)
        else:
            host = np.empty((step.batch, self.vocab_size), dtype=self.logits_dtype)
            cuda.copy_2d(host.ctypes.data, row_bytes, ctx.logits + (step.new - 1) * row_bytes,
                         step.new * row_bytes, row_bytes, step.batch, D2H, stream)  # fmt: skip
        cuda.sync(stream)
        del keep
        return host

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "tensorrt-native",
            "gpu": self.engine_meta.get("gpu_name"),
            "tensorrt": self.trt.__version__,
            "max_length": self.max_length,
            "max_prefill": self.max_prefill,
            "max_batch": self.max_batch,
            "profiles": self.ranges,
        }

    def close(self) -> None:
        """Free the device buffers, then the contexts, the engine and last the runtime."""
        for kv in getattr(self, "_pool", []):
            kv.free()
        self._pool = []
        self.contexts = {}
        self.engine = None
        self.runtime = None
