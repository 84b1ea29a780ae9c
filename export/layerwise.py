"""A model's weights one layer at a time: the layers, and ORT's quantizers run per layer.

``layer_stages`` cuts the weight nodes of a decoder graph into its layers (GPTQ goes
through them in order). ``quantize_by_layer`` runs one of ONNX Runtime's weight
quantizers once per layer: ORT's ``quantize_dynamic`` holds about three copies of the
model (it loads it, then ``ONNXQuantizer`` deep-copies and reloads it for shape
inference: measured 3.2x the fp32 weights at 2.3 GB) and ``MatMulNBitsQuantizer`` one
(1.7x). Both leave alone a MatMul or Gather whose weight is not a constant, so each pass
gets the graph with only that layer's weights as initializers and every other external
weight as a graph input; the pass's new tensors go to the output's data file. The nodes,
names and numbers are those of one pass over the whole model.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import uses_external_data

from moe2edge.export.weights import INLINE_BYTES, WeightWriter, inline_bytes, read_weight

log = logging.getLogger(__name__)

LAYER_INDEX = re.compile(r"layers[./_](\d+)[./_]")  # optimum: /model/layers.3/mlp/up_proj/MatMul


def quantized_value(node: onnx.NodeProto) -> str:
    """The activation ORT quantizes for a weight node: a MatMul's input, a Gather's output
    (both become ``<name>_quantized``, so two layers must not share one)."""
    return node.output[0] if node.op_type == "Gather" else node.input[0]


def weight_of(node: onnx.NodeProto) -> str:
    """The weight input of a MatMul (B) or a Gather (the table)."""
    return node.input[0] if node.op_type == "Gather" else node.input[1]


def layer_stages(nodes: list[onnx.NodeProto]) -> list[list[onnx.NodeProto]]:
    """``nodes`` (in graph order) cut where the layer index in their names changes: the
    embedding and the lm_head, without one, stand alone; a graph without such names is
    one stage. A stage that shares an activation (``quantized_value``) with the one before
    joins it."""
    stages: list[list[onnx.NodeProto]] = []
    key: object = object()
    for node in nodes:
        found = LAYER_INDEX.search(node.name)
        index = found.group(1) if found else None
        shared = stages and quantized_value(node) in {quantized_value(n) for n in stages[-1]}
        if index != key and not shared:
            stages.append([])
        key = index
        stages[-1].append(node)
    return stages


def _fresh(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a (weightless) model in a new message: protobuf keeps the memory of
    removed fields (the pass's fp32 weights) until their message goes."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def quantize_by_layer(
    model: onnx.ModelProto,
    base_dir: str | Path,
    nodes: list[onnx.NodeProto],
    quantize: Callable[[onnx.ModelProto, list[str]], onnx.ModelProto],
    writer: WeightWriter,
) -> onnx.ModelProto:
    """``quantize(graph, node_names)`` once per layer of ``nodes`` (MatMuls/Gathers with a
    weight), each time with only that layer's weights in the graph (read from ``base_dir``).

    ``model`` is weightless (``weights.weightless``); the result refers to its external
    weights where they were and to the new tensors in ``writer``.
    """
    stages = layer_stages(nodes)
    values = [{quantized_value(n) for n in stage} for stage in stages]
    if sum(map(len, values)) != len(set().union(*values)):  # an activation in two layers
        log.warning("weight nodes share inputs across layers: quantizing in one pass")
        stages = [nodes]
    for stage in stages:
        weights = {weight_of(n) for n in stage}
        layer = _fresh(model)  # this pass's weights go into its own proto, freed with it
        kept, set_aside = [], []
        for tensor in layer.graph.initializer:
            if not uses_external_data(tensor):
                kept.append(tensor)
            elif tensor.name in weights and tensor.name not in writer.names:
                values = np.asarray(read_weight(tensor, base_dir))
                kept.append(numpy_helper.from_array(values, tensor.name))
                del values
            else:
                set_aside.append(tensor)
        graph_inputs = [
            helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in set_aside
        ]
        del layer.graph.initializer[:]
        layer.graph.initializer.extend(kept)
        layer.graph.input.extend(graph_inputs)
        del kept
        layer = quantize(layer, [n.name for n in stage])
        aside = {t.name for t in set_aside}
        original_inputs = [i for i in layer.graph.input if i.name not in aside]
        del layer.graph.input[:]
        layer.graph.input.extend(original_inputs)
        for tensor in layer.graph.initializer:
            if inline_bytes(tensor) >= INLINE_BYTES:
                writer.move(tensor)
        layer.graph.initializer.extend(set_aside)
        model = _fresh(layer)
        del layer
    log.info("quantized %d weight nodes in %d passes", len(nodes), len(stages))
    return model
