"""Dead channels: output channels that are exactly constant, and where their constant can be folded.

A producer channel whose weights are all zero outputs its bias everywhere. That constant is followed
through the graph (BatchNorm, element-wise ops, pooling, residual Adds, Concat, Flatten, ...) as one
value per channel (NaN where a channel is not exactly constant). Where the channel is summed away by a
consuming layer, its contribution can be moved into that layer's bias (`Layer.input_contribution`), so
the channel is removed with no change to the model's outputs. A non-zero constant folds only into a layer
where it adds the same to every output element (no zero padding).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ocomp.graph import attr, constant_value, has_padding, input_at
from ocomp.layers import layer_of

from . import channels as ch
from .channels import ChannelAnalysis, ChannelGroup


def _vec(values: dict, analysis: ChannelAnalysis, tensor: gs.Tensor) -> np.ndarray:
    v = values.get(tensor.name)
    if v is None:
        v = np.full(analysis.layouts[tensor.name].total, np.nan, dtype=np.float32)
    return v


def _channel_vector(value: np.ndarray, axis: int, total: int) -> np.ndarray:
    """A constant broadcast against a tracked tensor as a per-channel vector (NaN if it varies elsewhere)."""
    value = np.asarray(value, dtype=np.float32)
    if value.size == 1:
        return np.full(total, value.reshape(-1)[0], dtype=np.float32)
    if axis < 0 or any(d != 1 for i, d in enumerate(value.shape) if i != axis) or value.shape[axis] != total:
        return np.full(total, np.nan, dtype=np.float32)
    return value.reshape(-1)


def _per_channel(value: np.ndarray, axis: int) -> np.ndarray:
    """A constant tensor's value per channel along `axis` (NaN where it varies within a channel)."""
    rows = np.moveaxis(np.asarray(value, np.float32), axis, 0).reshape(value.shape[axis], -1)
    if not rows.shape[1]:
        return np.full(len(rows), np.nan, np.float32)
    return np.where((rows == rows[:, :1]).all(axis=1), rows[:, 0], np.nan).astype(np.float32)


def _unary(node: gs.Node, x: np.ndarray, cache: dict) -> np.ndarray | None:
    op = node.op
    with np.errstate(all="ignore"):
        if op in ("Identity", "Dropout"):
            return x
        if op == "Relu":
            return np.maximum(x, np.float32(0))
        if op == "LeakyRelu":
            return np.where(x >= 0, x, np.float32(attr(node, "alpha", 0.01)) * x)
        if op == "Clip":
            lo_t, hi_t = input_at(node, 1), input_at(node, 2)
            lo = constant_value(lo_t, cache) if lo_t is not None else attr(node, "min", -np.inf)
            hi = constant_value(hi_t, cache) if hi_t is not None else attr(node, "max", np.inf)
            return np.minimum(np.maximum(x, np.float32(lo)), np.float32(hi))
        if op == "Sigmoid":
            return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)
        if op == "HardSigmoid":
            a, b = np.float32(attr(node, "alpha", 0.2)), np.float32(attr(node, "beta", 0.5))
            return np.clip(a * x + b, 0, 1).astype(np.float32)
        if op == "HardSwish":
            return (x * np.clip(x / np.float32(6) + np.float32(0.5), 0, 1)).astype(np.float32)
        if op == "Tanh":
            return np.tanh(x)
        if op == "Abs":
            return np.abs(x)
        if op == "Neg":
            return -x
    return None


def _propagate(graph: gs.Graph, node: gs.Node, analysis: ChannelAnalysis, values: dict, cache: dict) -> np.ndarray | None:
    """Per-channel constant value of `node`'s output (NaN where not exactly constant), or None if unknown."""
    y = node.outputs[0]
    total = analysis.layouts[y.name].total
    op = node.op
    first = node.inputs[0] if node.inputs else None
    x = _vec(values, analysis, first) if first is not None and first.name in analysis.layouts else None
    layer = layer_of(node)
    if layer is not None:
        rows = layer.rows()
        own = layer.kind.bias_index is not None and input_at(node, layer.kind.bias_index) is not None
        bias = layer.bias(graph).astype(np.float32) if own else np.zeros(total, np.float32)
        if layer.groups > 1:
            if x is None or not layer.depthwise:
                return None
            out = x * rows.sum(axis=1).astype(np.float32) + bias
            return np.where(x == 0, bias, np.nan).astype(np.float32) if layer.has_padding() else out
        return np.where(~rows.any(axis=1), bias, np.nan).astype(np.float32)
    if op == "ConstantOfShape":  # constant channels concatenated in (the analysis tracks only constant shapes)
        fill = node.attrs.get("value")
        fill = np.asarray(fill.values if isinstance(fill, gs.Constant) else (0.0 if fill is None else fill))
        return np.full(total, np.float32(fill.reshape(-1)[0]), np.float32)
    if x is None:
        return None
    if op == "BatchNormalization":
        gamma, beta, mean, var = (np.asarray(constant_value(input_at(node, i), cache), dtype=np.float32)
                                  for i in range(1, 5))
        eps = np.float32(attr(node, "epsilon", 1e-5))
        return ((x - mean) / np.sqrt(var + eps) * gamma + beta).astype(np.float32)
    if op == "InstanceNormalization":
        return np.where(np.isfinite(x), np.asarray(constant_value(input_at(node, 2), cache), np.float32), np.nan)
    if op in ch.UNARY_OPS:
        return _unary(node, x, cache)
    if op in ch.BINARY_OPS:
        lay = analysis.layouts[y.name]
        ry = len(y.shape) if y.shape is not None else None
        vecs = []
        for t in node.inputs:
            if t.name in analysis.layouts:
                vecs.append(_vec(values, analysis, t))
                continue
            value = constant_value(t, cache)
            if value is None or ry is None:
                vecs.append(np.full(total, np.nan, np.float32))
            else:
                vecs.append(_channel_vector(value, lay.axis - (ry - value.ndim), total))
        with np.errstate(all="ignore"):
            if op == "Add" or op == "Sum":
                out = np.sum(vecs, axis=0, dtype=np.float32) if op == "Sum" else vecs[0] + vecs[1]
            elif op == "Sub":
                out = vecs[0] - vecs[1]
            elif op == "Mul":
                out = vecs[0] * vecs[1]
                out = np.where((vecs[0] == 0) | (vecs[1] == 0), np.float32(0), out)
            elif op == "Div":
                out = vecs[0] / vecs[1]
            elif op == "Max":
                out = np.max(vecs, axis=0)
            elif op == "Min":
                out = np.min(vecs, axis=0)
            elif op == "PRelu":
                out = np.where(vecs[0] >= 0, vecs[0], vecs[0] * vecs[1])
            else:
                return None
        return out.astype(np.float32)
    if op in ("MaxPool", "GlobalMaxPool", "GlobalAveragePool", "ReduceMean", "ReduceMax", "ReduceMin",
              "Transpose", "Squeeze", "Unsqueeze", "Slice", "Resize", "Upsample"):
        return x
    if op == "AveragePool":
        if attr(node, "count_include_pad", 0) and has_padding(node):
            return np.where(x == 0, x, np.nan)
        return x
    if op == "Pad":
        if attr(node, "mode", "constant") != "constant":
            return x
        value = ch.pad_value(node, cache)
        found = ch.pads_of(node, len(first.shape), cache) if first.shape is not None else None
        if value is None or found is None:
            return None
        pads, axes = found
        n, axis = len(axes), analysis.layouts[first.name].axis
        spatial = any(pads[i] or pads[i + n] for i in range(n) if axes[i] != axis)
        out = np.where(x == np.float32(value), x, np.nan) if spatial else x
        if axis in axes:  # constant channels added before and after
            k = axes.index(axis)
            out = np.concatenate([np.full(pads[k], value), out, np.full(pads[k + n], value)])
        return out.astype(np.float32)
    if op in ("Flatten", "Reshape"):
        in_lay, out_lay = analysis.layouts[first.name], analysis.layouts[y.name]
        block = out_lay.segments[0].block if out_lay.segments else 1
        return np.repeat(x, block) if out_lay.blocked() and not in_lay.blocked() else x
    if op == "Concat":
        lay = analysis.layouts[y.name]
        parts = []
        for t in node.inputs:
            value = constant_value(t, cache) if t.name not in values else None
            if value is not None and value.ndim == len(y.shape):  # a constant concatenated in
                parts.append(_per_channel(value, lay.axis))
            elif t.name in analysis.layouts and analysis.layouts[t.name].axis == lay.axis:
                parts.append(_vec(values, analysis, t))
            else:
                size = t.shape[lay.axis] if t.shape is not None else 0
                parts.append(np.full(int(size), np.nan, np.float32))
        out = np.concatenate(parts)
        if len(out) != total:  # concatenated along another axis: constant only where every input agrees
            vecs = [_vec(values, analysis, t) for t in node.inputs]
            return np.where(np.all([v == vecs[0] for v in vecs], axis=0), vecs[0], np.nan)
        return out
    return None


def constant_channels(graph: gs.Graph, analysis: ChannelAnalysis) -> dict[str, np.ndarray]:
    """Per tracked tensor: the exact constant value of each channel (NaN where not constant).

    Empty when no producer has an all-zero output channel: without one no prunable group has a constant
    channel (constants concatenated or padded in are prunable only where added to a producer's channels).
    """
    cache: dict = {}
    sources = any(not layer_of(a.node).rows().any(axis=1).all() for a in analysis.actions
                  if a.kind in ch.PRODUCER_KINDS)
    if not sources:
        return {}
    values: dict[str, np.ndarray] = {}
    for node in graph.nodes:  # analyze() sorted them
        if not node.outputs or node.outputs[0].name not in analysis.layouts:
            continue
        try:
            value = _propagate(graph, node, analysis, values, cache)
        except (ValueError, TypeError, IndexError):
            value = None
        total = analysis.layouts[node.outputs[0].name].total
        if value is None or np.shape(value) != (total,):
            value = np.full(total, np.nan, np.float32)
        values[node.outputs[0].name] = value
    return values


def foldable(graph: gs.Graph, node: gs.Node) -> bool:
    """Whether a constant input channel of this layer can be folded into its bias exactly: it must add
    the same to every output element (no zero padding, no transposed-conv overlap) and the layer must be
    able to hold a bias."""
    layer = layer_of(node)
    return (layer.kind.constant_input_folds and not layer.has_padding()
            and layer.bias_owner(graph) is not None)


def dead_channels(graph: gs.Graph, group: ChannelGroup, analysis: ChannelAnalysis, values: dict) -> np.ndarray:
    """Channels of `group` that are exactly constant wherever they are summed away, and can be folded there."""
    exits = [c for c in group.consumers if c.kind in ch.EXIT_KINDS]
    if not exits:
        return np.zeros(group.size, dtype=bool)
    dead = np.ones(group.size, dtype=bool)
    for c in exits:
        vals = values[c.tensor][analysis.position_matrix(c.tensor, group.id)]
        ok = np.isfinite(vals).all(axis=1)
        if not foldable(graph, c.node):
            ok &= (vals == 0).all(axis=1)
        dead &= ok
    return dead
