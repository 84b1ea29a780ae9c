"""The ONNX Runtime engine: one session over a bundle's decoder graph and its KV caches.

Two graph flavours, chosen from the manifest's ``io.kv_cache`` (see docs/runtime.md):

* **concat** (optimum's ``text-generation-with-past`` export): ``past_key_values.{i}.*`` in,
  ``present.{i}.*`` out, one position longer. The presents ORT allocates are bound as
  OrtValues and fed back as the next step's past: no numpy conversion of the cache.
* **shared buffer** (onnxruntime-genai's model builder, ``io.kv_cache.shared_buffer: true``):
  GroupQueryAttention reads and writes a ``[1, kv_heads, max_length, head_dim]`` buffer in
  place. The buffers are allocated once per cache and bound as both past and present. The
  attention's two lengths are graph inputs (``seqlens_k``, ``total_sequence_length``; older
  bundles: a mask, bound as a view of one row of ones as long as the positions filled): a
  decode step writes its token id and lengths into buffers bound once, binds nothing and
  allocates nothing.

Copies of a shared-buffer cache share storage (a copy is O(1)); a cache writes in place
unless another live copy holds positions it would overwrite, in which case it first takes
its own storage (copy on write). Use one cache (and its copies) from one thread at a time.
The engine is the only place that knows the graph's names; above it are token ids and logits.
``KVCache`` lives in ``kv_cache`` (shared with the TensorRT runner, which ``open_engine``
imports on use, so the dependency runs one way).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from moe2edge.runtime.errors import BundleError, ContextOverflowError
from moe2edge.runtime.kv_cache import KVCache
from moe2edge.runtime.manifest import read_manifest, verify_bundle

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
BACKENDS = (*PROVIDERS, "tensorrt-native")
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}
LOGITS_TO_KEEP = "num_logits_to_keep"  # optional graph input: logits of the last k positions
# optional graph inputs of the fast graph (moe2edge.export.genai_graph.feed_attention_lengths): the
# lengths GroupQueryAttention needs, fed instead of an attention mask
SEQLENS, TOTAL_LENGTH = "seqlens_k", "total_sequence_length"


def _float32(array: np.ndarray) -> np.ndarray:
    """A float32 copy the caller owns (fp16 graphs return fp16 logits)."""
    return array.astype(np.float32, copy=True)


class SharedStorage:
    """Per-layer KV buffers of ``capacity`` positions and the decode-step IO binding, shared
    by a cache and its copies. ``keys``/``values``: buffers to use instead of new ones (a
    row of a batch's buffers: ``moe2edge.runtime.batch``)."""

    def __init__(
        self,
        engine: OnnxEngine,
        capacity: int,
        keys: list[Any] | None = None,
        values: list[Any] | None = None,
    ):
        self.engine, self.capacity = engine, capacity
        self.keys = keys or [engine._alloc_kv(capacity) for _ in range(engine.num_layers)]
        self.values = values or [engine._alloc_kv(capacity) for _ in range(engine.num_layers)]
        self.step_ids = np.zeros((1, 1), dtype=np.int64)
        self.step_logits = np.zeros((1, 1, engine.vocab_size), dtype=engine.logits_dtype)
        # written before every run, bound once (graphs fed lengths instead of a mask)
        self.seqlens = np.zeros((1,), dtype=np.int32)
        self.total = np.zeros((), dtype=np.int32)
        self.sharers: weakref.WeakSet[KVCache] = weakref.WeakSet()
        self.lock = threading.RLock()
        self._decode_binding: ort.IOBinding | None = None

    def attach(self, cache: KVCache) -> None:
        with self.lock:
            self.sharers.add(cache)

    def share(self, clone: KVCache) -> SharedStorage:
        self.attach(clone)
        return self

    def truncate(self, cache: KVCache, length: int) -> None:
        """Nothing to move: positions past ``length`` lie beyond the next run's lengths (and
        are overwritten by it)."""

    def claimed_beyond(self, cache: KVCache, position: int) -> bool:
        """Does another live cache on this storage hold positions at or after ``position``?"""
        if len(self.sharers) <= 1:  # the decode hot path: no copies
            return False
        return any(c is not cache and c.length > position for c in list(self.sharers))

    def bind_kv(self, binding: ort.IOBinding) -> None:
        eng = self.engine
        for layer in range(eng.num_layers):
            for kind, bufs in (("key", self.keys), ("value", self.values)):
                value = eng._ortvalue(bufs[layer])
                binding.bind_ortvalue_input(eng._name(f"past_{kind}", layer), value)
                binding.bind_ortvalue_output(eng._name(f"present_{kind}", layer), value)

    def bind_lengths(self, binding: ort.IOBinding) -> None:
        if self.engine.direct_lengths:  # CPU OrtValues over the arrays: written, not rebound
            binding.bind_ortvalue_input(SEQLENS, ort.OrtValue.ortvalue_from_numpy(self.seqlens))
            binding.bind_ortvalue_input(TOTAL_LENGTH, ort.OrtValue.ortvalue_from_numpy(self.total))

    def decode_binding(self) -> ort.IOBinding:
        if self._decode_binding is None:
            eng = self.engine
            binding = eng.session.io_binding()
            self.bind_kv(binding)
            binding.bind_cpu_input("input_ids", self.step_ids)
            self.bind_lengths(binding)
            if eng.logits_to_keep:
                binding.bind_cpu_input(LOGITS_TO_KEEP, np.array(1, dtype=np.int64))
            binding.bind_ortvalue_output(
                "logits", ort.OrtValue.ortvalue_from_numpy(self.step_logits)
            )
            self._decode_binding = binding
        return self._decode_binding

    def clone_prefix(self, length: int) -> SharedStorage:
        """New storage holding a copy of the first ``length`` positions."""
        new = SharedStorage(self.engine, self.capacity)
        for src, dst in zip(self.keys + self.values, new.keys + new.values, strict=True):
            self.engine._copy_positions(src, dst, length)
        return new


SPINNING = ("run", "on", "off")


def spinning_mode(spinning: str | bool | None) -> str:
    """``run``, ``on`` or ``off``; True/None mean ``on`` (ORT's default), False ``off``."""
    mode = {True: "on", None: "on", False: "off"}.get(spinning, spinning)  # type: ignore[arg-type]
    if mode not in SPINNING:
        raise BundleError(f"spinning must be one of {SPINNING}, not {spinning!r}")
    return mode


def session_options(
    threads: int = 0, spinning: str | bool | None = "run", profile_prefix: str | None = None
) -> ort.SessionOptions:
    """ORT options: all graph optimizations, ``threads`` intra-op threads (0: one per core).

    ``profile_prefix``: turn on ONNX Runtime's profiler, which writes a Chrome-trace JSON
    starting with this path when ``session.end_profiling()`` is called (``moe2edge profile``).

    ``spinning`` is what the intra-op workers do between operators: ``run`` (default) they
    busy-wait while a run lasts and stop the moment it returns (``force_spinning_stop``), so
    a decode step pays no wake-ups and the cores are free between steps; ``on`` is ORT's own
    default (they go on spinning after a run); ``off`` they sleep between operators.
    """
    mode = spinning_mode(spinning)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "0" if mode == "off" else "1"
    )
    if mode == "run":
        options.add_session_config_entry("session.force_spinning_stop", "1")
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return options


class OnnxEngine:
    """Runs a bundle's decoder step by step. ``verify=True`` checks every file's sha256.

    ``device``: cpu, cuda or tensorrt (ONNX Runtime execution providers). ``threads``: ORT
    intra-op threads (0: ORT's default, one per physical core). ``max_length``: positions a
    shared-buffer cache allocates (default: the bundle's context). ``spinning``: ``run``
    (default; ORT's workers spin only while a step runs), ``on`` (ORT's default: they keep
    spinning after it) or ``off`` (see ``session_options`` and docs/runtime.md).
    ``profile_prefix``: run under ONNX Runtime's profiler (``session_options``).
    """

    def __init__(
        self,
        bundle_dir: str | Path,
        device: str = "cpu",
        threads: int = 0,
        verify: bool = True,
        max_length: int | None = None,
        spinning: str | bool | None = "run",
        profile_prefix: str | None = None,
    ):
        self.bundle_dir = Path(bundle_dir)
        self.manifest = verify_bundle(bundle_dir) if verify else read_manifest(bundle_dir)
        if device not in PROVIDERS:
            raise BundleError(f"unknown device {device!r}; choose one of {sorted(PROVIDERS)}")
        available = ort.get_available_providers()
        if PROVIDERS[device][0] not in available:
            raise BundleError(
                f"device {device!r} needs ONNX Runtime's {PROVIDERS[device][0]}, but this "
                f"onnxruntime only has {available}; install onnxruntime-gpu (or the Jetson "
                "wheel) or use device='cpu'"
            )
        self.device = device
        self.ort_device = "cpu" if device == "cpu" else "cuda"
        io = self.manifest["io"]
        try:
            self.kv = io["kv_cache"]
            self.num_layers = int(self.kv["num_layers"])
            self.kv_dtype = NUMPY_DTYPES[self.kv["dtype"]]
            self.shared_buffer = bool(self.kv.get("shared_buffer", False))
            context = int(self.kv.get("max_length") or io["max_sequence_length"])
            self._name("past_key", 0), int(self.kv["num_kv_heads"]), int(self.kv["head_dim"])
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise BundleError(
                f"{self.bundle_dir / 'manifest.json'}: the io contract's kv_cache is malformed "
                f"({type(exc).__name__}: {exc}); re-export the bundle"
            ) from exc
        if max_length is not None and not 1 <= max_length <= context:
            raise BundleError(f"max_length must be in 1..{context} (the bundle's context)")
        self.max_length = int(max_length or context)
        if not isinstance(io.get("model_file"), str):
            raise BundleError(
                f"{self.bundle_dir / 'manifest.json'} names no io.model_file; re-export the bundle"
            )
        model_file = self.bundle_dir / io["model_file"]
        try:
            self.session = ort.InferenceSession(
                str(model_file),
                sess_options=session_options(threads, spinning, profile_prefix),
                providers=PROVIDERS[device],
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NoSuchFile errors
            raise BundleError(
                f"ONNX Runtime cannot load {model_file} ({type(exc).__name__}: {exc}); "
                "re-export the bundle"
            ) from exc
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        expected = {self._name("past_key", i) for i in range(self.num_layers)} | {"input_ids"}
        self.direct_lengths = {SEQLENS, TOTAL_LENGTH} <= self.input_names
        if self.shared_buffer and not self.direct_lengths:
            expected.add("attention_mask")
        if not expected <= self.input_names:
            raise BundleError(
                f"{model_file} lacks inputs {sorted(expected - self.input_names)} "
                "named in the manifest's io contract; re-export the bundle"
            )
        if "logits" not in self.output_names:
            raise BundleError(f"{model_file} has no 'logits' output; re-export the bundle")
        self.logits_to_keep = LOGITS_TO_KEEP in self.input_names
        logits_shape = self.session.get_outputs()[self.output_names.index("logits")].shape
        vocab = logits_shape[-1] if isinstance(logits_shape[-1], int) else None
        self.vocab_size = int(vocab or self.manifest["model"]["vocab_size"])
        out_type = self.session.get_outputs()[self.output_names.index("logits")].type
        self.logits_dtype = np.float16 if "float16" in out_type else np.float32
        # shared-buffer graphs with a mask input: the mask of a run is ones over the positions
        # filled after it, so GroupQueryAttention's total length is what the cache holds, not
        # its capacity (a 1024-slot length cost INT4 decode ~2.5%: docs/runtime.md). One row
        # of ones; an OrtValue per length, made on first use, is a view of it (binding one
        # costs a few microseconds, converting an array each step ~50).
        self._ones = np.ones((1, self.max_length), dtype=np.int64)
        self._masks: dict[int, ort.OrtValue] = {}

    # --- names and buffers ------------------------------------------------------------

    def _name(self, kind: str, layer: int) -> str:
        return self.kv[kind].format(layer=layer)

    def _kv_shape(self, positions: int, rows: int = 1) -> tuple[int, int, int, int]:
        return (rows, int(self.kv["num_kv_heads"]), positions, int(self.kv["head_dim"]))

    def _alloc_kv(self, positions: int) -> Any:
        if self.ort_device == "cpu":
            return np.zeros(self._kv_shape(positions), dtype=self.kv_dtype)
        return ort.OrtValue.ortvalue_from_shape_and_type(
            self._kv_shape(positions), self.kv_dtype, self.ort_device, 0
        )

    @staticmethod
    def _ortvalue(buffer: Any) -> ort.OrtValue:
        return (
            buffer if isinstance(buffer, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(buffer)
        )

    def _copy_positions(self, src: Any, dst: Any, length: int) -> None:
        if isinstance(src, np.ndarray):
            dst[:, :, :length] = src[:, :, :length]
        else:  # device buffers: through the host (only on copy-on-write of a branch)
            host = dst.numpy()
            host[:, :, :length] = src.numpy()[:, :, :length]
            dst.update_inplace(host)

    # --- caches -----------------------------------------------------------------------

    def new_cache(self) -> KVCache:
        """An empty cache (shared-buffer graphs: its buffers are allocated on first use)."""
        if self.shared_buffer:
            return KVCache(keys=[], values=[])
        empty = [np.zeros(self._kv_shape(0), dtype=self.kv_dtype) for _ in range(self.num_layers)]
        return KVCache(keys=empty, values=list(empty))

    def _adopt(self, cache: KVCache, storage: SharedStorage) -> SharedStorage:
        old = cache.storage
        if isinstance(old, SharedStorage) and old is not storage:  # it no longer reads there
            with old.lock:
                old.sharers.discard(cache)
        cache.storage = storage
        storage.attach(cache)
        cache.keys, cache.values = storage.keys, storage.values
        return storage

    def _mask(self, length: int) -> ort.OrtValue:
        value = self._masks.get(length)
        if value is None:
            value = ort.OrtValue.ortvalue_from_numpy(self._ones[:, :length])
            self._masks[length] = value
        return value

    # --- running ------------------------------------------------------------------------

    def forward(
        self, token_ids: Sequence[int], cache: KVCache, all_logits: bool = False
    ) -> np.ndarray:
        """Run ``token_ids`` after what ``cache`` holds; the cache grows in place.

        Returns the logits of the last position ([vocab]) or of all new positions
        ([n, vocab]) as arrays the caller owns.
        """
        n = len(token_ids)
        if n == 0:
            raise ValueError("forward() needs at least one token")
        if cache.length + n > self.max_length:
            raise ContextOverflowError(
                f"{cache.length} cached + {n} new tokens exceed the model's context of "
                f"{self.max_length} tokens; start a new conversation or shorten the prompt"
            )
        ids = [int(t) for t in token_ids]
        if self.shared_buffer:
            return self._forward_shared(ids, cache, all_logits)
        logits = self._forward_concat(ids, cache, all_logits)
        cache.length += n
        cache.tokens.extend(ids)
        return logits

    def _forward_shared(self, ids: list[int], cache: KVCache, all_logits: bool) -> np.ndarray:
        storage = cache.storage
        if storage is None or storage.engine is not self:
            storage = self._adopt(cache, SharedStorage(self, self.max_length))
        while True:
            with storage.lock:  # the ownership check and the write are one step
                if not storage.claimed_beyond(cache, cache.length):
                    logits = self._run_shared(storage, ids, cache.length, all_logits)
                    cache.length += len(ids)
                    cache.tokens.extend(ids)
                    return logits
                log.debug("copy on write of a shared KV cache at %d positions", cache.length)
                new = storage.clone_prefix(cache.length)
            storage = self._adopt(cache, new)

    def _run_shared(
        self, storage: SharedStorage, ids: list[int], start: int, all_logits: bool
    ) -> np.ndarray:
        n = len(ids)
        end = start + n  # positions filled after this run
        if self.direct_lengths:
            storage.seqlens[0], storage.total[()] = end - 1, end
        if n == 1:
            storage.step_ids[0, 0] = ids[0]
            binding = storage.decode_binding()
            if self.ort_device != "cpu":  # device inputs are copied at bind time
                binding.bind_cpu_input("input_ids", storage.step_ids)
                storage.bind_lengths(binding)
            if not self.direct_lengths:
                binding.bind_ortvalue_input("attention_mask", self._mask(end))
            self.session.run_with_iobinding(binding)
            row = storage.step_logits[0]
            return _float32(row if all_logits else row[0])
        binding = self.session.io_binding()
        storage.bind_kv(binding)
        binding.bind_cpu_input("input_ids", np.asarray([ids], dtype=np.int64))
        if self.direct_lengths:
            storage.bind_lengths(binding)
        else:
            binding.bind_ortvalue_input("attention_mask", self._mask(end))
        rows = n if all_logits or not self.logits_to_keep else 1
        if self.logits_to_keep:  # the lm_head runs on the positions we read only
            binding.bind_cpu_input(LOGITS_TO_KEEP, np.array(rows, dtype=np.int64))
        logits = np.empty((1, rows, self.vocab_size), dtype=self.logits_dtype)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        self.session.run_with_iobinding(binding)
        return _float32(logits[0]) if all_logits else _float32(logits[0, -1])

    def _forward_concat(self, ids: list[int], cache: KVCache, all_logits: bool) -> np.ndarray:
        n, past = len(ids), cache.length
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.asarray([ids], dtype=np.int64))
        if "attention_mask" in self.input_names:
            binding.bind_cpu_input("attention_mask", np.ones((1, past + n), dtype=np.int64))
        if "position_ids" in self.input_names:
            positions = np.arange(past, past + n, dtype=np.int64)[None]
            binding.bind_cpu_input("position_ids", positions)
        names = []
        for layer in range(self.num_layers):
            for kind, values in (("key", cache.keys), ("value", cache.values)):
                binding.bind_ortvalue_input(
                    self._name(f"past_{kind}", layer), self._ortvalue(values[layer])
                )
                names.append(self._name(f"present_{kind}", layer))
                binding.bind_output(names[-1], self.ort_device)
        rows = n if all_logits or not self.logits_to_keep else 1
        if self.logits_to_keep:
            binding.bind_cpu_input(LOGITS_TO_KEEP, np.array(rows, dtype=np.int64))
        logits = np.empty((1, rows, self.vocab_size), dtype=self.logits_dtype)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()  # in binding order: presents, then logits
        for layer in range(self.num_layers):
            cache.keys[layer] = outputs[2 * layer]
            cache.values[layer] = outputs[2 * layer + 1]
        return _float32(logits[0]) if all_logits else _float32(logits[0, -1])


def open_engine(
    bundle_dir: str | Path,
    backend: str | None = None,
    threads: int = 0,
    verify: bool = True,
    max_length: int | None = None,
    spinning: str | bool | None = "run",
) -> Any:
    """An engine for ``bundle_dir`` on ``backend`` (cpu, cuda, tensorrt: ONNX Runtime
    execution providers; tensorrt-native: a TensorRT plan built by ``build-engine``).

    Without ``backend``, the manifest's ``runtime.backend`` decides (default: cpu).
    """
    if backend is None:
        manifest = read_manifest(bundle_dir)
        backend = str(manifest.get("runtime", {}).get("backend", "cpu"))
    if backend not in BACKENDS:
        raise BundleError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    if backend == "tensorrt-native":
        from moe2edge.runtime.tensorrt_engine import TensorRTEngine

        return TensorRTEngine(bundle_dir, verify=verify, max_length=max_length)
    return OnnxEngine(bundle_dir, backend, threads, verify, max_length, spinning)
