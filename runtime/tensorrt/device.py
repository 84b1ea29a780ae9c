"""The TensorRT Python bindings and the GPU, found without torch or pycuda.

``tensorrt`` is imported only when a function here is called; the GPU is asked through
the CUDA driver (``libcuda``) with ctypes.
"""

from __future__ import annotations

import ctypes
import importlib
from typing import Any

from moe2edge.runtime.errors import BundleError

NOT_INSTALLED = (
    "TensorRT is not installed; engines are built on the target device: copy the bundle to the "
    "Jetson and run `moe2edge jetson build-engine BUNDLE` there (JetPack ships TensorRT and its "
    "Python bindings: `sudo apt install python3-libnvinfer`)"
)


class TensorRTUnavailable(BundleError):
    """No TensorRT, CUDA driver or GPU here."""


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or TensorRTUnavailable saying where engines are built."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        raise TensorRTUnavailable(NOT_INSTALLED) from exc


def cuda_device_info(index: int = 0) -> dict[str, Any]:
    """GPU name, compute capability, SM count and memory via the CUDA driver (libcuda)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise TensorRTUnavailable(
            "no CUDA driver (libcuda.so.1) on this machine; engines are built on the target device"
        ) from exc

    def check(rc: int, what: str) -> None:
        if rc != 0:
            raise TensorRTUnavailable(
                f"CUDA driver call {what} failed with error {rc}: no usable GPU here"
            )

    check(lib.cuInit(0), "cuInit")
    dev = ctypes.c_int()
    check(lib.cuDeviceGet(ctypes.byref(dev), index), "cuDeviceGet")
    name = ctypes.create_string_buffer(256)
    check(lib.cuDeviceGetName(name, 256, dev), "cuDeviceGetName")
    attrs = {}
    for key, attr in (("major", 75), ("minor", 76), ("sm_count", 16)):
        v = ctypes.c_int()
        check(lib.cuDeviceGetAttribute(ctypes.byref(v), attr, dev), "cuDeviceGetAttribute")
        attrs[key] = v.value
    mem = ctypes.c_size_t()
    check(lib.cuDeviceTotalMem_v2(ctypes.byref(mem), dev), "cuDeviceTotalMem")
    return {
        "gpu_name": name.value.decode(),
        "compute_capability": f"{attrs['major']}.{attrs['minor']}",
        "sm_count": attrs["sm_count"],
        "total_memory_bytes": mem.value,
    }


def device_info() -> dict[str, Any]:
    """What an engine must match here: TensorRT version plus the GPU."""
    trt = import_tensorrt()
    return {"tensorrt_version": trt.__version__, **cuda_device_info()}
