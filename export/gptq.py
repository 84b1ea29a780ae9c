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

Sequential, as in the paper: the layers are quantized in order (``layer_stages``, from
the layer index in optimum's node names), and the Hessians of layer L come from the
calibration set run through the layers before it *already quantized*. Each layer gets one
ONNX Runtime session over the part of the graph that computes its MatMuls' inputs, with
the weights fed as inputs (``probe_model``): the earlier layers' GPTQ levels through
``DequantizeLinear``, memory maps of the rest; the model is never loaded into a session
whole.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnx.external_data_helper import uses_external_data
from tqdm import tqdm

from moe2edge.export.layerwise import layer_stages
from moe2edge.export.rtn import rtn_grid, rtn_levels
from moe2edge.export.weights import read_weight

log = logging.getLogger(__name__)


def _node_inputs(node: onnx.NodeProto) -> list[str]:
    """A node's inputs and the outer names its subgraphs read (If/Loop bodies)."""
    names = list(node.input)
    for attr in node.attribute:
        for graph in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
            for inner in graph.node:
                names.extend(_node_inputs(inner))
    return names


def probe_model(
    model: onnx.ModelProto,
    activations: list[str],
    quantized: dict[str, int] | None = None,
) -> onnx.ModelProto:
    """The part of ``model`` that computes ``activations`` (its outputs), every external
    initializer turned into a graph input: weights are fed, so no session holds them.

    A weight named in ``quantized`` (name -> block size) is fed as its GPTQ levels, scales
    and zero points (``.q`` uint8 [K, N], ``.scale``, ``.zero``) through a blocked
    ``DequantizeLinear`` (opset 21): a quarter of its fp32 bytes, the same numbers as
    ``rtn.dequantize``.
    """
    quantized = quantized or {}
    graph = model.graph
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    needed: set[int] = set()  # indices of the nodes the activations depend on
    stack, seen = list(activations), set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        index = producer.get(name)
        if index is not None and index not in needed:
            needed.add(index)
            stack.extend(_node_inputs(graph.node[index]))
    nodes = [graph.node[i] for i in sorted(needed)]
    used = {name for n in nodes for name in _node_inputs(n)}
    inits = [t for t in graph.initializer if t.name in used]
    inputs = [i for i in graph.input if i.name in used]
    dequantize = []
    for t in inits:
        if not uses_external_data(t):
            continue
        if t.name not in quantized:
            inputs.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
            continue
        k, n = t.dims
        blocks = [-(-k // quantized[t.name]), n]
        inputs += [
            helper.make_tensor_value_info(f"{t.name}.q", onnx.TensorProto.UINT8, [k, n]),
            helper.make_tensor_value_info(f"{t.name}.scale", onnx.TensorProto.FLOAT, blocks),
            helper.make_tensor_value_info(f"{t.name}.zero", onnx.TensorProto.UINT8, blocks),
        ]
        dequantize.append(
            helper.make_node(
                "DequantizeLinear",
                [f"{t.name}.q", f"{t.name}.scale", f"{t.name}.zero"],
                [t.name],
                axis=0,
                block_size=quantized[t.name],
            )
        )
    probe = helper.make_graph(
        dequantize + nodes,
        "gptq_probe",
        inputs,
        [onnx.ValueInfoProto(name=a) for a in activations],
        [t for t in inits if not uses_external_data(t)],
    )
    opsets = [
        helper.make_opsetid(o.domain, max(o.version, 21) if dequantize else o.version)
        if o.domain in ("", "ai.onnx")
        else o
        for o in model.opset_import
    ]
    return helper.make_model(probe, opset_imports=opsets, ir_version=max(model.ir_version, 10))


def collect_hessians(
    model: onnx.ModelProto,
    base_dir: str | Path,
    feeds: list[dict[str, np.ndarray]],
    activations: list[str],
    quantized: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
    block_size: int | None = None,
) -> dict[str, np.ndarray]:
    """``H = 2/n * sum x x^T`` over every calibration token for each named activation.

    One session over the part of the graph that computes them; its weights are fed:
    ``quantized[name] = (q, scale, zero)`` (the earlier layers, GPTQ'd at ``block_size``)
    where given, else a memory map of the weight's bytes in ``base_dir``.
    """
    quantized = quantized or {}
    probe = probe_model(model, activations, {name: block_size for name in quantized})
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    inits = {t.name: t for t in model.graph.initializer}
    names = {i.name for i in session.get_inputs()}
    fed: dict[str, np.ndarray] = {}
    for name, (q, scale, zero) in quantized.items():
        if f"{name}.q" in names:
            fed[f"{name}.q"] = q
            fed[f"{name}.scale"] = scale.astype(np.float32)
            fed[f"{name}.zero"] = zero.astype(np.uint8)
    for name in names:
        if name in inits:
            fed[name] = read_weight(inits[name], base_dir)
    sums: dict[str, np.ndarray] = {}
    count = 0
    for feed in feeds:
        outs = session.run(activations, {**{k: v for k, v in feed.items() if k in names}, **fed})
        for name, x in zip(activations, outs, strict=True):
            x = x.reshape(-1, x.shape[-1]).astype(np.float64)
            if name in sums:
                sums[name] += x.T @ x  # in place: a Hessian is K x K float64
            else:
                sums[name] = x.T @ x
        count += int(np.prod(outs[0].shape[:-1]))
    for s in sums.values():
        s *= 2.0
        s /= max(1, count)
    return sums


def gptq_weight(
    w: np.ndarray,
    hessian: np.ndarray,
    block_size: int,
    symmetric: bool,
    percdamp: float = 0.01,
    lazy_batch: int = 128,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ of ``w`` [K, N] (MatMul layout, y = x @ w) with groups of ``block_size`` along K.

    Returns (q [K, N] uint8 in 0..15, scale [blocks, N], zero [blocks, N]); dequantized
    weights are ``(q - zero) * scale`` per group (``rtn.dequantize``).
    """
    k, n = w.shape
    W = w.astype(np.float64)  # astype copies: w and hessian stay as they were
    H = hessian.astype(np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[dead, :] = 0.0
    H[np.diag_indices(k)] += percdamp * np.mean(np.diag(H))
    H = np.linalg.inv(H)  # one K x K float64 at a time: they dominate memory at large K
    U = np.linalg.cholesky(H).T  # upper triangular: U^T U = H^-1
    del H
    blocks = -(-k // block_size)
    q = np.zeros((k, n), dtype=np.uint8)
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


def nbits_arrays(
    name: str, q: np.ndarray, scale: np.ndarray, zero: np.ndarray, block_size: int, symmetric: bool
) -> list[tuple[str, np.ndarray]]:
    """``MatMulNBits`` inputs B [N, blocks, block/2], scales [N, blocks], zero points
    [N, ceil(blocks/2)] (absent when symmetric), in ORT's packing (low nibble first)."""
    k, n = q.shape
    blocks = scale.shape[0]
    padded = np.zeros((blocks * block_size, n), dtype=np.uint8)
    padded[:k] = q.astype(np.uint8)
    # padding rows (K not a multiple of the block) stay 0: MatMulNBits reads only K rows
    per_col = padded.T.reshape(n, blocks, block_size)
    packed = per_col[..., 0::2] | (per_col[..., 1::2] << 4)
    arrays = [
        (f"{name}_Q4", np.ascontiguousarray(packed, dtype=np.uint8)),
        (f"{name}_scales", scale.T.astype(np.float32)),
    ]
    if not symmetric:
        z = zero.T.astype(np.uint8)  # [N, blocks]
        if blocks % 2:
            z = np.concatenate([z, np.full((n, 1), 8, dtype=np.uint8)], axis=1)
        arrays.append((f"{name}_zero_points", np.ascontiguousarray(z[:, 0::2] | (z[:, 1::2] << 4))))
    return arrays


def nbits_tensors(
    name: str, q: np.ndarray, scale: np.ndarray, zero: np.ndarray, block_size: int, symmetric: bool
) -> list[onnx.TensorProto]:
    """``nbits_arrays`` as in-memory TensorProtos."""
    return [
        numpy_helper.from_array(values, n)
        for n, values in nbits_arrays(name, q, scale, zero, block_size, symmetric)
    ]


def gptq_model(
    model: onnx.ModelProto,
    base_dir: str | Path,
    feeds: list[dict[str, np.ndarray]],
    block_size: int,
    symmetric: bool,
    accuracy_level: int | None = None,
    store: Callable[[np.ndarray, str], onnx.TensorProto] = numpy_helper.from_array,
    percdamp: float = 0.01,
) -> onnx.ModelProto:
    """Every MatMul with a constant 2-D fp32 weight becomes a GPTQ-quantized ``MatMulNBits``.

    Sequential over layers (``layer_stages``): the Hessians of layer L come from the
    calibration set run through layers < L already quantized (their levels, scales and
    zero points fed to the probe), as in the paper. ``model`` is weightless
    (``weights.weightless``, data in ``base_dir``); each new tensor goes through ``store``
    (``WeightWriter.add`` writes it to the output's data file), so memory holds the levels
    of the layers done (uint8: a quarter of their fp32 bytes) plus one layer's work.
    """
    inits = {i.name: i for i in model.graph.initializer}
    targets = [
        n
        for n in model.graph.node
        if n.op_type == "MatMul"
        and n.input[1] in inits
        and len(inits[n.input[1]].dims) == 2
        and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT
    ]
    stages = layer_stages(targets)
    done: dict[str, tuple] = {}  # weight name -> (q, scale, zero), fed to later probes
    replaced: dict[str, onnx.NodeProto] = {}
    new_tensors: list[onnx.TensorProto] = []  # the graph changes once all layers are done
    for stage in tqdm(stages, desc="gptq", unit="layer", mininterval=2.0):
        activations = sorted({n.input[0] for n in stage})
        hessians = collect_hessians(model, base_dir, feeds, activations, done, block_size)
        for node in stage:
            w = np.asarray(read_weight(inits[node.input[1]], base_dir), dtype=np.float32)
            q, scale, zero = gptq_weight(
                w, hessians[node.input[0]], block_size, symmetric, percdamp
            )
            done[node.input[1]] = (q, scale, zero)
            base = f"{node.input[1]}_gptq{len(replaced)}"
            tensors = [
                store(values, name)
                for name, values in nbits_arrays(base, q, scale, zero, block_size, symmetric)
            ]
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
            new_tensors += tensors
            del w, q
        del hessians
    nodes = [replaced.get(n.name, n) if n.op_type == "MatMul" else n for n in model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    still = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name not in done or i.name in still]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep + new_tensors)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    log.info(
        "GPTQ: %d MatMuls in %d layers at block size %d", len(replaced), len(stages), block_size
    )
    return model
