"""The KV cache every engine hands out: token ids plus per-layer keys and values.

Shared by the ONNX Runtime engine (``moe2edge.runtime.engine``) and the native TensorRT
runner (``moe2edge.runtime.tensorrt_engine``); both import it from here, so neither
imports the other (only ``engine.open_engine`` picks the TensorRT runner, on use).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort


@dataclass(eq=False)
class KVCache:
    """The positions a conversation has run through the model, and their keys/values.

    ``keys``/``values`` hold one entry per layer (OrtValues or arrays, engine-specific);
    ``tokens`` are the ids the cache holds (``length == len(tokens)``).
    """

    keys: list[Any]
    values: list[Any]
    length: int = 0
    tokens: list[int] = field(default_factory=list)
    storage: Any = field(default=None, repr=False)  # engine-owned state (shared buffers)

    def copy(self) -> KVCache:
        """An independent cache with the same content (cheap: storage is shared until written)."""
        clone = KVCache(list(self.keys), list(self.values), self.length, list(self.tokens))
        if self.storage is not None:
            clone.storage = self.storage.share(clone)
        return clone

    def truncate(self, length: int) -> None:
        """Forget everything after the first ``length`` positions (O(1) for shared buffers)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        if length == self.length:
            return
        if self.storage is None:  # concat flavour: slice the per-layer arrays
            self.keys = [_slice_positions(k, length) for k in self.keys]
            self.values = [_slice_positions(v, length) for v in self.values]
        else:
            self.storage.truncate(self, length)
        self.length = length
        del self.tokens[length:]


def _slice_positions(value: Any, length: int) -> Any:
    array = value.numpy() if isinstance(value, ort.OrtValue) else value
    out = np.ascontiguousarray(array[:, :, :length])
    if isinstance(value, ort.OrtValue) and value.device_name() != "cpu":
        return ort.OrtValue.ortvalue_from_numpy(out, value.device_name(), 0)
    return out
