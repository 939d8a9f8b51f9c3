"""Pass `ternary`: per-channel ternary weights executed by the add-only `ocomp` custom ops.

The 2-bit codec lives here (and, for C++, in runtime/packing.h; tests/test_codec.py
holds the two to each other).

Encoding: weights are flattened in the op's canonical weight layout (row-major;
TernaryConv: ONNX Conv layout (K, C/group, kH, kW); TernaryGemm/TernaryMatMul:
(N, K), one row per output). Weight i goes into byte i // 4 at bits
2*(i % 4) .. 2*(i % 4)+1 (least significant pair first). Codes: 0b00 -> 0,
0b01 -> +1, 0b10 -> -1; 0b11 is invalid. Padding codes in the last byte are 0.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ocomp.errors import UsageError
from ocomp.graph import STANDARD_DOMAINS, boundary_layers, const_value, input_at, is_graph_output, unique_name, weighted_nodes
from ocomp.model import CUSTOM_DOMAIN, to_graph, to_model
from ocomp.pipeline import Context, Option, Pass, Report, register

from .foldbn import constant, fold_bn, foldable_reason, sole_bn_consumer

CODE_ZERO = 0b00
CODE_PLUS = 0b01
CODE_MINUS = 0b10


def pack_ternary(ternary: np.ndarray) -> np.ndarray:
    """Pack an array of {-1, 0, +1} into uint8, four 2-bit codes a byte."""
    flat = np.asarray(ternary).reshape(-1)
    if flat.size and not np.isin(flat, (-1, 0, 1)).all():
        raise ValueError("pack_ternary: values must be -1, 0 or +1")
    codes = np.where(flat > 0, CODE_PLUS, np.where(flat < 0, CODE_MINUS, CODE_ZERO)).astype(np.uint8)
    padded = np.zeros(((codes.size + 3) // 4) * 4, dtype=np.uint8)
    padded[: codes.size] = codes
    quads = padded.reshape(-1, 4)
    return (quads[:, 0] | (quads[:, 1] << 2) | (quads[:, 2] << 4) | (quads[:, 3] << 6)).astype(np.uint8)


def unpack_ternary(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of pack_ternary: int8 array of {-1, 0, +1} with the given shape."""
    count = int(np.prod(shape, dtype=np.int64))
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size != (count + 3) // 4:
        raise ValueError(f"unpack_ternary: {packed.size} bytes cannot hold {count} weights")
    codes = np.stack([(packed >> s) & 0b11 for s in (0, 2, 4, 6)], axis=1).reshape(-1)[:count]
    if (codes == 0b11).any():
        raise ValueError("unpack_ternary: invalid code 0b11")
    values = np.zeros(count, dtype=np.int8)
    values[codes == CODE_PLUS] = 1
    values[codes == CODE_MINUS] = -1
    return values.reshape(shape)


# ---------------------------------------------------------------- ternarization

TERNARY_OPS = ("TernaryConv", "TernaryGemm", "TernaryMatMul")
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
    order = np.argsort(-mag, axis=1, kind="stable")
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


# ---------------------------------------------------------------- matching


class _Skip(Exception):
    """A layer left in float, with the reason."""


def _conv_attrs(node: gs.Node, weight: np.ndarray) -> dict:
    if weight.ndim != 4:
        raise _Skip(f"{weight.ndim - 2}-D Conv; TernaryConv supports 2-D Conv only")
    kernel = [int(k) for k in weight.shape[2:]]
    if "kernel_shape" in node.attrs and [int(k) for k in node.attrs["kernel_shape"]] != kernel:
        raise _Skip("kernel_shape attribute disagrees with the weight shape")
    strides = [int(s) for s in node.attrs.get("strides", [1, 1])]
    dilations = [int(d) for d in node.attrs.get("dilations", [1, 1])]
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad == "NOTSET":
        pads = [int(p) for p in node.attrs.get("pads", [0, 0, 0, 0])]
    elif auto_pad == "VALID":
        pads = [0, 0, 0, 0]
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        shape = node.inputs[0].shape
        spatial = list(shape[2:]) if shape is not None and len(shape) == 4 else []
        if len(spatial) != 2 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in spatial):
            raise _Skip(f"auto_pad={auto_pad} with unknown input spatial size")
        begins, ends = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            out = -(-int(size) // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - int(size))
            small, large = total // 2, total - total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else large)
            ends.append(large if auto_pad == "SAME_UPPER" else small)
        pads = begins + ends
    else:
        raise _Skip(f"unknown auto_pad {auto_pad}")
    return dict(kernel_shape=kernel, strides=strides, pads=pads, dilations=dilations,
                group=int(node.attrs.get("group", 1)))


def _per_output_vector(value: np.ndarray | None, channels: int) -> np.ndarray | None:
    """A constant equivalent to one value per output (shapes [], [1], [N], [1,N], [1,1]), else None."""
    if value is None:
        return None
    value = np.asarray(value)
    if value.ndim > 2 or any(d != 1 for d in value.shape[:-1]) or value.size not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1).astype(np.float64), (channels,)).copy()


def _match(graph: gs.Graph, node: gs.Node) -> dict:
    """The float layer as (op, weight rows (N, ...), attrs, scale, bias, outputs, absorbed nodes); raises _Skip."""
    weight = np.asarray(const_value(input_at(node, 1)))
    if not np.issubdtype(weight.dtype, np.floating):
        raise _Skip(f"weight dtype {weight.dtype} is not floating point")
    if node.op == "Conv":
        attrs = _conv_attrs(node, weight)
        bias_in = input_at(node, 2)
        bias = None
        if bias_in is not None:
            bias = constant(bias_in)
            if bias is None:
                raise _Skip("bias is not a constant")
        return dict(op="TernaryConv", weight=weight, attrs=attrs, scale=1.0, bias=bias,
                    outputs=list(node.outputs), absorbed=[])
    if node.op == "Gemm":
        if int(node.attrs.get("transA", 0)):
            raise _Skip("Gemm with transA=1")
        if weight.ndim != 2:
            raise _Skip("Gemm weight is not 2-D")
        rows = weight if int(node.attrs.get("transB", 0)) else weight.T
        bias = None
        c_in = input_at(node, 2)
        if c_in is not None:
            bias = _per_output_vector(constant(c_in), rows.shape[0])
            if bias is None:
                raise _Skip("Gemm bias C is not a constant of shape [N] or [1,N]")
            bias = bias * float(node.attrs.get("beta", 1.0))
        return dict(op="TernaryGemm", weight=np.ascontiguousarray(rows), attrs={},
                    scale=float(node.attrs.get("alpha", 1.0)), bias=bias, outputs=list(node.outputs), absorbed=[])
    # MatMul
    if weight.ndim != 2:
        raise _Skip(f"MatMul weight has rank {weight.ndim}; only a 2-D (K, N) weight is supported")
    x_shape = node.inputs[0].shape
    if x_shape is None or len(x_shape) < 2:
        raise _Skip("MatMul input rank unknown or below 2")
    rows = np.ascontiguousarray(weight.T)
    outputs, absorbed, bias = list(node.outputs), [], None
    out = node.outputs[0]
    if len(out.outputs) == 1 and not is_graph_output(graph, out):
        add = out.outputs[0]
        if add.op == "Add" and add.domain in STANDARD_DOMAINS and len(add.inputs) == 2:
            other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
            vector = _per_output_vector(constant(other), rows.shape[0])
            if other is not out and vector is not None and np.asarray(constant(other)).ndim <= len(x_shape):
                bias, outputs, absorbed = vector, list(add.outputs), [add]
    return dict(op="TernaryMatMul", weight=rows, attrs={}, scale=1.0, bias=bias, outputs=outputs, absorbed=absorbed)


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
        Option("min_params", int, DEFAULT_MIN_PARAMS, "layers with fewer weights stay float: tiny layers (depthwise "
               "3x3, SE convs, small 1x1 shortcuts) save a few bytes and are the most sensitive to ternary"),
        Option("fold_bn", bool, False, "fold a following BatchNormalization into alpha and bias "
               "(off by default so bnrecal can recalibrate BN after ternary)"),
    )

    def run(self, graph: gs.Graph, ctx: Context) -> Report:
        opts = ctx.options
        report = Report(self.name)
        solver = THRESHOLDS[opts["threshold"]]
        weighted = weighted_nodes(graph)
        names = {n.name for n in weighted}
        unknown = [s for s in opts["skip"] if s not in names]
        if unknown:
            raise UsageError(f"--ternary-skip: no Conv/Gemm/MatMul with a constant weight is named "
                             f"{', '.join(repr(u) for u in unknown)}")
        first, last = boundary_layers(graph, weighted)
        rows = []
        for node in weighted:
            name = node.name or node.outputs[0].name
            weight = np.asarray(const_value(input_at(node, 1)))
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
                layer = _match(graph, node)
            except _Skip as why:
                report.skip(name, node.op, f"unsupported form: {why}")
                continue
            rows.append(self._rewrite(graph, node, name, layer, solver, opts["fold_bn"], report))
        report.details["threshold"] = opts["threshold"]
        report.details["layers"] = rows
        report.details["ternarized"] = len(rows)
        return report

    def _rewrite(self, graph: gs.Graph, node: gs.Node, name: str, layer: dict, solver, fold: bool,
                 report: Report) -> dict:
        weight = layer["weight"]
        channels = weight.shape[0]
        flat = weight.reshape(channels, -1)
        ternary, alpha = solver(flat)
        error = ternary_error(flat, ternary, alpha)
        packed = pack_ternary(ternary)
        inputs = [node.inputs[0],
                  gs.Constant(unique_name(graph, f"{name}.ternary_weight"), packed),
                  gs.Constant(unique_name(graph, f"{name}.alpha"), (alpha * layer["scale"]).astype(np.float32))]
        if layer["bias"] is not None:
            bias = np.asarray(layer["bias"], dtype=np.float32).reshape(-1)
            inputs.append(gs.Constant(unique_name(graph, f"{name}.bias"), bias))
        attrs = dict(layer["attrs"], weight_shape=[int(d) for d in weight.shape])
        outputs = layer["outputs"]
        for absorbed in [node, *layer["absorbed"]]:
            absorbed.outputs.clear()
            absorbed.inputs.clear()
        new = gs.Node(layer["op"], name=node.name, domain=CUSTOM_DOMAIN, attrs=attrs, inputs=inputs,
                      outputs=outputs)
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
        before_op = {"TernaryConv": "Conv", "TernaryGemm": "Gemm"}.get(layer["op"], "MatMul")
        if layer["absorbed"]:
            before_op = "MatMul+Add"
        extra = 0 if layer["bias"] is None else channels
        report.change(name, f"{before_op} -> {layer['op']}", list(weight.shape), "ternary", params + extra,
                      params + channels + extra,
                      note=f"{note}{bits:.2f} bits/w, {sparsity:.0%} zeros, rel. error {error:.3f}")
        return dict(name=name, op_before=before_op, op_after=layer["op"], params=params,
                    bits=round(bits, 4), sparsity=round(sparsity, 4), rel_error=round(error, 5),
                    bn_folded=note.startswith("BN ") and "not folded" not in note)


# ---------------------------------------------------------------- dequantize


def dequantize(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every ocomp Ternary* node replaced by its float op (weights alpha*T).

    TernaryConv -> Conv, TernaryGemm -> Gemm(transB=1), TernaryMatMul -> MatMul (+ Add for a bias).
    Output tensor names are kept. A debug tool, and the reference the runtime kernels are tested against.
    """
    graph = to_graph(model)
    for node in [n for n in graph.nodes if n.domain == CUSTOM_DOMAIN and n.op in TERNARY_OPS]:
        name = node.name or node.outputs[0].name
        shape = tuple(int(d) for d in node.attrs["weight_shape"])
        alpha = np.asarray(const_value(node.inputs[2]), dtype=np.float32).reshape(-1)
        weight = alpha.reshape(-1, *([1] * (len(shape) - 1))) * unpack_ternary(const_value(node.inputs[1]), shape)
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
