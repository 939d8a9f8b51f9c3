"""Pass `foldbn`: fold inference-mode BatchNormalization into the weighted layer that feeds it.

Folds a BN whose input is produced by a weighted layer with a bias input (Conv, ConvTranspose, Gemm,
ocomp TernaryConv / TernaryGemm / TernaryMatMul: the layer table, ocomp/layers.py) whose output has no
other use:

    s = gamma / sqrt(var + eps),  t = beta - mean * s
    W' = W * s (per output channel; a ternary op's alpha, which may turn negative), b' = b * s + t

Meant to run last (`--passes prune,ternary,bnrecal,foldbn`), after bnrecal has
recalibrated the BN statistics. The folded layer takes over the BN's output name.
The helpers here are also used by `ternary --ternary-fold-bn`.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ocomp.graph import constant_value, input_at, is_graph_output, is_standard, producer
from ocomp.layers import Layer, layer_of
from ocomp.pipeline import Context, Pass, Report, register


def bn_affine(graph: gs.Graph, bn: gs.Node) -> tuple[np.ndarray, np.ndarray] | str:
    """(scale, shift) of an inference-mode BN (float64), or the reason it cannot be folded."""
    if int(bn.attrs.get("training_mode", 0)):
        return "training_mode=1"
    if any(o.outputs or is_graph_output(graph, o) for o in bn.outputs[1:]):
        return "its running-statistics outputs are used"
    params = [constant_value(input_at(bn, i)) for i in range(1, 5)]
    if any(p is None for p in params):
        return "its scale/bias/mean/var are not constants"
    gamma, beta, mean, var = (np.asarray(p, dtype=np.float64).reshape(-1) for p in params)
    if not gamma.size == beta.size == mean.size == var.size:
        return "its parameters have different sizes"
    eps = float(bn.attrs.get("epsilon", 1e-5))
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def sole_bn_consumer(graph: gs.Graph, node: gs.Node) -> gs.Node | None:
    """The BatchNormalization that is the only consumer of `node`'s output, else None."""
    out = node.outputs[0]
    if len(out.outputs) != 1 or is_graph_output(graph, out):
        return None
    bn = out.outputs[0]
    if bn.op != "BatchNormalization" or not is_standard(bn) or bn.inputs[0] is not out:
        return None
    return bn


def foldable_reason(graph: gs.Graph, node: gs.Node, bn: gs.Node) -> str | None:
    """Why `bn` cannot be folded into `node` (None when it can)."""
    layer = layer_of(node)
    if layer is None:
        return f"its input comes from {node.op}, not a weighted layer with a constant weight"
    if layer.kind.bias_index is None:
        return f"{node.op} has no bias input to take the BN's shift"
    if sole_bn_consumer(graph, node) is not bn:
        return f"the output of {node.name} has other consumers"
    bias = input_at(node, layer.kind.bias_index)
    if bias is not None:
        value = constant_value(bias)
        if value is None:
            return f"the bias of {node.name} is not a constant"
        if np.asarray(value).size not in (1, layer.out_channels) or np.asarray(value).ndim > 2:
            return "the bias is not a per-output vector"
    if layer.output_axis != 1:
        shape = node.outputs[0].shape
        if shape is None or len(shape) != 2:
            return f"{node.op} output is not 2-D, so BN's channel axis is not its output axis"
    affine = bn_affine(graph, bn)
    if isinstance(affine, str):
        return affine
    if affine[0].size != layer.out_channels:
        return f"BN has {affine[0].size} channels, the layer {layer.out_channels}"
    return None


def fold_bn(graph: gs.Graph, node: gs.Node, bn: gs.Node) -> Layer:
    """Fold `bn` into `node` (check foldable_reason first); the layer takes over the BN's output."""
    scale, shift = bn_affine(graph, bn)  # type: ignore[misc]
    layer = layer_of(node)
    bias = layer.bias(graph)
    layer.scale_outputs(graph, scale)
    layer.set_bias(graph, bias * scale + shift)
    out = bn.outputs[0]
    bn.outputs.clear()
    bn.inputs.clear()
    node.outputs = [out]
    return layer


@register
class FoldBN(Pass):
    """Fold BatchNormalization into the preceding weighted layer (run it last, after bnrecal)."""

    name = "foldbn"
    options = ()
    needs = frozenset()

    def run(self, graph: gs.Graph, ctx: Context) -> Report:
        report = Report(self.name)
        folded = 0
        for bn in [n for n in graph.nodes if n.op == "BatchNormalization" and is_standard(n)]:
            name = bn.name or bn.outputs[0].name
            node = producer(bn.inputs[0])
            reason = "its input is a graph input or constant" if node is None else foldable_reason(graph, node, bn)
            if reason is not None:
                report.skip(name, bn.op, reason)
                continue
            layer = fold_bn(graph, node, bn)
            folded += 1
            report.change(name, "BatchNormalization", f"after {node.op}", f"folded into {node.name}",
                          4 * layer.out_channels, 0, note=f"{node.op} {node.name}")
        report.details["folded"] = folded
        return report
