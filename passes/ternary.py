"""Pass `ternary`: per-channel ternary weights executed by the add-only `ocomp` custom ops.

Which layers become which ternary op, and their weights viewed as rows, come from the layer table
(ocomp/layers.py: `Kind.ternary_form`). The 2-bit codec is ocomp/codec.py (re-exported here).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ocomp.codec import pack_ternary, unpack_ternary  # noqa: F401 - the codec's public home for users
from ocomp.errors import UsageError
from ocomp.graph import CUSTOM_DOMAIN, boundary_layers, input_at, unique_name
from ocomp.layers import Unsupported, weighted_layers
from ocomp.model import to_graph, to_model
from ocomp.pipeline import Context, Option, Pass, Report, non_negative_int, register

from .foldbn import fold_bn, foldable_reason, sole_bn_consumer

# ---------------------------------------------------------------- ternarization

DEFAULT_MIN_PARAMS = 1024


def ternarize_optimal(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `weights` (channels, n): T in {-1,0,+1} and alpha >= 0 minimizing ||w - alpha*T||^2 exactly.

    For a fixed count k of nonzeros the best T keeps the k largest |w| with their signs and the
    best alpha is their mean; the error is sum(w^2) - (cumsum_k)^2 / k, so the best k maximizes
    (cumsum_k)^2 / k. All channels at once: one sort, one cumsum, one argmax.
    """
    w = np.asarray(weights, dtype=np.float64)
    channels, n = w.shape
    mag = np.abs(w)
    order = np.argsort(-mag, axis=1)  # (quicksort: 8x faster than a stable sort; ties give equal errors)
    cumsum = np.cumsum(np.take_along_axis(mag, order, axis=1), axis=1)
    counts = np.arange(1, n + 1, dtype=np.float64)
    best = np.argmax(cumsum**2 / counts, axis=1)
    alpha = cumsum[np.arange(channels), best] / (best + 1)
    keep_sorted = np.arange(n)[None, :] <= best[:, None]
    keep_sorted &= (alpha > 0)[:, None]  # an all-zero channel stays all zero
    keep = np.empty_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=1)
    return np.where(keep, np.sign(w), 0).astype(np.int8), alpha


def ternarize_twn(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ternary weight networks (Li et al. 2016): Delta = 0.7 * mean|w|, alpha = mean of |w| above Delta."""
    w = np.asarray(weights, dtype=np.float64)
    mag = np.abs(w)
    keep = mag > 0.7 * mag.mean(axis=1, keepdims=True)
    count = keep.sum(axis=1)
    alpha = np.where(count > 0, (mag * keep).sum(axis=1) / np.maximum(count, 1), 0.0)
    return np.where(keep, np.sign(w), 0).astype(np.int8), alpha


THRESHOLDS = {"optimal": ternarize_optimal, "twn": ternarize_twn}


def ternary_error(weights: np.ndarray, ternary: np.ndarray, alpha: np.ndarray) -> float:
    """Relative error ||W - alpha*T|| / ||W|| (rows are output channels)."""
    w = np.asarray(weights, dtype=np.float64)
    norm = np.linalg.norm(w)
    return float(np.linalg.norm(w - alpha[:, None] * ternary) / norm) if norm > 0 else 0.0


# ---------------------------------------------------------------- the pass


@register
class Ternary(Pass):
    """Ternary weights: per output channel W ~ alpha*T, T in {-1,0,+1}, 2 bits a weight (ocomp custom ops)."""

    name = "ternary"
    options = (
        Option("threshold", str, "optimal", "how T and alpha are chosen: 'optimal' (least squares, exact) or "
               "'twn' (Delta = 0.7*mean|W|)", choices=("optimal", "twn")),
        Option("skip", str, (), "leave this layer (node name) in float", multiple=True),
        Option("keep_first", bool, True, "keep the first weighted layer(s) in float (those with no weighted layer "
               "upstream), as is usual for ternary networks"),
        Option("keep_last", bool, True, "keep the last weighted layer(s) in float (those with no weighted layer "
               "downstream: the classifier, every head of a multi-output model)"),
        Option("min_params", non_negative_int, DEFAULT_MIN_PARAMS, "layers with fewer weights stay float: tiny layers (depthwise "
               "3x3, SE convs, small 1x1 shortcuts) save a few bytes and are the most sensitive to ternary"),
        Option("fold_bn", bool, False, "fold a following BatchNormalization into alpha and bias "
               "(off by default so bnrecal can recalibrate BN after ternary)"),
    )

    def run(self, graph: gs.Graph, ctx: Context) -> Report:
        opts = ctx.options
        report = Report(self.name)
        solver = THRESHOLDS[opts["threshold"]]
        weighted = weighted_layers(graph, ternary=False)
        names = {layer.node.name for layer in weighted}
        unknown = [s for s in opts["skip"] if s not in names]
        if unknown:
            raise UsageError(f"--ternary-skip: no weighted layer with a constant weight is named "
                             f"{', '.join(repr(u) for u in unknown)}")
        first, last = boundary_layers(graph, [layer.node for layer in weighted])
        rows = []
        for layer in weighted:
            node, name = layer.node, layer.name
            weight = layer.weight()
            if name in opts["skip"]:
                report.skip(name, node.op, "in --ternary-skip")
                continue
            if opts["keep_first"] and id(node) in first:
                report.skip(name, node.op, "first weighted layer kept in float (--ternary-no-keep-first)")
                continue
            if opts["keep_last"] and id(node) in last:
                report.skip(name, node.op, "last weighted layer kept in float (--ternary-no-keep-last)")
                continue
            if weight.size < opts["min_params"]:
                report.skip(name, node.op, f"too small: {weight.size} weights < --ternary-min-params "
                            f"{opts['min_params']}")
                continue
            try:
                if not np.issubdtype(weight.dtype, np.floating):
                    raise Unsupported(f"weight dtype {weight.dtype} is not floating point")
                form = layer.kind.ternary_form(layer, graph)
            except Unsupported as why:
                report.skip(name, node.op, f"unsupported form: {why}")
                continue
            rows.append(self._rewrite(graph, layer, form, solver, opts["fold_bn"], report))
        report.details["threshold"] = opts["threshold"]
        report.details["layers"] = rows
        report.details["ternarized"] = len(rows)
        return report

    def _rewrite(self, graph: gs.Graph, layer, form, solver, fold: bool, report: Report) -> dict:
        node, name = layer.node, layer.name
        shape, out_channels = list(layer.weight_shape), layer.out_channels  # (the node is replaced below)
        weight = form.weight
        channels = weight.shape[0]
        flat = weight.reshape(channels, -1)
        ternary, alpha = solver(flat)
        error = ternary_error(flat, ternary, alpha)
        packed = pack_ternary(ternary)
        inputs = [node.inputs[0],
                  gs.Constant(unique_name(graph, f"{name}.ternary_weight"), packed),
                  gs.Constant(unique_name(graph, f"{name}.alpha"), (alpha * form.scale).astype(np.float32))]
        if form.bias is not None:
            bias = np.asarray(form.bias, dtype=np.float32).reshape(-1)
            inputs.append(gs.Constant(unique_name(graph, f"{name}.bias"), bias))
        attrs = dict(form.attrs, weight_shape=[int(d) for d in weight.shape])
        outputs = list((form.absorbed[-1] if form.absorbed else node).outputs)
        for absorbed in [node, *form.absorbed]:
            absorbed.outputs.clear()
            absorbed.inputs.clear()
        produced = outputs
        if form.depth_to_space:
            # the 1x1 TernaryConv keeps its input's spatial dims (symbolic ones included): its output shape is
            # written into the model, as ONNX cannot infer a custom op's, so the DepthToSpace and all after it
            # keep theirs
            x_shape = inputs[0].shape
            phases_shape = ([x_shape[0], int(weight.shape[0]), x_shape[2], x_shape[3]]
                            if x_shape is not None and len(x_shape) == 4 else None)
            produced = [gs.Variable(unique_name(graph, f"{name}.phases"), dtype=np.float32, shape=phases_shape)]
            graph.nodes.append(gs.Node("DepthToSpace", name=unique_name(graph, f"{name}.depth_to_space"),
                                       attrs=dict(blocksize=form.depth_to_space, mode="CRD"),
                                       inputs=produced, outputs=outputs))
        new = gs.Node(form.op, name=node.name, domain=CUSTOM_DOMAIN, attrs=attrs, inputs=inputs,
                      outputs=produced)
        graph.nodes.append(new)
        note = ""
        bn = sole_bn_consumer(graph, new) if fold else None
        if bn is not None:
            reason = foldable_reason(graph, new, bn)
            if reason is None:
                fold_bn(graph, new, bn)
                note = f"BN {bn.name} folded; "
            else:
                note = f"BN not folded: {reason}; "
        for out in new.outputs:  # custom-op outputs: ONNX cannot infer them, so the graph carries them
            out.dtype = np.float32
        params = int(weight.size)
        bits = 8.0 * packed.nbytes / params
        sparsity = float(np.mean(ternary == 0))
        before_op = node.op + ("+Add" if form.absorbed else "")
        after_op = form.op + (f"+DepthToSpace({form.depth_to_space})" if form.depth_to_space else "")
        extra = 0 if form.bias is None else out_channels
        report.change(name, f"{before_op} -> {after_op}", shape, "ternary", params + extra,
                      params + channels + (0 if form.bias is None else channels),
                      note=f"{note}{bits:.2f} bits/w, {sparsity:.0%} zeros, rel. error {error:.3f}")
        return dict(name=name, op_before=before_op, op_after=form.op, params=params,
                    bits=round(bits, 4), sparsity=round(sparsity, 4), rel_error=round(error, 5),
                    bn_folded=note.startswith("BN ") and "not folded" not in note)


# ---------------------------------------------------------------- dequantize


def dequantize(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every ocomp Ternary* node replaced by its float op (weights alpha*T).

    TernaryConv -> Conv, TernaryGemm -> Gemm(transB=1), TernaryMatMul -> MatMul (+ Add for a bias).
    Output tensor names are kept. A debug tool, and the reference the runtime kernels are tested against.
    """
    graph = to_graph(model)
    for layer in weighted_layers(graph, ternary=True):
        node, name = layer.node, layer.name
        alpha = layer.alpha().astype(np.float32)
        weight = (alpha[:, None] * layer.codes()).reshape(layer.weight_shape)
        weight = gs.Constant(unique_name(graph, f"{name}.dequantized_weight"), weight.astype(np.float32))
        bias = input_at(node, 3)
        x, outputs = node.inputs[0], list(node.outputs)
        node.outputs.clear()
        node.inputs.clear()
        if node.op == "TernaryConv":
            attrs = {k: v for k, v in node.attrs.items() if k != "weight_shape"}
            new = [gs.Node("Conv", name=node.name, attrs=attrs, inputs=[x, weight] + ([bias] if bias else []),
                           outputs=outputs)]
        elif node.op == "TernaryGemm":
            new = [gs.Node("Gemm", name=node.name, attrs=dict(transB=1),
                           inputs=[x, weight] + ([bias] if bias else []), outputs=outputs)]
        else:
            transposed = gs.Constant(weight.name, np.ascontiguousarray(weight.values.T))
            if bias is None:
                new = [gs.Node("MatMul", name=node.name, inputs=[x, transposed], outputs=outputs)]
            else:
                mid = gs.Variable(unique_name(graph, f"{outputs[0].name}.matmul"), dtype=np.float32)
                new = [gs.Node("MatMul", name=node.name, inputs=[x, transposed], outputs=[mid]),
                       gs.Node("Add", name=unique_name(graph, f"{name}.add"), inputs=[mid, bias], outputs=outputs)]
        graph.nodes.extend(new)
    result = to_model(graph, model)
    if not any(n.domain == CUSTOM_DOMAIN for n in result.graph.node):
        opsets = [o for o in result.opset_import if o.domain != CUSTOM_DOMAIN]
        del result.opset_import[:]
        result.opset_import.extend(opsets)
    return result
