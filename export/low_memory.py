"""Keep the FP32 ONNX export at about one copy of the weights.

Traced as it is, an HF model costs three copies at its peak: the model's own weights (read
through safetensors' memory map, whose pages stay resident while any tensor of the file
lives), the transposed copies the TorchScript exporter folds ``MatMul(x, W^T)`` into (one per
``nn.Linear``), and, for a model above 2 GB, the ONNX proto optimum reloads with all its
external data to merge it into one file, while the caller still holds the model (optimum's
own ``del model`` cannot free it). Three steps bring that to one:

- ``load_unmapped``: the model's skeleton on the meta device (accelerate), each tensor read
  from the safetensors files with plain reads (``safe_open`` maps the whole file, and every
  page a read touches stays resident until all tensors of the file are gone).
- ``pretranspose_linears``: each ``nn.Linear`` stores ``W^T`` and computes ``x @ W^T + b``, so
  the exported MatMul reads the parameter itself and nothing is folded. The graph is the one
  the exporter would write anyway (MatMul with a ``[in, out]`` initializer, the same node
  names); one weight at a time is transposed, so the transient is one tensor.
- ``weights_released_after_export``: once ``torch.onnx.export`` has written the file, the
  model's parameters and buffers become meta tensors, freeing their memory before optimum
  reloads the ONNX file.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from moe2edge.export.errors import ExportError
from moe2edge.export.gguf import safetensors_index

SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
}


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for each tensor of a .safetensors file, one at a time, each in its
    own memory. The format is an 8-byte header length, a JSON header and the raw bytes;
    a plain read (not safetensors' memory map, see the module docstring) keeps one copy."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise ExportError(
                    f"{path}: tensor {name} has dtype {entry['dtype']}, not supported"
                )
            start, end = entry["data_offsets"]
            tensor = torch.empty(entry["shape"], dtype=SAFETENSORS_DTYPES[entry["dtype"]])
            f.seek(8 + length + start)
            view = tensor.view(-1).view(torch.uint8) if tensor.numel() else tensor
            if end > start and f.readinto(memoryview(view.numpy()).cast("B")) != end - start:
                raise ExportError(f"{path} is truncated (tensor {name}); copy it again")
            yield name, tensor


def load_unmapped(student_dir: str | Path, dtype: torch.dtype = torch.float32):
    """The HF causal LM of ``student_dir`` in ``dtype``, its weights in ordinary memory."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM

    student_dir = Path(student_dir)
    config = AutoConfig.from_pretrained(student_dir, local_files_only=True)
    with init_empty_weights(include_buffers=False):  # rotary inv_freq and the like: computed
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    expected = {name for name, _ in model.named_parameters()}
    for path in sorted(set(safetensors_index(student_dir).values())):
        for name, tensor in read_safetensors(path):
            if name not in expected:
                continue  # e.g. lm_head.weight of a tied checkpoint
            set_module_tensor_to_device(model, name, "cpu", value=tensor.to(dtype))
            expected.discard(name)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ExportError(
            f"{student_dir}: the weight files lack {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    return model.eval()


class PreTransposedLinear(torch.nn.Module):
    """``nn.Linear`` with its weight stored transposed (``[in, out]``), for export only."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.weight_t = torch.nn.Parameter(linear.weight.detach().t().contiguous(), False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


def pretranspose_linears(model: torch.nn.Module) -> int:
    """Replace every ``nn.Linear`` whose weight is not shared (a tied lm_head stays) in place;
    returns how many were replaced."""
    counts: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and counts.get(id(child.weight), 0) == 1:
                setattr(parent, name, PreTransposedLinear(child))
                child.weight = None  # the old [out, in] copy goes now, not at the end
                replaced += 1
    return replaced


@contextlib.contextmanager
def weights_released_after_export(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, ``torch.onnx.export(model, ...)`` frees ``model``'s weights once it
    has written the ONNX file; the model is unusable afterwards (export only)."""
    original = torch.onnx.export

    def export_then_release(traced, *args, **kwargs):
        out = original(traced, *args, **kwargs)
        model.to_empty(device="meta")
        return out

    torch.onnx.export = export_then_release
    try:
        yield
    finally:
        torch.onnx.export = original
