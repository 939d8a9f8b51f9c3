"""One model of a weighted layer: the table of weighted op kinds.

For every op kind (Conv, ConvTranspose, Gemm, MatMul and the ocomp ternary ops) one `Kind` entry says
where the weight and bias live, which weight axis holds the output and the input channels, how many
groups there are, how to slice channels out, how to view the weight as an (outputs, features) matrix
for fitting and ternarizing, how to write it back, and how many MACs the layer costs. Passes, the MAC
counter and `inspect` ask this table instead of knowing layouts themselves; adding an op kind is one
entry here (plus its tests).

    layer = layer_of(node)            # None: not a weighted layer with a constant weight
    layer.rows()                      # (out_channels, features) float64, the effective weights
    layer.bias()                      # (out_channels,) float64 effective bias (zeros when absent)
    layer.set_rows(graph, rows)       # write back (float kinds); layer.set_ternary(graph, T, alpha)
    layer.take_out(graph, kept)       # prune output channels; take_in for input channels

"Features" are the inputs one output sums over, in the order of the op's im2col view: for a Conv
(C/group, kH, kW) flattened; for Gemm/MatMul the K inputs. Rows are effective: Gemm's `alpha`
attribute and a ternary op's per-channel alpha are included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from .codec import pack_ternary, unpack_ternary
from .graph import (CUSTOM_DOMAIN, attr, bias_add, constant_value, has_padding, input_at, is_standard,
                    set_constant, sorted_nodes)


class Unsupported(Exception):
    """A form of a layer that an operation of the table does not handle; the message says why."""


def numel(dims) -> int:
    """Elements of a shape, symbolic or unknown dims counted as 1 (MACs are reported at batch 1)."""
    return int(np.prod([d if isinstance(d, (int, np.integer)) and d > 0 else 1 for d in dims], dtype=np.int64))


# ---------------------------------------------------------------- the kinds


@dataclass
class TernaryForm:
    """How a float layer becomes an ocomp ternary op: the op, its canonical weight (rows first, in the
    op's own weight_shape), attributes, a scalar that multiplies the weights, the per-output bias, the
    tensors it produces, nodes it absorbs, and a DepthToSpace block size to apply after it (or 0)."""

    op: str
    weight: np.ndarray
    attrs: dict
    scale: float
    bias: np.ndarray | None
    absorbed: list = field(default_factory=list)
    depth_to_space: int = 0


class Kind:
    """How one op kind lays out its weight. Methods take the node; `Layer` binds them."""

    op: ClassVar[str] = ""
    ternary: ClassVar[bool] = False
    float_op: ClassVar[str] = ""  # the float op it computes (itself for float kinds)
    bias_index: ClassVar[int | None] = 2  # the input holding the per-output bias (None: only a bias Add)
    output_axis: ClassVar[int] = 1  # the channel axis of the output tensor (-1: the last)
    constant_input_folds: ClassVar[bool] = True  # a constant input channel adds a constant to every output

    weight_ranks: ClassVar[tuple[int, ...]] = (2,)  # weight ranks the kind is a layer with

    def matches(self, node: gs.Node) -> bool:
        return node.op == self.op and (node.domain == CUSTOM_DOMAIN if self.ternary else is_standard(node))

    # -- shapes
    def weight(self, node: gs.Node) -> np.ndarray | None:
        return constant_value(input_at(node, 1))

    def weight_shape(self, node: gs.Node) -> tuple[int, ...]:
        return tuple(int(d) for d in self.weight(node).shape)

    def groups(self, node: gs.Node) -> int:
        return 1

    def out_channels(self, node: gs.Node) -> int:
        raise NotImplementedError

    def in_channels(self, node: gs.Node) -> int:
        raise NotImplementedError

    def macs(self, node: gs.Node, in_shape, out_shape) -> int:
        """Multiply-accumulates for the given input/output shapes (dims as given: pass out[1:] for batch 1)."""
        return numel(out_shape) * self.features(node)

    def features(self, node: gs.Node) -> int:
        """Inputs summed by one output."""
        return int(np.prod(self.weight_shape(node), dtype=np.int64)) // self.out_channels(node)

    # -- the matrix view
    def rows(self, node: gs.Node) -> np.ndarray:
        raise NotImplementedError

    def stored(self, node: gs.Node, rows: np.ndarray) -> np.ndarray:
        """`rows` in the op's own weight layout."""
        raise NotImplementedError

    # -- slicing (pruning): the weight axes of output and input channels
    def out_axis(self, node: gs.Node) -> int:
        raise NotImplementedError

    def in_axis(self, node: gs.Node) -> int:
        raise NotImplementedError

    # -- ternary encoding
    def ternary_form(self, layer: "Layer", graph: gs.Graph) -> TernaryForm:
        """The ternary op this layer becomes; raises Unsupported with the reason."""
        raise Unsupported(f"{self.op} has no ternary form")


class _ConvLike(Kind):
    weight_ranks = (3, 4, 5)

    def groups(self, node: gs.Node) -> int:
        return int(attr(node, "group", 1))

    def conv_attrs(self, node: gs.Node) -> dict:
        """Explicit kernel_shape, strides, pads (begins + ends), dilations and group; raises Unsupported."""
        shape = self.weight_shape(node)
        if len(shape) != 4:
            raise Unsupported(f"{len(shape) - 2}-D {node.op}; only 2-D is supported")
        kernel = [int(k) for k in shape[2:]]
        if "kernel_shape" in node.attrs and [int(k) for k in node.attrs["kernel_shape"]] != kernel:
            raise Unsupported("kernel_shape attribute disagrees with the weight shape")
        strides = [int(s) for s in node.attrs.get("strides", [1, 1])]
        dilations = [int(d) for d in node.attrs.get("dilations", [1, 1])]
        auto_pad = attr(node, "auto_pad", "NOTSET")
        if auto_pad == "NOTSET":
            pads = [int(p) for p in node.attrs.get("pads", [0, 0, 0, 0])]
        elif auto_pad == "VALID":
            pads = [0, 0, 0, 0]
        elif auto_pad in ("SAME_UPPER", "SAME_LOWER") and node.op == "Conv":
            pads = _same_pads(node, auto_pad, kernel, strides, dilations)
        else:
            raise Unsupported(f"auto_pad {auto_pad}")
        return dict(kernel_shape=kernel, strides=strides, pads=pads, dilations=dilations,
                    group=self.groups(node))



def _same_pads(node: gs.Node, auto_pad: str, kernel, strides, dilations) -> list[int]:
    shape = node.inputs[0].shape
    spatial = list(shape[2:]) if shape is not None and len(shape) == 4 else []
    if len(spatial) != 2 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in spatial):
        raise Unsupported(f"auto_pad={auto_pad} with unknown input spatial size")
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        out = -(-int(size) // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - int(size))
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


class Conv(_ConvLike):
    """ONNX Conv: weight (K, C/group, k...), bias (K,)."""

    op = float_op = "Conv"

    def out_channels(self, node):
        return self.weight_shape(node)[0]

    def in_channels(self, node):
        return self.weight_shape(node)[1] * self.groups(node)

    def out_axis(self, node):
        return 0

    def in_axis(self, node):
        return 1

    def rows(self, node):
        w = np.asarray(self.weight(node), np.float64)
        return w.reshape(w.shape[0], -1)

    def stored(self, node, rows):
        return rows.reshape(self.weight_shape(node))

    def ternary_form(self, layer, graph):
        attrs = self.conv_attrs(layer.node)
        return TernaryForm("TernaryConv", layer.weight(), attrs, 1.0, _constant_bias(layer, graph))


def _constant_bias(layer: "Layer", graph: gs.Graph) -> np.ndarray | None:
    """The layer's effective bias, None when it has none; raises Unsupported when it is not a constant."""
    owner = layer.bias_owner(graph)
    tensor = input_at(*owner) if owner is not None else None
    if tensor is None:
        return None
    value = constant_value(tensor)
    if value is None:
        raise Unsupported("bias is not a constant")
    value = np.asarray(value)
    if value.size not in (1, layer.out_channels) or (value.ndim > 1 and any(d != 1 for d in value.shape[:-1])):
        raise Unsupported("bias is not a constant of shape [N] or [1,N]")
    return layer.bias(graph)


class ConvTranspose(_ConvLike):
    """ONNX ConvTranspose: weight (C, K/group, k...), bias (K,). Output channel o of group g sums the
    inputs of group g: its row is W[g*C/group:(g+1)*C/group, o % (K/group)] flattened."""

    op = float_op = "ConvTranspose"
    constant_input_folds = False  # an output pixel sums a position-dependent number of taps

    def out_channels(self, node):
        return self.weight_shape(node)[1] * self.groups(node)

    def in_channels(self, node):
        return self.weight_shape(node)[0]

    def out_axis(self, node):
        return 1

    def in_axis(self, node):
        return 0

    def macs(self, node, in_shape, out_shape):
        # every input element meets K/group * prod(kernel) weights
        shape = self.weight_shape(node)
        return numel(in_shape) * int(np.prod(shape[1:], dtype=np.int64))

    def _split(self, node):
        shape = self.weight_shape(node)
        g = self.groups(node)
        return g, shape[0] // g, shape[1], int(np.prod(shape[2:], dtype=np.int64))

    def rows(self, node):
        g, cg, kg, taps = self._split(node)
        w = np.asarray(self.weight(node), np.float64).reshape(g, cg, kg, taps)
        return w.transpose(0, 2, 1, 3).reshape(g * kg, cg * taps)

    def stored(self, node, rows):
        g, cg, kg, taps = self._split(node)
        return rows.reshape(g, kg, cg, taps).transpose(0, 2, 1, 3).reshape(self.weight_shape(node))

    def ternary_form(self, layer, graph):
        """A ConvTranspose whose kernel equals its stride (no padding, no overlap: every output pixel is one
        tap, the usual 2x2 stride-2 upsampling of decoders) is exactly a 1x1 TernaryConv with K*s*s outputs,
        ordered (o, i, j), followed by DepthToSpace(s, CRD). Other forms stay float."""
        node = layer.node
        shape = layer.weight_shape
        if len(shape) != 4 or layer.groups != 1:
            raise Unsupported("only 2-D ConvTranspose with group 1 has a ternary form")
        kernel = list(shape[2:])
        strides = [int(v) for v in node.attrs.get("strides", [1, 1])]
        if kernel != strides or kernel[0] != kernel[1]:
            raise Unsupported("ConvTranspose whose kernel differs from its stride (overlapping taps)")
        if any(int(v) for v in node.attrs.get("pads", [0, 0, 0, 0])) or \
                any(int(v) for v in node.attrs.get("output_padding", [0, 0])) or \
                any(int(v) != 1 for v in node.attrs.get("dilations", [1, 1])) or \
                attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID") or "output_shape" in node.attrs:
            raise Unsupported("ConvTranspose with padding, output_padding, dilation or output_shape")
        s = kernel[0]
        w = layer.weight()  # (C, K, s, s) -> rows (K*s*s, C, 1, 1) ordered (o, i, j)
        weight = np.ascontiguousarray(w.transpose(1, 2, 3, 0).reshape(shape[1] * s * s, shape[0], 1, 1))
        bias = _constant_bias(layer, graph)
        attrs = dict(kernel_shape=[1, 1], strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1], group=1)
        return TernaryForm("TernaryConv", weight, attrs, 1.0, None if bias is None else np.repeat(bias, s * s),
                           depth_to_space=s)


class Gemm(Kind):
    """ONNX Gemm with a constant B: weight (K, N), or (N, K) with transB; bias C times beta; alpha scales."""

    op = float_op = "Gemm"

    def _trans(self, node) -> bool:
        return bool(int(attr(node, "transB", 0)))

    def out_channels(self, node):
        shape = self.weight_shape(node)
        return shape[0] if self._trans(node) else shape[1]

    def in_channels(self, node):
        shape = self.weight_shape(node)
        return shape[1] if self._trans(node) else shape[0]

    def out_axis(self, node):
        return 0 if self._trans(node) else 1

    def in_axis(self, node):
        return 1 if self._trans(node) else 0

    def rows(self, node):
        w = np.asarray(self.weight(node), np.float64)
        return (w if self._trans(node) else w.T) * float(attr(node, "alpha", 1.0))

    def stored(self, node, rows):
        return rows if self._trans(node) else rows.T

    def ternary_form(self, layer, graph):
        node = layer.node
        if int(attr(node, "transA", 0)):
            raise Unsupported("Gemm with transA=1")
        w = layer.weight()
        if w.ndim != 2:
            raise Unsupported("Gemm weight is not 2-D")
        rows = np.ascontiguousarray(w if self._trans(node) else w.T)
        return TernaryForm("TernaryGemm", rows, {}, float(attr(node, "alpha", 1.0)), _constant_bias(layer, graph))


class MatMul(Kind):
    """ONNX MatMul with a constant 2-D B: weight (K, N); a bias only through a following Add."""

    op = float_op = "MatMul"
    bias_index = None
    output_axis = -1

    def out_channels(self, node):
        return self.weight_shape(node)[-1]

    def in_channels(self, node):
        return self.weight_shape(node)[-2]

    def out_axis(self, node):
        return 1

    def in_axis(self, node):
        return 0

    def rows(self, node):
        w = np.asarray(self.weight(node), np.float64)
        if w.ndim != 2:
            raise Unsupported(f"MatMul weight has rank {w.ndim}; only a 2-D (K, N) weight is supported")
        return w.T

    def stored(self, node, rows):
        return rows.T

    def ternary_form(self, layer, graph):
        w = layer.weight()
        if w.ndim != 2:
            raise Unsupported(f"MatMul weight has rank {w.ndim}; only a 2-D (K, N) weight is supported")
        x_shape = layer.node.inputs[0].shape
        if x_shape is None or len(x_shape) < 2:
            raise Unsupported("MatMul input rank unknown or below 2")
        found = layer.bias_add(graph)
        bias = layer.bias(graph) if found is not None else None
        return TernaryForm("TernaryMatMul", np.ascontiguousarray(w.T), {}, 1.0, bias,
                           absorbed=[found[0]] if found is not None else [])


class _Ternary(Kind):
    """ocomp ternary ops: inputs X, packed 2-bit T (rows are outputs), alpha (N,), bias (N,) optional."""

    ternary = True
    bias_index = 3
    weight_ranks = (1,)  # the packed codes

    def weight(self, node):
        return constant_value(input_at(node, 1))  # the packed codes

    def weight_shape(self, node):
        return tuple(int(d) for d in node.attrs["weight_shape"])

    def out_channels(self, node):
        return self.weight_shape(node)[0]

    def in_channels(self, node):
        return self.weight_shape(node)[1]

    def codes(self, node) -> np.ndarray:
        """T as (outputs, features) int8."""
        shape = self.weight_shape(node)
        return unpack_ternary(self.weight(node), shape).reshape(shape[0], -1)

    def alpha(self, node) -> np.ndarray:
        return np.asarray(constant_value(input_at(node, 2)), np.float64).reshape(-1)

    def rows(self, node):
        return self.alpha(node)[:, None] * self.codes(node).astype(np.float64)


class TernaryConv(_Ternary, _ConvLike):
    op = "TernaryConv"
    float_op = "Conv"

    def in_channels(self, node):
        return self.weight_shape(node)[1] * self.groups(node)


class TernaryGemm(_Ternary):
    op = "TernaryGemm"
    float_op = "Gemm"


class TernaryMatMul(_Ternary):
    op = "TernaryMatMul"
    float_op = "MatMul"
    output_axis = -1


KINDS: tuple[Kind, ...] = (Conv(), ConvTranspose(), Gemm(), MatMul(), TernaryConv(), TernaryGemm(),
                           TernaryMatMul())
TERNARY_OPS = tuple(k.op for k in KINDS if k.ternary)
FLOAT_OPS = tuple(k.op for k in KINDS if not k.ternary)


def kind_of(node: gs.Node) -> Kind | None:
    for kind in KINDS:
        if kind.matches(node):
            return kind
    return None


def is_ternary(node: gs.Node) -> bool:
    kind = kind_of(node)
    return kind is not None and kind.ternary


# ---------------------------------------------------------------- a bound layer


@dataclass
class Layer:
    """A weighted node with its kind; the entry point for everything that reads or writes weights."""

    node: gs.Node
    kind: Kind
    _add: tuple[gs.Node, int] | None = field(default=None, repr=False)  # a MatMul's bias Add (found lazily)
    _add_known: bool = field(default=False, repr=False)

    @property
    def name(self) -> str:
        # an unnamed node by its first named output (a chained TernaryConv may leave output 0 empty)
        return self.node.name or next((t.name for t in self.node.outputs if t.name), "")

    @property
    def op(self) -> str:
        return self.node.op

    @property
    def ternary(self) -> bool:
        return self.kind.ternary

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.kind.weight_shape(self.node)

    @property
    def groups(self) -> int:
        return self.kind.groups(self.node)

    @property
    def out_channels(self) -> int:
        return self.kind.out_channels(self.node)

    @property
    def in_channels(self) -> int:
        return self.kind.in_channels(self.node)

    @property
    def features(self) -> int:
        return self.kind.features(self.node)

    @property
    def output_axis(self) -> int:
        return self.kind.output_axis

    @property
    def depthwise(self) -> bool:
        """A grouped conv with one input and one output channel a group."""
        return (isinstance(self.kind, _ConvLike) and self.groups > 1 and self.groups == self.out_channels
                and self.groups == self.in_channels)

    def weight(self) -> np.ndarray:
        return np.asarray(self.kind.weight(self.node))

    def rows(self) -> np.ndarray:
        return self.kind.rows(self.node)

    def macs(self, in_shape, out_shape) -> int:
        return self.kind.macs(self.node, in_shape, out_shape)

    def conv_attrs(self) -> dict:
        if not isinstance(self.kind, _ConvLike):
            raise Unsupported(f"{self.op} has no convolution attributes")
        return self.kind.conv_attrs(self.node)

    def has_padding(self) -> bool:
        return isinstance(self.kind, _ConvLike) and has_padding(self.node)

    # -- bias
    def bias_add(self, graph: gs.Graph) -> tuple[gs.Node, int] | None:
        """A MatMul's bias Add (node, input index), else None."""
        if self.kind.bias_index is not None:
            return None
        if not self._add_known:
            self._add, self._add_known = bias_add(graph, self.node, self.out_channels), True
        return self._add

    def bias_owner(self, graph: gs.Graph) -> tuple[gs.Node, int] | None:
        """Where the per-output bias lives (node, input index); None when the layer cannot have one."""
        if self.kind.bias_index is not None:
            return self.node, self.kind.bias_index
        return self.bias_add(graph)

    def has_bias(self, graph: gs.Graph) -> bool:
        owner = self.bias_owner(graph)
        return owner is not None and input_at(*owner) is not None

    def bias(self, graph: gs.Graph) -> np.ndarray:
        """The effective per-output bias (zeros when there is none)."""
        owner = self.bias_owner(graph)
        value = constant_value(input_at(*owner)) if owner is not None else None
        channels = self.out_channels
        if value is None:
            return np.zeros(channels)
        value = np.asarray(value, np.float64)
        if self.op == "Gemm":
            return float(attr(self.node, "beta", 1.0)) * np.broadcast_to(value.reshape(-1), (channels,)).copy()
        return value.reshape(-1).copy()

    def set_bias(self, graph: gs.Graph, bias: np.ndarray) -> None:
        """Make the effective per-output bias `bias` (adds a bias input when there is none)."""
        owner = self.bias_owner(graph)
        if owner is None:
            raise Unsupported(f"{self.op} '{self.name}' has no bias input and no bias Add")
        node, index = owner
        current = constant_value(input_at(node, index))
        if node is not self.node:  # a bias Add keeps its constant's shape
            value = np.asarray(bias).reshape(current.shape).astype(current.dtype)
        else:
            value = np.asarray(bias).reshape(-1).astype(self._dtype())
        if self.op == "Gemm":
            node.attrs["beta"] = 1.0
        set_constant(graph, node, index, value, f"{self.name}.bias")

    def _dtype(self):
        if self.ternary:
            return np.float32
        weight = self.weight()
        return weight.dtype if np.issubdtype(weight.dtype, np.floating) else np.float32

    # -- weights
    def set_rows(self, graph: gs.Graph, rows: np.ndarray) -> None:
        """Write effective float weights (outputs, features) back in the op's own layout."""
        if self.ternary:
            raise Unsupported(f"{self.op} stores ternary codes; use set_ternary")
        if self.op == "Gemm":
            self.node.attrs["alpha"] = 1.0
        stored = self.kind.stored(self.node, np.asarray(rows)).astype(self._dtype())
        set_constant(graph, self.node, 1, stored, f"{self.name}.weight")

    def codes(self) -> np.ndarray:
        return self.kind.codes(self.node)

    def alpha(self) -> np.ndarray:
        return self.kind.alpha(self.node)

    def set_ternary(self, graph: gs.Graph, codes: np.ndarray | None, alpha: np.ndarray) -> None:
        """New codes T (outputs, features; None keeps them) and per-output alpha of a ternary op."""
        if codes is not None:
            set_constant(graph, self.node, 1, pack_ternary(codes), f"{self.name}.ternary_weight")
        set_constant(graph, self.node, 2, np.asarray(alpha, np.float32).reshape(-1), f"{self.name}.alpha")

    def scale_outputs(self, graph: gs.Graph, scale: np.ndarray) -> None:
        """Multiply every output channel's weights by `scale` (a ternary op's alpha)."""
        scale = np.asarray(scale, np.float64).reshape(-1)
        if self.ternary:
            self.set_ternary(graph, None, self.alpha() * scale)
        else:
            self.set_rows(graph, self.rows() * scale[:, None])

    def input_contribution(self, positions: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Per output: what input channels `positions` holding the constants `values` add to it."""
        rows = self.rows()
        per_group = self.in_channels // self.groups
        taps = rows.shape[1] // per_group
        return rows.reshape(rows.shape[0], per_group, taps)[:, positions].sum(axis=2) @ values

    # -- pruning
    def take_out(self, graph: gs.Graph, kept: np.ndarray) -> None:
        """Keep only output channels `kept` (weight and bias; a depthwise conv's group count follows)."""
        depthwise = self.depthwise
        self._take(graph, 1, kept, self.kind.out_axis(self.node), "weight")
        index = self.kind.bias_index  # (a MatMul's bias Add is an element-wise op: the channel analysis slices it)
        if index is not None and input_at(self.node, index) is not None:
            self._take(graph, index, kept, -1, "bias")
        if depthwise:
            self.node.attrs["group"] = int(len(kept))

    def take_in(self, graph: gs.Graph, kept: np.ndarray) -> None:
        """Keep only input channels `kept` (group-1 layers)."""
        self._take(graph, 1, kept, self.kind.in_axis(self.node), "weight")

    def _take(self, graph, index, kept, axis, suffix) -> None:
        node = self.node
        value = np.asarray(constant_value(input_at(node, index)))
        if value.ndim == 0 or value.shape[axis] == 1:
            return  # broadcast along the channel axis
        set_constant(graph, node, index, np.take(value, kept, axis=axis), f"{self.name}.{suffix}")


def layer_of(node: gs.Node) -> Layer | None:
    """The node as a weighted layer, or None (not in the table, or its weight is not a constant)."""
    kind = kind_of(node)
    if kind is None or len(node.inputs) < 2:
        return None
    weight = kind.weight(node)
    if weight is None or np.ndim(weight) not in kind.weight_ranks or not np.issubdtype(np.asarray(weight).dtype,
                                                                                       np.number):
        return None  # (a MatMul by a vector, a 1-D Gemm weight: not a layer with channels)
    return Layer(node, kind)


def weighted_layers(graph: gs.Graph, ternary: bool | None = None) -> list[Layer]:
    """Weighted layers in topological order (`ternary`: only ternary / only float ones)."""
    found = [layer_of(n) for n in sorted_nodes(graph)]
    return [la for la in found if la is not None and (ternary is None or la.ternary == ternary)]
