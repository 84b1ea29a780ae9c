"""Weights one tensor at a time: ONNX graphs without their data, and external-data files.

Protobuf cannot hold 2 GB, and a model loaded whole costs a copy of its weights for every
tool it passes through. So the export steps handle a model as its graph without the
weights (``weightless`` + ``load_graph``: ``onnx.load(load_external_data=False)``) plus the
folder its external data lives in; a weight is read when it is needed (``read_weight``: a
memory map of its bytes) and each new one is appended to the output's data file
(``WeightWriter``). Peak memory stays near the largest tensor instead of several models.

Why not onnx's own helpers: ``numpy_helper.to_array(t, base_dir)`` and
``load_external_data_for_tensor`` put the bytes into the graph's proto (which then keeps
them), and ``save_external_data`` wants each tensor as protobuf bytes first (a copy).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

from moe2edge.export.errors import ExportError

log = logging.getLogger(__name__)

INLINE_BYTES = 1024  # tensors below this stay in the graph (onnx's own size_threshold)
ALIGN = 4096  # tensor offsets in a data file: page-aligned, so a memory map starts on a page
WEIGHTLESS = "weightless.onnx"  # the graph of a model whose weights were inside its file
FLOAT16_MIN, FLOAT16_MAX = 5.96e-08, 65504.0  # onnxruntime's float16 conversion bounds
FOUR_BIT = {
    onnx.TensorProto.INT4: ml_dtypes.int4,
    onnx.TensorProto.UINT4: ml_dtypes.uint4,
}


def load_graph(path: str | Path, base_dir: str | Path | None = None) -> onnx.ModelProto:
    """The model at ``path`` without its external data (weights stored inside still load).

    ``base_dir``: the folder its external data is relative to, when that is not the file's
    own (a shape-inferred copy written to a work folder)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf/onnx raise many types for a broken file
        raise ExportError(f"cannot read {path} ({type(exc).__name__}: {exc}); re-export") from exc
    inline_attribute_tensors(model, Path(base_dir or Path(path).parent))
    return model


def _attribute_tensors(graph: onnx.GraphProto):
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            yield from attr.tensors
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from _attribute_tensors(sub)


def inline_attribute_tensors(model: onnx.ModelProto, base_dir: Path) -> None:
    """Read node attributes kept in external data (optimum stores big ``Constant`` values
    there) into the graph: the per-tensor rewrites carry initializers only, so such an
    attribute would point into a data file that the output no longer has. They are small."""
    from onnx.external_data_helper import load_external_data_for_tensor

    for tensor in _attribute_tensors(model.graph):
        if uses_external_data(tensor):
            load_external_data_for_tensor(tensor, str(base_dir))
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT


def inline_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's data stored in the proto itself (0 for external data)."""
    if uses_external_data(tensor):
        return 0
    return len(tensor.raw_data) or tensor.ByteSize()


def data_files(model: onnx.ModelProto) -> list[str]:
    """The external-data file names (relative to the model's folder) the graph refers to."""
    names = {
        entry.value
        for tensor in model.graph.initializer
        if uses_external_data(tensor)
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return sorted(names)


def copy_beside(src: Path, dst: Path) -> None:
    """Copy a data file (in the kernel: no memory of ours). onnx and ONNX Runtime refuse
    external data reached through a hard or symbolic link, so a link will not do."""
    if dst.exists() and dst.samefile(src):
        return
    shutil.copyfile(src, dst)


def weightless(model_path: str | Path, work: str | Path) -> Path:
    """A file holding ``model_path``'s graph with every weight in external data files beside it.

    A model that already keeps its weights outside (optimum's layout above 2 GB) is its
    own answer; one with weights inside its file (below 2 GB) is loaded once and written to
    ``work`` as graph + data file (external files it also refers to are copied there).
    Either way the weights live next to the returned file.
    """
    model_path = Path(model_path)
    model = load_graph(model_path)
    if not any(inline_bytes(t) >= INLINE_BYTES for t in model.graph.initializer):
        return model_path
    work = Path(work)
    for name in data_files(model):
        copy_beside(model_path.parent / name, work / name)
    out = work / WEIGHTLESS
    onnx.save_model(  # writes each inline tensor to the data file and clears it from the proto
        model,
        str(out),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=WEIGHTLESS + ".data",
        size_threshold=INLINE_BYTES,
    )
    return out


def _external(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _data_path(base_dir: Path, location: str, name: str) -> Path:
    path = (base_dir / location).resolve()
    if Path(location).is_absolute() or not path.is_relative_to(base_dir.resolve()):
        raise ExportError(f"tensor {name}: external data {location!r} is outside {base_dir}")
    if not path.is_file():
        raise ExportError(
            f"tensor {name}: external data file {path} is missing; copy the whole bundle"
        )
    return path


def read_weight(
    tensor: onnx.TensorProto, base_dir: str | Path, data_type: int | None = None
) -> np.ndarray:
    """A tensor's values; external ones as a read-only memory map of their file (no copy).

    ``data_type``: the type the bytes were written as, when the graph has since been
    given another (the float16 conversion retypes the graph before the weights).
    """
    if not uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    data_type = data_type or tensor.data_type
    info = _external(tensor)
    path = _data_path(Path(base_dir), info.get("location", ""), tensor.name)
    offset = int(info.get("offset", 0))
    length = int(info["length"]) if "length" in info else path.stat().st_size - offset
    shape = tuple(int(d) for d in tensor.dims)
    if data_type in FOUR_BIT:  # two values a byte: unpack through onnx
        packed = onnx.TensorProto(name=tensor.name, dims=shape, data_type=data_type)
        with open(path, "rb") as f:
            f.seek(offset)
            packed.raw_data = f.read(length)
        return numpy_helper.to_array(packed)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type))
    numel = int(np.prod(shape)) if shape else 1
    if numel * dtype.itemsize != length:
        raise ExportError(
            f"tensor {tensor.name}: {length} bytes in {path.name} do not hold {shape} "
            f"{dtype}; the data file does not belong to this graph: re-export"
        )
    if numel == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def to_float16(values: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
    """float32 -> float16 as onnxruntime's ``convert_np_to_float16`` does (magnitudes into
    [5.96e-8, 65504]; 0, inf and nan kept), a slab at a time: ORT's own version allocates
    index arrays several times the tensor's size."""
    flat = np.asarray(values).reshape(-1)
    out = np.empty(flat.shape, np.float16)
    for start in range(0, flat.size, chunk):
        x = np.array(flat[start : start + chunk], dtype=np.float32)
        tiny = (0 < np.abs(x)) & (np.abs(x) < FLOAT16_MIN)
        huge = (FLOAT16_MAX < np.abs(x)) & np.isfinite(x)
        x[tiny] = np.copysign(np.float32(FLOAT16_MIN), x[tiny])
        x[huge] = np.copysign(np.float32(FLOAT16_MAX), x[huge])
        out[start : start + chunk] = x
    return out.reshape(np.shape(values))


class WeightWriter:
    """Appends tensors to one external-data file; each comes back as its TensorProto.

    ``names`` are the tensors written so far; ``bytes`` their total. Use as a context
    manager (or call ``close``) so the file is complete before anything reads it.
    """

    def __init__(self, folder: str | Path, location: str):
        self.folder, self.location = Path(folder), location
        self.path = self.folder / location
        self._file = open(self.path, "wb")  # noqa: SIM115 -- closed by close()/__exit__
        self.names: set[str] = set()
        self.bytes = 0

    def __enter__(self) -> WeightWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def add(self, values: np.ndarray, name: str) -> onnx.TensorProto:
        """Write ``values`` (ml_dtypes int4/uint4 arrays are packed two a byte)."""
        tensor = onnx.TensorProto(name=name, dims=values.shape)
        if values.dtype in (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4)):
            packed = numpy_helper.from_array(values, name)
            tensor.data_type = packed.data_type
            data = memoryview(packed.raw_data)
        else:
            tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
            data = memoryview(np.ascontiguousarray(values).reshape(-1).view(np.uint8))
        self._write(tensor, data)
        return tensor

    def move(self, tensor: onnx.TensorProto) -> None:
        """Write a tensor whose data is in its proto, and leave only the reference there."""
        values = numpy_helper.to_array(tensor)
        tensor.CopyFrom(self.add(values, tensor.name))

    def _write(self, tensor: onnx.TensorProto, data: memoryview) -> None:
        if tensor.name in self.names:
            raise ExportError(f"tensor {tensor.name} written twice; this is a bug, report it")
        offset = -(-self._file.tell() // ALIGN) * ALIGN
        self._file.seek(offset)
        self._file.write(data)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", offset), ("length", len(data))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        self.names.add(tensor.name)
        self.bytes += len(data)


def tool_input(model: onnx.ModelProto, base_dir: str | Path, work: str | Path) -> Path:
    """``model`` (weightless) saved in ``work`` with its data files beside it, for a tool
    that reads a path and writes temporary files next to it (onnxruntime's quantizers):
    not in the parent bundle. Data files already in ``work`` stay; others are copied (disk
    space, not memory)."""
    work = Path(work)
    for name in data_files(model):
        copy_beside(Path(base_dir) / name, work / name)
    path = work / "in.onnx"
    onnx.save_model(model, str(path))
    return path
