"""GPTQ (Frantar et al., 2022) into ONNX Runtime's ``MatMulNBits``, calibrated through ORT.

Why not ``GPTQWeightOnlyQuantConfig``: in onnxruntime 1.32 its error feedback reads a
*column* of the upper-triangular inverse-Hessian factor (``Hinv1[i:, i]``) where GPTQ
needs a *row* (``Hinv1[i, i:]``); below the diagonal that factor is zero, so no error is
ever propagated and the result equals round-to-nearest (measured: identical weights, and
identical KL/top-1 on the demo student). Its 4-bit zero-point packing also breaks on an
odd number of blocks per column. So this module does the algorithm and the packing; ORT
still runs the calibration graph and the resulting ``MatMulNBits`` kernel.

Quantization grid (``moe2edge.export.rtn``, the same as ORT's round-to-nearest
``DefaultWeightOnlyQuantizer``): asymmetric ``scale = (max - min) / 15``,
``zp = round(-min / scale)``; symmetric ``scale = m / -8`` where ``m`` is the block's
largest-magnitude value (zero point 8 implied).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from tqdm import tqdm

from moe2edge.export.rtn import rtn_grid, rtn_levels

log = logging.getLogger(__name__)


def _session(model: onnx.ModelProto, work: str) -> ort.InferenceSession:
    from moe2edge.export.derived import save_for_tool

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    path = Path(work) / "probe.onnx"
    save_for_tool(model, path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def collect_hessians(
    model: onnx.ModelProto,
    feeds: list[dict[str, np.ndarray]],
    activations: list[str],
    hidden_sizes: dict[str, int],
    budget_bytes: int = 2 << 30,
) -> dict[str, np.ndarray]:
    """``H = 2/n * sum x x^T`` over every calibration token for each named activation.

    The activations become extra graph outputs; as many as fit ``budget_bytes`` of float64
    Hessians are collected per pass over the calibration set (one pass for small models).
    """
    groups, group, used = [], [], 0
    for name in activations:
        size = 8 * hidden_sizes[name] ** 2
        if group and used + size > budget_bytes:
            groups.append(group)
            group, used = [], 0
        group.append(name)
        used += size
    if group:
        groups.append(group)
    hessians: dict[str, np.ndarray] = {}
    for names in groups:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        have = {o.name for o in probe.graph.output}
        probe.graph.output.extend(onnx.ValueInfoProto(name=a) for a in names if a not in have)
        with tempfile.TemporaryDirectory() as work:
            session = _session(probe, work)
            del probe
            sums = {name: np.zeros((hidden_sizes[name],) * 2) for name in names}
            count = 0
            for feed in tqdm(feeds, desc="gptq calibration", unit="sample", mininterval=2.0):
                outs = session.run(names, feed)
                for name, x in zip(names, outs, strict=True):
                    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
                    sums[name] += x.T @ x
                count += int(np.prod(outs[0].shape[:-1]))
        hessians.update({name: 2.0 * s / max(1, count) for name, s in sums.items()})
    return hessians


def gptq_weight(
    w: np.ndarray,
    hessian: np.ndarray,
    block_size: int,
    symmetric: bool,
    percdamp: float = 0.01,
    lazy_batch: int = 128,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ of ``w`` [K, N] (MatMul layout, y = x @ w) with groups of ``block_size`` along K.

    Returns (q [K, N] in 0..15, scale [blocks, N], zero [blocks, N]); dequantized weights
    are ``(q - zero) * scale`` per group.
    """
    k, n = w.shape
    W = w.astype(np.float64).copy()
    H = hessian.astype(np.float64).copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[dead, :] = 0.0
    H[np.diag_indices(k)] += percdamp * np.mean(np.diag(H))
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper triangular: U^T U = H^-1
    blocks = -(-k // block_size)
    q = np.zeros((k, n))
    scales = np.zeros((blocks, n))
    zeros = np.zeros((blocks, n))
    scale = zero = None
    for i1 in range(0, k, lazy_batch):
        i2 = min(i1 + lazy_batch, k)
        W1 = W[i1:i2].copy()
        err = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            row = i1 + i
            if row % block_size == 0:  # group parameters from the error-updated weights
                group = np.concatenate([W1[i:], W[i2:]])[:block_size]
                # MatMulNBits takes signed scales: symmetric is ORT's [-8, 7], see export/rtn.py
                scale, zero = rtn_grid(group, 4, symmetric, signed_scale=True)
                scales[row // block_size], zeros[row // block_size] = scale, zero
            qi = rtn_levels(W1[i], scale, zero, 4)
            q[row] = qi
            e = (W1[i] - (qi - zero) * scale) / U1[i, i]
            W1[i:] -= np.outer(U1[i, i:], e)
            err[i] = e
        W[i2:] -= U[i1:i2, i2:].T @ err
    return q, scales, zeros


def nbits_tensors(
    name: str, q: np.ndarray, scale: np.ndarray, zero: np.ndarray, block_size: int, symmetric: bool
) -> list[onnx.TensorProto]:
    """``MatMulNBits`` inputs B [N, blocks, block/2], scales [N, blocks], zero points
    [N, ceil(blocks/2)] (absent when symmetric), in ORT's packing (low nibble first)."""
    k, n = q.shape
    blocks = scale.shape[0]
    padded = np.zeros((blocks * block_size, n), dtype=np.uint8)
    padded[:k] = q.astype(np.uint8)
    # padding rows (K not a multiple of the block) stay 0: MatMulNBits reads only K rows
    per_col = padded.T.reshape(n, blocks, block_size)
    packed = per_col[..., 0::2] | (per_col[..., 1::2] << 4)
    tensors = [
        numpy_helper.from_array(packed.astype(np.uint8), f"{name}_Q4"),
        numpy_helper.from_array(scale.T.astype(np.float32).copy(), f"{name}_scales"),
    ]
    if not symmetric:
        z = zero.T.astype(np.uint8)  # [N, blocks]
        if blocks % 2:
            z = np.concatenate([z, np.full((n, 1), 8, dtype=np.uint8)], axis=1)
        tensors.append(
            numpy_helper.from_array(z[:, 0::2] | (z[:, 1::2] << 4), f"{name}_zero_points")
        )
    return tensors


def gptq_model(
    model: onnx.ModelProto,
    feeds: list[dict[str, np.ndarray]],
    block_size: int,
    symmetric: bool,
    accuracy_level: int | None = None,
    percdamp: float = 0.01,
) -> onnx.ModelProto:
    """Every MatMul with a constant 2-D fp32 weight becomes a GPTQ-quantized ``MatMulNBits``."""
    inits = {i.name: i for i in model.graph.initializer}
    targets = [
        n
        for n in model.graph.node
        if n.op_type == "MatMul"
        and n.input[1] in inits
        and len(inits[n.input[1]].dims) == 2
        and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT
    ]
    hidden = {n.input[0]: int(inits[n.input[1]].dims[0]) for n in targets}
    hessians = collect_hessians(model, feeds, sorted(hidden), hidden)
    replaced: dict[str, onnx.NodeProto] = {}
    used = set()
    for node in tqdm(targets, desc="gptq", unit="matmul", mininterval=2.0):
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        q, scale, zero = gptq_weight(w, hessians[node.input[0]], block_size, symmetric, percdamp)
        base = f"{node.input[1]}_gptq{len(replaced)}"
        tensors = nbits_tensors(base, q, scale, zero, block_size, symmetric)
        model.graph.initializer.extend(tensors)
        attrs = {"K": w.shape[0], "N": w.shape[1], "bits": 4, "block_size": block_size}
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        replaced[node.name] = helper.make_node(
            "MatMulNBits",
            [node.input[0]] + [t.name for t in tensors],
            list(node.output),
            name=f"{node.name}_Q4",
            domain="com.microsoft",
            **attrs,
        )
        used.add(node.input[1])
    nodes = [replaced.get(n.name, n) if n.op_type == "MatMul" else n for n in model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    still = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name not in used or i.name in still]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    log.info("GPTQ: %d MatMuls at block size %d", len(replaced), block_size)
    return model
