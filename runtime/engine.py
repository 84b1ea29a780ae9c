"""The ONNX Runtime engine: one session over a bundle's decoder graph with a KV cache.

The graph's contract comes from the manifest's ``io`` section (written by export):
``input_ids``, ``attention_mask``, ``position_ids`` and ``past_key_values.{i}.key/value``
in; ``logits`` and ``present.{i}.key/value`` out. The engine is the only place that
knows those names; everything above it works with token ids and logits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.errors import BundleError, ContextOverflowError
from runtime.manifest import read_manifest, verify_bundle

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class KVCache:
    """Per-layer past keys/values as the graph returned them, and how many tokens they hold."""

    keys: list[np.ndarray]
    values: list[np.ndarray]
    length: int = 0
    tokens: list[int] = field(default_factory=list)

    def copy(self) -> KVCache:
        return KVCache(list(self.keys), list(self.values), self.length, list(self.tokens))


def session_options(threads: int = 0) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


class OnnxEngine:
    """Runs a bundle's decoder step by step. ``verify=True`` checks every file's sha256."""

    def __init__(
        self, bundle_dir: str | Path, device: str = "cpu", threads: int = 0, verify: bool = True
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
        io = self.manifest["io"]
        self.kv = io["kv_cache"]
        self.num_layers = int(self.kv["num_layers"])
        self.max_length = int(io["max_sequence_length"])
        self.kv_dtype = NUMPY_DTYPES[self.kv["dtype"]]
        model_file = self.bundle_dir / io["model_file"]
        self.session = ort.InferenceSession(
            str(model_file), sess_options=session_options(threads), providers=PROVIDERS[device]
        )
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        expected = {self._name("past_key", i) for i in range(self.num_layers)} | {"input_ids"}
        if not expected <= self.input_names:
            raise BundleError(
                f"{model_file} lacks inputs {sorted(expected - self.input_names)} "
                "named in the manifest's io contract; re-export the bundle"
            )

    def _name(self, kind: str, layer: int) -> str:
        return self.kv[kind].format(layer=layer)

    def new_cache(self) -> KVCache:
        shape = (1, int(self.kv["num_kv_heads"]), 0, int(self.kv["head_dim"]))
        empty = [np.zeros(shape, dtype=self.kv_dtype) for _ in range(self.num_layers)]
        return KVCache(keys=empty, values=list(empty))

    def forward(self, token_ids: list[int], cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run ``token_ids`` after what ``cache`` holds; update the cache in place.

        Returns the logits of the last position ([vocab]) or of all new positions.
        """
        n = len(token_ids)
        if n == 0:
            raise ValueError("forward() needs at least one token")
        if cache.length + n > self.max_length:
            raise ContextOverflowError(
                f"{cache.length} cached + {n} new tokens exceed the model's context of "
                f"{self.max_length} tokens; start a new conversation or shorten the prompt"
            )
        feed = {"input_ids": np.asarray([token_ids], dtype=np.int64)}
        if "attention_mask" in self.input_names:
            feed["attention_mask"] = np.ones((1, cache.length + n), dtype=np.int64)
        if "position_ids" in self.input_names:
            feed["position_ids"] = np.arange(cache.length, cache.length + n, dtype=np.int64)[None]
        for layer in range(self.num_layers):
            feed[self._name("past_key", layer)] = cache.keys[layer]
            feed[self._name("past_value", layer)] = cache.values[layer]
        outputs = dict(zip(self.output_names, self.session.run(None, feed), strict=True))
        for layer in range(self.num_layers):
            cache.keys[layer] = outputs[self._name("present_key", layer)]
            cache.values[layer] = outputs[self._name("present_value", layer)]
        cache.length += n
        cache.tokens.extend(token_ids)
        logits = outputs["logits"][0]
        return logits if all_logits else logits[-1]
