"""The pruning rewrite: slice every node a channel group touches by the kept channels.

Weighted layers are sliced through the layer table (ocomp/layers.py); BatchNorm/InstanceNorm
parameters, per-channel constants of element-wise ops (and constants concatenated in on the channel axis),
Reshape/Resize targets, ConstantOfShape shapes and channel Pad amounts are sliced here; tensor
shapes are updated so the graph stays shape-consistent. Removed dead channels have their constant
contribution folded into the consuming layer's bias first (passes/deadchannels.py found them).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from ocomp.graph import attr, constant_value, input_at, set_constant
from ocomp.layers import layer_of

from . import channels as ch
from .channels import ChannelAnalysis, ChannelGroup


class Rewriter:
    def __init__(self, graph: gs.Graph, analysis: ChannelAnalysis):
        self.graph = graph
        self.analysis = analysis
        self.touched: dict[int, gs.Node] = {}

    def _take(self, node: gs.Node, index: int, idx: np.ndarray, axis: int) -> None:
        tensor = input_at(node, index)
        if tensor is None:
            return
        value = np.asarray(constant_value(tensor))
        if value.ndim == 0 or value.shape[axis] == 1:
            return  # broadcast along the channel axis (only shrinking axes of >= 2 channels get here)
        set_constant(self.graph, node, index, np.take(value, idx, axis=axis), f"{tensor.name or node.name}.pruned")

    def _pad(self, node: gs.Node, c: ch.Consumer, idx: np.ndarray) -> None:
        """Shrink a Pad's channel pads to the kept constant channels before and after its input's."""
        pads = np.asarray(attr(node, "pads") if c.index < 0 else constant_value(input_at(node, c.index)),
                          dtype=np.int64).reshape(-1).copy()
        n = len(pads) // 2
        before, after = int(pads[c.axis]), int(pads[c.axis + n])
        total = self.analysis.layouts[c.tensor].total
        pads[c.axis] = int(np.count_nonzero(idx < before))
        pads[c.axis + n] = int(np.count_nonzero(idx >= total - after))
        if c.index < 0:
            node.attrs["pads"] = [int(p) for p in pads]
        else:
            set_constant(self.graph, node, c.index, pads, f"{node.name or c.tensor}.pruned_pads")

    def fold_constant_channels(self, group: ChannelGroup, removed: np.ndarray, values: dict) -> None:
        """Add the constant contribution of removed dead channels to each consumer's bias."""
        for c in group.consumers:
            if c.kind not in ch.EXIT_KINDS:
                continue
            pos = self.analysis.position_matrix(c.tensor, group.id, removed).ravel()
            vals = values[c.tensor][pos].astype(np.float64)
            if not vals.any():
                continue
            layer = layer_of(c.node)
            self.touched[id(c.node)] = c.node
            owner = layer.bias_owner(self.graph)
            self.touched[id(owner[0])] = owner[0]
            layer.set_bias(self.graph, layer.bias(self.graph) + layer.input_contribution(pos, vals))

    def apply(self, kept: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Slice every action by the kept indices of its tensor; returns those indices by tensor name."""
        if not kept:
            return {}
        indices: dict[str, np.ndarray] = {}
        for name in self.analysis.layouts:
            idx = self.analysis.kept_indices(name, kept)
            if idx is not None:
                indices[name] = idx
        for c in self.analysis.actions:
            idx = indices.get(c.tensor)
            if idx is None:
                continue
            node = c.node
            self.touched[id(node)] = node
            if c.kind in (ch.LAYER_OUT, ch.DEPTHWISE):
                layer_of(node).take_out(self.graph, idx)
            elif c.kind == ch.LAYER_IN:
                layer_of(node).take_in(self.graph, idx)
            elif c.kind == ch.NORM:
                for i in range(1, len(node.inputs)):
                    self._take(node, i, idx, 0)
            elif c.kind == ch.CONST:
                self._take(node, c.index, idx, c.axis)
            elif c.kind in (ch.RESHAPE, ch.RESIZE, ch.SHAPE):
                value = np.asarray(constant_value(input_at(node, c.index))).copy()
                value[c.axis] = len(idx)
                set_constant(self.graph, node, c.index, value, f"{node.name or c.tensor}.pruned_shape")
            elif c.kind == ch.PAD:
                self._pad(node, c, idx)
        for name, idx in indices.items():
            tensor = self.analysis.tensors.get(name)
            if isinstance(tensor, gs.Variable) and tensor.shape is not None:
                shape = list(tensor.shape)
                shape[self.analysis.layouts[name].axis] = int(len(idx))
                tensor.shape = shape
        return indices

    # report
    def snapshot(self) -> dict[int, tuple]:
        """Weight shapes, params and MACs of every node an action may touch (before the rewrite)."""
        nodes = {id(c.node): c.node for c in self.analysis.actions}
        for c in self.analysis.actions:
            if c.kind == ch.LAYER_IN:
                owner = layer_of(c.node).bias_owner(self.graph)
                if owner is not None:
                    nodes[id(owner[0])] = owner[0]
        return {key: node_stats(node) for key, node in nodes.items()}

    def layer_rows(self, before: dict[int, tuple], criterion: str) -> list[dict]:
        rows = []
        group_of_out: dict[int, str] = {}
        for producers_first in (True, False):
            for g in self.analysis.groups:
                for c in g.consumers:
                    if (c.kind in ch.PRODUCER_KINDS) == producers_first:
                        group_of_out.setdefault(id(c.node), g.id)
        for key, node in self.touched.items():
            if key not in before:
                continue
            b, a = before[key], node_stats(node)
            if b == a:
                continue
            rows.append(dict(name=node.name or node.outputs[0].name, op=node.op, before=b[0], after=a[0],
                             out_before=b[1], out_after=a[1], in_before=b[2], in_after=a[2],
                             params_before=b[3], params_after=a[3], macs_before=b[4], macs_after=a[4],
                             group=group_of_out.get(key, ""), criterion=criterion))
        return rows


def node_stats(node: gs.Node) -> tuple:
    """(weight shape, out channels, in channels, params, MACs at batch 1) of a node."""
    consts = [v for v in (constant_value(input_at(node, i)) for i in range(1, len(node.inputs)))
              if v is not None and np.issubdtype(v.dtype, np.floating)]
    params = sum(int(v.size) for v in consts)
    layer = layer_of(node)
    if layer is not None and isinstance(input_at(node, 1), gs.Constant):
        in_shape = (node.inputs[0].shape or [])[1:]
        macs = layer.macs(in_shape, (node.outputs[0].shape or [])[1:])
        return list(layer.weight_shape), layer.out_channels, layer.in_channels, params, macs
    size = int(consts[0].shape[0]) if consts and len(consts[0].shape) else 0
    return [size], size, size, params, 0

