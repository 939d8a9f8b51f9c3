"""Pass `foldbn`: fold inference-mode BatchNormalization into the weighted layer that feeds it.

Folds a BN whose input is produced by a Conv, a Gemm (transB either way) or an
ocomp TernaryConv / TernaryGemm / TernaryMatMul whose output has no other use:

    s = gamma / sqrt(var + eps),  t = beta - mean * s
    Conv/Gemm: W' = W * s (per output channel), b' = b * s + t
    Ternary*:  alpha' = alpha * s (T unchanged; alpha may turn negative), b' = b * s + t

Meant to run last (`--passes prune,ternary,bnrecal,foldbn`), after bnrecal has
recalibrated the BN statistics. The folded layer takes over the BN's output name.
The helpers here are also used by `ternary --ternary-fold-bn`.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ocomp.graph import STANDARD_DOMAINS, const_value, input_at, is_graph_output, producer, unique_name
from ocomp.model import CUSTOM_DOMAIN
from ocomp.pipeline import Context, Pass, Report, register

TERNARY_OPS = ("TernaryConv", "TernaryGemm", "TernaryMatMul")


def constant(tensor: gs.Tensor | None) -> np.ndarray | None:
    """const_value, also through Identity nodes (PyTorch's exporter dedupes equal initializers that way)."""
    for _ in range(8):
        value = const_value(tensor)
        if value is not None or tensor is None:
            return value
        node = producer(tensor)
        if node is None or node.op != "Identity" or node.domain not in STANDARD_DOMAINS:
            return None
        tensor = node.inputs[0]
    return None


def bn_affine(graph: gs.Graph, bn: gs.Node) -> tuple[np.ndarray, np.ndarray] | str:
    """(scale, shift) of an inference-mode BN (float64), or the reason it cannot be folded."""
    if int(bn.attrs.get("training_mode", 0)):
        return "training_mode=1"
    if any(o.outputs or is_graph_output(graph, o) for o in bn.outputs[1:]):
        return "its running-statistics outputs are used"
    params = [constant(input_at(bn, i)) for i in range(1, 5)]
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
    if bn.op != "BatchNormalization" or bn.domain not in STANDARD_DOMAINS or bn.inputs[0] is not out:
        return None
    return bn


def _out_channels(node: gs.Node) -> int | None:
    if node.domain == CUSTOM_DOMAIN:
        return int(node.attrs["weight_shape"][0])
    weight = const_value(input_at(node, 1))
    if weight is None:
        return None
    if node.op == "Conv":
        return int(weight.shape[0])
    return int(weight.shape[0] if int(node.attrs.get("transB", 0)) else weight.shape[1])


def foldable_reason(graph: gs.Graph, layer: gs.Node, bn: gs.Node) -> str | None:
    """Why `bn` cannot be folded into `layer` (None when it can)."""
    is_ternary = layer.domain == CUSTOM_DOMAIN and layer.op in TERNARY_OPS
    if not is_ternary and not (layer.op in ("Conv", "Gemm") and layer.domain in STANDARD_DOMAINS):
        return f"its input comes from {layer.op}, not a Conv/Gemm/Ternary* layer"
    if sole_bn_consumer(graph, layer) is not bn:
        return f"the output of {layer.name} has other consumers"
    if not is_ternary and const_value(input_at(layer, 1)) is None:
        return f"the weight of {layer.name} is not a constant"
    bias = input_at(layer, 3 if is_ternary else 2)
    if bias is not None and constant(bias) is None:
        return f"the bias of {layer.name} is not a constant"
    if layer.op == "TernaryMatMul":
        shape = layer.outputs[0].shape
        if shape is None or len(shape) != 2:
            return "TernaryMatMul output is not 2-D, so BN's channel axis is not its output axis"
    channels = _out_channels(layer)
    if channels is None:
        return "cannot tell the layer's output channels"
    affine = bn_affine(graph, bn)
    if isinstance(affine, str):
        return affine
    if affine[0].size != channels:
        return f"BN has {affine[0].size} channels, the layer {channels}"
    if layer.op == "Gemm" and bias is not None:
        if np.asarray(constant(bias)).size not in (1, channels) or np.asarray(constant(bias)).ndim > 2:
            return "the Gemm bias C is not a per-output vector"
    return None


def set_input(graph: gs.Graph, node: gs.Node, index: int, values: np.ndarray, base: str) -> None:
    """Give `node` a constant input at `index`: updated in place when only `node` uses it, else a new one."""
    current = input_at(node, index)
    if isinstance(current, gs.Constant) and len(current.outputs) == 1:
        current.values = values
        return
    const = gs.Constant(unique_name(graph, base), values)
    while len(node.inputs) < index:
        node.inputs.append(gs.Variable.empty())
    if len(node.inputs) == index:
        node.inputs.append(const)
    else:
        node.inputs[index] = const


def fold_bn(graph: gs.Graph, layer: gs.Node, bn: gs.Node) -> None:
    """Fold `bn` into `layer` (check foldable_reason first); the layer takes over the BN's output."""
    scale, shift = bn_affine(graph, bn)  # type: ignore[misc]
    name = layer.name or layer.outputs[0].name
    if layer.domain == CUSTOM_DOMAIN:
        alpha = np.asarray(const_value(layer.inputs[2]), dtype=np.float64)
        bias = constant(input_at(layer, 3))
        bias = np.zeros_like(scale) if bias is None else np.asarray(bias, dtype=np.float64).reshape(-1)
        set_input(graph, layer, 2, (alpha * scale).astype(np.float32), f"{name}.alpha")
        set_input(graph, layer, 3, (bias * scale + shift).astype(np.float32), f"{name}.bias")
    else:
        weight = np.asarray(const_value(layer.inputs[1]))
        dtype = weight.dtype
        w = weight.astype(np.float64)
        bias = constant(input_at(layer, 2))
        bias = np.zeros_like(scale) if bias is None else np.asarray(bias, dtype=np.float64)
        if layer.op == "Conv":
            w = w * scale.reshape(-1, *([1] * (w.ndim - 1)))
            bias = bias.reshape(-1)
        else:  # Gemm: alpha/beta are folded into the new weight and bias
            w = w * float(layer.attrs.get("alpha", 1.0))
            w = w * (scale[:, None] if int(layer.attrs.get("transB", 0)) else scale[None, :])
            bias = np.broadcast_to(bias.reshape(-1), scale.shape) * float(layer.attrs.get("beta", 1.0))
            layer.attrs["alpha"] = 1.0
            layer.attrs["beta"] = 1.0
        set_input(graph, layer, 1, w.astype(dtype), f"{name}.weight")
        set_input(graph, layer, 2, (bias * scale + shift).astype(dtype), f"{name}.bias")
    out = bn.outputs[0]
    bn.outputs.clear()
    bn.inputs.clear()
    layer.outputs = [out]


@register
class FoldBN(Pass):
    """Fold BatchNormalization into the preceding Conv/Gemm/Ternary* layer (run it last, after bnrecal)."""

    name = "foldbn"
    options = ()
    needs = frozenset()

    def run(self, graph: gs.Graph, ctx: Context) -> Report:
        report = Report(self.name)
        folded = 0
        for bn in [n for n in graph.nodes if n.op == "BatchNormalization" and n.domain in STANDARD_DOMAINS]:
            name = bn.name or bn.outputs[0].name
            layer = producer(bn.inputs[0])
            reason = "its input is a graph input or constant" if layer is None else foldable_reason(graph, layer,
                                                                                                      bn)
            if reason is not None:
                report.skip(name, bn.op, reason)
                continue
            channels = _out_channels(layer)
            fold_bn(graph, layer, bn)
            folded += 1
            report.change(name, "BatchNormalization", f"after {layer.op}", f"folded into {layer.name}",
                          4 * channels, 0, note=f"{layer.op} {layer.name}")
        report.details["folded"] = folded
        return report
