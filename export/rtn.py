"""Round-to-nearest weight grids: the one place a block's scale and zero point are chosen.

Used by the TensorRT flavour (``tensorrt_flavor``: RTN INT4/INT8 into DequantizeLinear) and
by GPTQ (``gptq``: each group's grid, into ONNX Runtime's MatMulNBits). Levels are unsigned,
``0 .. 2**bits - 1``, and a weight is ``(q - zero) * scale``:

* asymmetric (a zero point per block): ``scale = (max(w, 0) - min(w, 0)) / (2**bits - 1)``,
  ``zero = round(-min(w, 0) / scale)``: all 16 INT4 levels used, 0 exact. The same for both
  consumers (and ONNX Runtime's own RTN).
* symmetric (no zero-point tensor): the consumer's format decides, because the two accept
  different scales:

  - MatMulNBits (``signed_scale=True``) implies zero point 8 and takes a negative scale:
    ``scale = m / -8`` with ``m`` the block's signed largest-magnitude value, which lands
    on -8, so the whole of [-8, 7] is used. ONNX Runtime's ``DefaultWeightOnlyQuantizer``
    does this; GPTQ packs byte for byte like it (tests/test_export_quantize.py).
  - DequantizeLinear for TensorRT: its ONNX parser requires positive scales ("Scale
    coefficients must all be positive") and zero points of 0, so the largest magnitude
    cannot take -8 whatever its sign: ``scale = max|w| / 7`` and levels -7..7, symmetric
    about 0 with -8 unused (NVIDIA ModelOpt's INT4 uses the same ``amax / 7``).

* a block of zeros gets scale 0 and quantizes to its zero point, as in ONNX Runtime
  (TensorRT rejects a zero scale: ``tensorrt_flavor`` writes 1 there).
"""

from __future__ import annotations

import numpy as np


def rtn_grid(
    groups: np.ndarray, bits: int, symmetric: bool, signed_scale: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) per column of ``groups`` [..., rows, N], taken over the rows.

    ``signed_scale``: the symmetric grid of a consumer that takes negative scales
    (MatMulNBits); see the module docstring. Both come back in ``groups``' float dtype.
    """
    top, mid = 2**bits - 1, 2 ** (bits - 1)
    lo, hi = groups.min(axis=-2), groups.max(axis=-2)
    if symmetric:
        if signed_scale:
            scale = np.where(np.abs(hi) > np.abs(lo), hi, lo) / -mid
        else:  # positive scales (TensorRT): -7..7, symmetric about 0
            scale = np.maximum(np.abs(lo), np.abs(hi)) / (mid - 1)
        return scale, np.full(scale.shape, mid, dtype=scale.dtype)
    lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
    scale = (hi - lo) / top
    return scale, np.clip(np.rint(-lo / _nonzero(scale)), 0, top)


def rtn_levels(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """The levels (0 .. 2**bits - 1, as floats) nearest to ``w / scale + zero``."""
    return np.clip(np.rint(w / _nonzero(scale)) + zero, 0, 2**bits - 1)


def dequantize(
    q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, block_size: int | None
) -> np.ndarray:
    """float32 ``(q - zero) * scale`` with groups of ``block_size`` rows (None: one group,
    per column), as DequantizeLinear and MatMulNBits compute it."""
    k = q.shape[0]
    if block_size is None:
        s, z = scale[None, :], (zero[None, :] if zero is not None else 0)
    else:
        s = np.repeat(scale, block_size, axis=0)[:k]
        z = np.repeat(zero, block_size, axis=0)[:k] if zero is not None else 0
    return (q.astype(np.float32) - np.asarray(z, dtype=np.float32)) * s.astype(np.float32)


def _nonzero(scale: np.ndarray) -> np.ndarray:
    return np.where(scale == 0, 1, scale).astype(scale.dtype, copy=False)
