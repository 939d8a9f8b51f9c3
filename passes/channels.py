"""Channel-group (dependency) analysis: which channels of which tensors must be removed together.

This module only *finds* what must change together; deciding what to remove is
passes/prune.py's job (bnrecal reuses the analysis to map channels back).

Vocabulary
----------
* An **atom** is the output-channel space of one producer: a Conv (group 1), a
  Gemm or a MatMul with a constant weight. Producers whose outputs must keep the
  same channel subset (residual Add/Sum, SE Mul, ...) have their atoms unified.
* A **group** (`ChannelGroup`) is a set of unified atoms: one channel count,
  one kept subset. Its `id` is the name of its first producer (topological order).
* Every tensor whose channel axis is tracked has a **layout**: the axis and a
  list of `Segment`s (Concat on the channel axis concatenates segments, Flatten
  gives each channel a block of H*W consecutive features). A segment with
  `atom=None` holds channels that never change (e.g. a graph input concatenated in).
* **Constant channels**: a constant concatenated in on the channel axis (an initializer, a Constant, a
  ConstantOfShape of a constant shape: BlazeFace's zero channels) or the channels a constant-mode Pad adds
  on the channel axis (PyTorch BlazeFace's `F.pad`) are atoms of their own, owned by that node but produced
  by no layer. Input channel i of such a Concat or Pad is output channel i + (channels before it); the
  constant channels can be removed like any other by slicing the constant or shrinking the shape/pads, so
  a residual Add of a conv branch with a zero-padded shortcut joins them with the conv's extra channels.
  A group made only of constant channels (no layer produces it) is pinned.
* When two tensors combined element-wise have the same channel count but different segment boundaries
  (e.g. [shortcut 24 | zeros 4] + [conv 28]), the atoms are **split** at the boundaries (everywhere they
  occur) so that the pieces can be unified: the conv's first 24 channels join the shortcut's group, its
  last 4 the zeros'. A producer may thus hold several groups; `positions` says where each one lies.
* `Consumer`s are the rewrite actions: which node must be sliced, how, and by the
  kept indices of which tensor. The kept indices of a tensor follow from the
  kept channels of the groups in its layout (`ChannelAnalysis.kept_indices`).
* A group is **pinned** (left unchanged) when any node touching it is not
  understood, when it reaches a graph output, when it meets a grouped Conv, ...;
  `pinned_by` names the nodes and reasons.

Understood: BatchNormalization, InstanceNormalization, element-wise unary ops
(Relu, LeakyRelu, Clip, Sigmoid, HardSigmoid, HardSwish, Tanh, ...), Identity,
Dropout, Cast, PRelu, Add/Sub/Mul/Div/Pow/Max/Min/Sum/Mean with scalar or
per-channel constants or with other tracked tensors (residuals, SE), pooling,
Slice/Resize not touching the channel axis, Pad (constant mode on the channel
axis, any mode on others), Reduce* over other axes, Softmax over another axis,
Transpose, Squeeze/Unsqueeze, Concat (constants concatenated in included), Flatten and
Reshape (flatten-like or adding/removing unit dims) feeding Gemm/MatMul,
depthwise Conv (pruned together with its input). Grouped Conv (1 < group,
not depthwise) is left unchanged: whole-group pruning is not implemented.
Constant sub-expressions (Reshape/Unsqueeze/Cast/... of constants, e.g.
PaddlePaddle's reshaped biases) are evaluated and treated as constants.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from ocomp.graph import attr, constant_value, input_at, is_empty, is_standard, rank_of, static_dims
from ocomp.layers import Layer, kind_of, layer_of

# Ops applied element-wise to one tensor (channel layout passes through).
UNARY_OPS = frozenset({
    "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Identity", "Dropout",
    "Elu", "Selu", "Celu", "Softplus", "Softsign", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal",
    "Floor", "Ceil", "Round", "Sign", "Erf", "Gelu", "Mish", "ThresholdedRelu", "Cast", "Sin", "Cos",
})
# Element-wise ops on several tensors (numpy broadcasting).
BINARY_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu"})
POOL_OPS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
REDUCE_OPS = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2",
                        "ReduceProd", "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp"})
# Consumer kinds (rewrite actions). How a weighted layer slices its weight is the layer table's business
# (ocomp/layers.py: Layer.take_out / take_in); the analysis only says which channels.
LAYER_OUT = "layer_out"      # a weighted layer's output channels (weight and own bias) by its output's kept indices
LAYER_IN = "layer_in"        # a group-1 weighted layer's input channels by its input's kept indices
DEPTHWISE = "depthwise"      # depthwise Conv: weight, bias and `group` attribute by its input's kept indices
NORM = "norm"                # BatchNormalization / InstanceNormalization parameters
CONST = "const"              # a per-channel constant operand of an element-wise op
RESHAPE = "reshape"          # the constant target shape of a Reshape
RESIZE = "resize"            # the constant `sizes` of a Resize
SHAPE = "shape"              # the constant shape input of a ConstantOfShape whose output is concatenated in
PAD = "pad"                  # the channel pads of a Pad (pads[axis], pads[axis + n]; index -1: the attribute)
EXIT_KINDS = (LAYER_IN,)  # where channels are summed away (dead-channel folding happens here)
PRODUCER_KINDS = (LAYER_OUT,)


@dataclass(frozen=True)
class Segment:
    """`size` channels of `atom` (None: channels that never change), each `block` consecutive elements wide."""

    atom: int | None
    size: int
    block: int = 1


@dataclass(frozen=True)
class Layout:
    """How a tensor's channel axis is made of group channels."""

    axis: int
    segments: tuple[Segment, ...]

    @property
    def total(self) -> int:
        return sum(s.size * s.block for s in self.segments)

    def blocked(self) -> bool:
        return any(s.block != 1 for s in self.segments)


@dataclass
class Consumer:
    """A rewrite action: slice `node` (how: `kind`) by the kept indices of tensor `tensor`.

    `index` is the node input concerned (the constant for CONST, the shape for
    RESHAPE/SHAPE, the sizes for RESIZE, the pads for PAD, -1 when they are an attribute) and `axis` the
    axis of that constant to slice (for PAD: where the channel axis is among the padded axes).
    """

    node: gs.Node
    kind: str
    tensor: str
    index: int = 0
    axis: int = 0


@dataclass
class ChannelGroup:
    """Channels that must keep one subset.

    id: stable name (its first producer node); size: channel count;
    producers: Conv/Gemm/MatMul nodes whose output channels are the group;
    members: (tensor name, axis) of every tensor carrying (some of) its channels;
    consumers: the rewrite actions touching it (producers included, kinds in PRODUCER_KINDS);
    pinned: None, or why the group must stay unchanged; pinned_by: (node, op, reason) of each pin.
    """

    id: str
    size: int
    producers: list[gs.Node] = field(default_factory=list)
    members: list[tuple[str, int]] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    pinned: str | None = None
    pinned_by: list[tuple[str, str, str]] = field(default_factory=list)
    root: int = -1  # internal: union-find root atom

    @property
    def prunable(self) -> bool:
        return self.pinned is None


@dataclass
class ChannelAnalysis:
    """The result of `analyze`: groups, tensor layouts and rewrite actions."""

    groups: list[ChannelGroup]
    layouts: dict[str, Layout]
    actions: list[Consumer]
    tensors: dict[str, gs.Tensor]
    _find: Callable[[int], int]
    _by_root: dict[int, ChannelGroup]

    def group(self, group_id: str) -> ChannelGroup:
        """The group with this id (KeyError if none)."""
        by_id = self.__dict__.setdefault("_by_id", {g.id: g for g in self.groups})
        return by_id[group_id]

    def group_of_atom(self, atom: int) -> ChannelGroup:
        return self._by_root[self._find(atom)]

    def group_of_node(self, name: str) -> ChannelGroup | None:
        """The group whose producers include node `name`, else None."""
        for g in self.groups:
            if any(p.name == name for p in g.producers):
                return g
        return None

    def groups_of_node(self, name: str) -> list[ChannelGroup]:
        """Every group whose producers include node `name` (several when its output channels were split)."""
        return [g for g in self.groups if any(p.name == name for p in g.producers)]

    def group_of_tensor(self, name: str) -> list[ChannelGroup]:
        layout = self.layouts.get(name)
        if layout is None:
            return []
        seen: dict[str, ChannelGroup] = {}
        for s in layout.segments:
            if s.atom is not None:
                g = self.group_of_atom(s.atom)
                seen.setdefault(g.id, g)
        return list(seen.values())

    def unalignable_groups(self) -> dict[str, str]:
        """Groups whose kept count cannot make every tensor they are in a multiple of the count's rounding,
        by id, each with one such tensor: rounding them aligns nothing and only keeps channels.

        A tensor is aligned when each of its segments is a group that is itself rounded. Channels that never
        change (a channel Pad's or Concat's constants, a graph input concatenated in) and groups none of whose
        layers outputs the group alone (a slice of padded shortcuts) never are; a group that shares a tensor with them
        is then not rounded either, and so on until nothing changes. ResNet residual groups and Inception
        branches (each branch owns its conv's output; the Concat is made of rounded branches) stay rounded.
        """
        def owners(layout: Layout) -> set[int | None]:
            return {None if seg.atom is None else self._find(seg.atom) for seg in layout.segments}

        rounded = set()
        for group in self.groups:
            outputs = [t.name for p in group.producers for t in p.outputs[:1]]
            if any(name in self.layouts and owners(self.layouts[name]) == {group.root} for name in outputs):
                rounded.add(group.root)
        blocking: dict[int, str] = {}
        changed = True
        while changed:
            changed = False
            for group in self.groups:
                if group.root not in rounded:
                    continue
                for name, _ in group.members:
                    layout = self.layouts.get(name)
                    if layout is not None and not owners(layout) <= rounded:
                        rounded.discard(group.root)
                        blocking[group.root] = name
                        changed = True
                        break
        return {g.id: blocking.get(g.root, g.members[0][0] if g.members else g.id)
                for g in self.groups if g.root not in rounded}

    def positions(self, tensor: str, group_id: str, channels: Iterable[int] | None = None) -> np.ndarray:
        """Indices along `tensor`'s channel axis holding the given channels of group `group_id`, flattened."""
        return self.position_matrix(tensor, group_id, channels).ravel()

    def position_matrix(self, tensor: str, group_id: str, channels: Iterable[int] | None = None) -> np.ndarray:
        """(channels, k) indices along `tensor`'s channel axis: row i holds every element of the i-th channel.

        k is the block size (H*W after a Flatten) times the number of times the
        group appears in the tensor (a Concat may hold it twice).
        """
        layout = self.layouts[tensor]
        group = self.group(group_id)
        chans = np.arange(group.size) if channels is None else np.asarray(list(channels), dtype=np.int64)
        parts, offset = [], 0
        for s in layout.segments:
            if s.atom is not None and self._find(s.atom) == group.root:
                parts.append(offset + chans[:, None] * s.block + np.arange(s.block))
            offset += s.size * s.block
        return np.concatenate(parts, axis=1) if parts else np.zeros((len(chans), 0), dtype=np.int64)

    def kept_indices(self, tensor: str, kept: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """Kept indices along `tensor`'s channel axis given kept channels by group id; None if unchanged."""
        layout = self.layouts.get(tensor)
        if layout is None:
            return None
        parts, offset, changed = [], 0, False
        for s in layout.segments:
            idx = None
            if s.atom is not None:
                idx = kept.get(self.group_of_atom(s.atom).id)
            if idx is None or len(idx) == s.size:
                idx = np.arange(s.size)
            else:
                changed = True
            idx = np.asarray(idx, dtype=np.int64)
            if s.block == 1:
                parts.append(offset + idx)
            else:
                parts.append((offset + idx[:, None] * s.block + np.arange(s.block)).ravel())
            offset += s.size * s.block
        return np.concatenate(parts) if changed else None


# ---------------------------------------------------------------- helpers


def _axes_of(node: gs.Node, rank: int, cache: dict) -> list[int] | None:
    """The `axes` of a Reduce*/Squeeze/Unsqueeze/Slice/Pad node (attribute or input), normalized; None if unknown."""
    axes = attr(node, "axes")
    if axes is None:
        index = {"Slice": 3, "Pad": 3}.get(node.op, 1)
        t = input_at(node, index)
        if t is None:
            return []
        value = constant_value(t, cache)
        if value is None:
            return None
        axes = [int(a) for a in np.asarray(value).reshape(-1)]
    return [int(a) % rank for a in axes]


def pads_of(node: gs.Node, rank: int, cache: dict | None = None) -> tuple[list[int], list[int]] | None:
    """A Pad node's (pads, axes): pads as [begins..., ends...] over `axes` (normalized, all axes when the
    node has no `axes`); None when the pads or axes are computed."""
    pads = attr(node, "pads")
    if pads is None:
        pads = constant_value(input_at(node, 1), cache)
    if pads is None:
        return None
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    axes = _axes_of(node, rank, {} if cache is None else cache)
    if axes is None:
        return None
    axes = axes or list(range(rank))
    return (pads, axes) if len(pads) == 2 * len(axes) else None


def pad_value(node: gs.Node, cache: dict | None = None) -> float | None:
    """The constant a constant-mode Pad fills with (0 by default); None when computed or not constant mode."""
    if attr(node, "mode", "constant") != "constant":
        return None
    t = input_at(node, 2)
    value = constant_value(t, cache) if t is not None else np.asarray(attr(node, "value", 0.0))
    if value is None or value.size != 1:
        return None
    return float(value.reshape(-1)[0])


# ---------------------------------------------------------------- analysis


def _split_segments(segments: Iterable[Segment], mapping: Mapping[int, int], k: int) -> tuple[Segment, ...]:
    """`segments` with each segment of an atom in `mapping` cut after k channels (the rest to its new atom)."""
    out: list[Segment] = []
    for s in segments:
        if s.atom in mapping:
            out += [Segment(s.atom, k, s.block), Segment(mapping[s.atom], s.size - k, s.block)]
        else:
            out.append(s)
    return tuple(out)


def _alignable(a: Layout, b: Layout) -> bool:
    """Whether `a` and `b` can be cut at the same places: same total, and every piece between the union of
    their segment boundaries lies in segments of the same block size, a whole number of blocks long."""
    if a.total != b.total:
        return False

    def pieces(layout: Layout) -> list[tuple[int, int]]:
        out, offset = [], 0
        for s in layout.segments:
            offset += s.size * s.block
            out.append((offset, s.block))
        return out

    pa, pb = pieces(a), pieces(b)
    cuts = sorted({end for end, _ in pa} | {end for end, _ in pb})
    start = 0
    for end in cuts:
        block_a = next(blk for stop, blk in pa if stop >= end)
        block_b = next(blk for stop, blk in pb if stop >= end)
        if block_a != block_b or (end - start) % block_a:
            return False
        start = end
    return True


class _Builder:
    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.parent: list[int] = []
        self.size: list[int] = []
        self.owner: list[gs.Node] = []
        self.constant: list[bool] = []  # constant channels (concatenated or padded in), produced by no layer
        self.pins: list[list[tuple[str, str, str]]] = []
        self.layouts: dict[str, Layout] = {}
        self.actions: list[Consumer] = []
        self.cache: dict = {}

    # union-find
    def new_atom(self, owner: gs.Node, size: int, constant: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        self.owner.append(owner)
        self.constant.append(constant)
        self.pins.append([])
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = min(ra, rb), max(ra, rb)  # the earlier atom stays root: ids follow topological order
            self.parent[hi] = lo
            self.pins[lo].extend(self.pins[hi])

    def pin_atom(self, atom: int, node: gs.Node, reason: str) -> None:
        self.pins[self.find(atom)].append((node.name, node.op, reason))

    def pin(self, layout: Layout | None, node: gs.Node, reason: str) -> None:
        if layout is None:
            return
        for s in layout.segments:
            if s.atom is not None:
                self.pin_atom(s.atom, node, reason)

    def split(self, atom: int, k: int) -> dict[int, int]:
        """Split the atoms of `atom`'s group after their first `k` channels, everywhere: each member atom keeps
        its first k channels and a new atom (same owner) takes the rest; the new atoms form one group (with
        the same pins). Every stored layout is rewritten; returns {old atom: new atom}."""
        root = self.find(atom)
        members = [a for a in range(len(self.parent)) if self.find(a) == root]  # ascending: the root first
        mapping = {}
        for m in members:
            mapping[m] = self.new_atom(self.owner[m], self.size[m] - k, self.constant[m])
            self.size[m] = k
        first = mapping[root]
        self.pins[first] = list(self.pins[root])
        for m in members[1:]:
            self.union(first, mapping[m])
        for name, lay in self.layouts.items():
            if any(s.atom in mapping for s in lay.segments):
                self.layouts[name] = Layout(lay.axis, _split_segments(lay.segments, mapping, k))
        return mapping

    def align(self, a: Layout, b: Layout) -> tuple[tuple[Segment, ...], tuple[Segment, ...]] | None:
        """The segments of `a` and `b` cut at the same places (atoms split where needed, see `split`);
        None when they cannot be (different totals, or a cut inside a flattened block)."""
        if not _alignable(a, b):
            return None
        sa, sb = list(a.segments), list(b.segments)
        i = 0
        while i < len(sa) and i < len(sb):
            x, y = sa[i], sb[i]
            if x.block != y.block:
                return None
            if x.size != y.size:
                big = x if x.size > y.size else y
                k = min(x.size, y.size)
                if big.atom is None:  # channels that never change: cut locally
                    pieces = (Segment(None, k, big.block), Segment(None, big.size - k, big.block))
                    target = sa if big is x else sb
                    target[i:i + 1] = pieces
                else:
                    mapping = self.split(big.atom, k)
                    sa = list(_split_segments(sa, mapping, k))
                    sb = list(_split_segments(sb, mapping, k))
                    i = 0  # the split group may also lie in the part already matched
                continue
            i += 1
        return (tuple(sa), tuple(sb)) if len(sa) == len(sb) else None

    def unify(self, a: Layout, b: Layout, node: gs.Node) -> bool:
        """Require the same channel subset in `a` and `b` (splitting atoms so their segments match); pin both
        when their layouts cannot be matched. Layouts held by the caller may be stale afterwards."""
        aligned = self.align(a, b)
        if aligned is not None:
            for x, y in zip(*aligned):
                if x.atom is not None and y.atom is not None:
                    self.union(x.atom, y.atom)
                elif x.atom is not None or y.atom is not None:
                    atom = x.atom if x.atom is not None else y.atom
                    self.pin_atom(atom, node, "combined with channels that cannot change")
            return True
        reason = ("combined with a tensor of another channel count" if a.total != b.total else
                  "combined with a tensor whose flattened channel blocks do not line up")
        self.pin(a, node, reason)
        self.pin(b, node, reason)
        return False

    def constant_channels(self, node: gs.Node, index: int, axis: int, size: int) -> int | None:
        """An atom for the `size` channels that constant input `index` of `node` (a Concat) puts on the
        channel axis, with the action that shrinks it; None when the input is not a constant used only
        there (an initializer, a Constant, or a ConstantOfShape of a constant shape)."""
        t = node.inputs[index]
        if len(t.outputs) != 1 or sum(x is t for x in node.inputs) != 1 or \
                any(t is o for o in self.graph.outputs):
            return None
        rank = rank_of(node.outputs[0])
        value = constant_value(t, self.cache)
        if value is not None:
            if value.ndim != rank or value.shape[axis] != size:
                return None
            atom = self.new_atom(node, size, constant=True)
            self.act(node, CONST, t.name, index=index, axis=axis)
        else:
            fill = t.inputs[0] if len(t.inputs) == 1 else None
            if fill is None or fill.op != "ConstantOfShape" or not is_standard(fill):
                return None
            shape = constant_value(input_at(fill, 0), self.cache)
            if shape is None or shape.ndim != 1 or len(shape) != rank or int(shape[axis]) != size:
                return None
            atom = self.new_atom(fill, size, constant=True)
            self.act(fill, SHAPE, t.name, index=0, axis=axis)
        self.layouts[t.name] = Layout(axis, (Segment(atom, size),))
        return atom

    def act(self, node: gs.Node, kind: str, tensor: str, index: int = 0, axis: int = 0) -> None:
        self.actions.append(Consumer(node, kind, tensor, index, axis))

    def layout(self, tensor: gs.Tensor | None) -> Layout | None:
        return None if tensor is None else self.layouts.get(tensor.name)

    def set_layout(self, tensor: gs.Tensor, layout: Layout) -> None:
        self.layouts[tensor.name] = layout

    def pin_inputs(self, node: gs.Node, reason: str) -> None:
        for t in node.inputs:
            if not is_empty(t):
                self.pin(self.layouts.get(t.name), node, reason)

    # ------------------------------------------------------------ handlers

    def visit(self, node: gs.Node) -> None:
        tracked = [t for t in node.inputs if not is_empty(t) and t.name in self.layouts]
        if not is_standard(node):
            self.pin_inputs(node, f"custom op {node.domain}.{node.op} is not understood by the channel analysis")
            return
        op = node.op
        if kind_of(node) is not None:
            return self.weighted(node)
        if not tracked:
            return
        if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
            return self.pin_inputs(node, f"{op} with a subgraph is not understood by the channel analysis")
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            if op in UNARY_OPS:
                handler = self.unary
            elif op in BINARY_OPS:
                handler = self.binary
            elif op in POOL_OPS:
                handler = self.pool
            elif op in REDUCE_OPS:
                handler = self.reduce
        if handler is None:
            return self.pin_inputs(node, f"{op} is not understood by the channel analysis")
        handler(node)

    def _extra_outputs_used(self, node: gs.Node) -> bool:
        return any(o.outputs or any(o is g for g in self.graph.outputs) for o in node.outputs[1:])

    def weighted(self, node: gs.Node) -> None:
        """A layer of the layer table: its output channels are a new atom; a group-1 layer's input channels
        are sliced with its input; a depthwise conv passes its input's channels through."""
        x = input_at(node, 0)
        lx = self.layout(x)
        layer = layer_of(node)
        problem = _unusable(node, layer, self.cache)
        if problem:
            self.pin(lx, node, problem)
            self.pin(self.layout(input_at(node, 1)), node, problem)
            return
        y = node.outputs[0]
        ry = rank_of(y) or rank_of(x)
        if layer.output_axis == 1:
            in_axis, out_axis = 1, 1
        elif ry is None:
            return self.pin(lx, node, f"{node.op} of unknown rank")
        else:
            in_axis, out_axis = rank_of(x) - 1, ry - 1
        if lx is not None and lx.axis != in_axis:
            self.pin(lx, node, f"{node.op} input tracked on a non-channel axis")
            lx = None
        cout = layer.out_channels
        if layer.groups == 1:
            if lx is not None:
                self.act(node, LAYER_IN, x.name)
            atom = self.new_atom(node, cout)
            self.act(node, LAYER_OUT, y.name)
            self.set_layout(y, Layout(out_axis, (Segment(atom, cout),)))
            if node.op == "Gemm" and input_at(node, 2) is not None:
                c = constant_value(input_at(node, 2), self.cache)
                if not (c.size == 1 or (c.size == cout and c.shape[-1] == cout)):
                    self.pin_atom(atom, node, "Gemm bias C is not a constant of N values")
        elif layer.depthwise and node.op == "Conv":
            if lx is None:
                return  # depthwise over channels that cannot change: its output cannot change either
            if lx.blocked() or lx.total != cout:
                self.pin(lx, node, "depthwise Conv over an unexpected channel layout")
                return
            self.act(node, DEPTHWISE, x.name)
            self.set_layout(y, lx)
        else:
            per_group = layer.in_channels // layer.groups
            reason = (f"grouped {node.op} (group={layer.groups}) is left unchanged: whole-group pruning is not "
                      "implemented" if per_group > 1 else
                      f"depthwise {node.op} with channel multiplier {cout // layer.groups} is left unchanged")
            self.pin(lx, node, reason)
            atom = self.new_atom(node, cout)
            self.pin_atom(atom, node, reason)
            self.set_layout(y, Layout(out_axis, (Segment(atom, cout),)))

    def _norm(self, node: gs.Node, params: range) -> None:
        lx = self.layout(node.inputs[0])
        if lx.axis != 1 or lx.blocked():
            return self.pin(lx, node, f"{node.op} over a non-channel axis")
        if self._extra_outputs_used(node):
            return self.pin(lx, node, f"{node.op} in training mode")
        for i in params:
            value = constant_value(input_at(node, i), self.cache)
            if value is None or value.size != lx.total:
                return self.pin(lx, node, f"{node.op} with non-constant or non-per-channel parameters")
        self.act(node, NORM, node.inputs[0].name)
        self.set_layout(node.outputs[0], lx)

    def op_BatchNormalization(self, node: gs.Node) -> None:
        self._norm(node, range(1, 5))

    def op_InstanceNormalization(self, node: gs.Node) -> None:
        self._norm(node, range(1, 3))

    def unary(self, node: gs.Node) -> None:
        lx = self.layout(node.inputs[0])
        if lx is None or any(t.name in self.layouts for t in node.inputs[1:] if not is_empty(t)):
            return self.pin_inputs(node, f"{node.op} with a tracked tensor as a parameter")
        if node.op == "Clip":
            for i in (1, 2):
                t = input_at(node, i)
                if t is not None:
                    v = constant_value(t, self.cache)
                    if v is None or v.size != 1:
                        return self.pin(lx, node, "Clip with non-constant bounds")
        if node.op == "Dropout" and self._extra_outputs_used(node):
            return self.pin(lx, node, "Dropout whose mask is used")
        self.set_layout(node.outputs[0], lx)

    def binary(self, node: gs.Node) -> None:
        y = node.outputs[0]
        ranks = [rank_of(t) for t in node.inputs]
        ry = rank_of(y) or (max(ranks) if None not in ranks else None)
        tracked = [(i, t, self.layouts[t.name]) for i, t in enumerate(node.inputs) if t.name in self.layouts]
        if ry is None or None in ranks:
            return self.pin_inputs(node, f"{node.op} with an unknown rank")
        axes = {lay.axis + ry - ranks[i] for i, _, lay in tracked}
        if len(axes) != 1:
            return self.pin_inputs(node, f"{node.op} combines tensors tracked on different axes")
        axis = axes.pop()
        ok = True
        for _, t, _ in tracked[1:]:
            ok = self.unify(self.layouts[tracked[0][1].name], self.layouts[t.name], node) and ok
        if not ok:
            return
        first = self.layouts[tracked[0][1].name]  # unify may have split its atoms
        for i, t in enumerate(node.inputs):
            if t.name in self.layouts:
                continue
            ca = axis - (ry - ranks[i])
            dims = static_dims(t)
            size = dims[ca] if ca >= 0 and dims is not None else (1 if ca < 0 else None)
            if size == 1:
                continue  # broadcast along the channel axis
            value = constant_value(t, self.cache)
            if value is not None and value.shape[ca] == first.total:
                self.act(node, CONST, tracked[0][1].name, index=i, axis=ca)
                continue
            what = ("a constant of another channel count" if value is not None
                    else "a tensor whose channels cannot change (not produced by a prunable layer)")
            return self.pin_inputs(node, f"{node.op} with {what}")
        self.set_layout(y, Layout(axis, first.segments))

    def pool(self, node: gs.Node) -> None:
        lx = self.layout(node.inputs[0])
        if lx.axis != 1 or lx.blocked():
            return self.pin(lx, node, f"{node.op} over the channel axis")
        if self._extra_outputs_used(node):
            return self.pin(lx, node, f"{node.op} whose indices output is used")
        self.set_layout(node.outputs[0], lx)

    def reduce(self, node: gs.Node) -> None:
        x = node.inputs[0]
        lx = self.layout(x)
        r = rank_of(x)
        axes = _axes_of(node, r, self.cache) if r is not None else None
        if axes is None or not axes and not attr(node, "noop_with_empty_axes", 0):
            return self.pin(lx, node, f"{node.op} over unknown or all axes")
        if lx.axis in axes:
            return self.pin(lx, node, f"{node.op} over the channel axis")
        axis = lx.axis if attr(node, "keepdims", 1) else lx.axis - sum(1 for a in axes if a < lx.axis)
        self.set_layout(node.outputs[0], Layout(axis, lx.segments))

    def op_Softmax(self, node: gs.Node) -> None:
        lx = self.layout(node.inputs[0])
        r = rank_of(node.inputs[0])
        if r is None or int(attr(node, "axis", -1)) % r == lx.axis:
            return self.pin(lx, node, "Softmax over the channel axis")
        self.set_layout(node.outputs[0], lx)

    op_LogSoftmax = op_Softmax

    def op_Transpose(self, node: gs.Node) -> None:
        lx = self.layout(node.inputs[0])
        r = rank_of(node.inputs[0])
        perm = attr(node, "perm") or (list(range(r))[::-1] if r is not None else None)
        if perm is None:
            return self.pin(lx, node, "Transpose of unknown rank")
        self.set_layout(node.outputs[0], Layout(list(perm).index(lx.axis), lx.segments))

    def op_Unsqueeze(self, node: gs.Node) -> None:
        lx = self.layout(node.inputs[0])
        ry = rank_of(node.outputs[0])
        axes = _axes_of(node, ry, self.cache) if ry is not None else None
        if axes is None:
            return self.pin(lx, node, "Unsqueeze with unknown axes")
        axis = lx.axis
        for a in sorted(axes):
            if a <= axis:
                axis += 1
        self.set_layout(node.outputs[0], Layout(axis, lx.segments))

    def op_Squeeze(self, node: gs.Node) -> None:
        x = node.inputs[0]
        lx = self.layout(x)
        dims = static_dims(x)
        axes = _axes_of(node, len(dims), self.cache) if dims is not None else None
        if axes == [] and dims is not None and all(isinstance(d, int) for d in dims):
            axes = [i for i, d in enumerate(dims) if d == 1]
        if not axes or lx.axis in axes:
            return self.pin(lx, node, "Squeeze of unknown axes or of the channel axis")
        self.set_layout(node.outputs[0], Layout(lx.axis - sum(1 for a in axes if a < lx.axis), lx.segments))

    def op_Flatten(self, node: gs.Node) -> None:
        x = node.inputs[0]
        lx = self.layout(x)
        dims = static_dims(x)
        if dims is None:
            return self.pin(lx, node, "Flatten of unknown shape")
        axis = int(attr(node, "axis", 1)) % max(len(dims), 1)
        if axis != lx.axis:
            return self.pin(lx, node, "Flatten that does not start at the channel axis")
        self._flatten_to(node, lx, dims)

    def _flatten_to(self, node: gs.Node, lx: Layout, dims: list) -> None:
        rest = dims[lx.axis + 1:]
        if lx.blocked() or not all(isinstance(d, int) for d in rest):
            return self.pin(lx, node, f"{node.op} over a non-static or already flattened shape")
        block = int(np.prod(rest, dtype=np.int64))
        segs = tuple(Segment(s.atom, s.size, block) for s in lx.segments)
        self.set_layout(node.outputs[0], Layout(lx.axis, segs))

    def op_Reshape(self, node: gs.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        lx = self.layout(x)
        shape = constant_value(input_at(node, 1), self.cache)
        din, dout = static_dims(x), static_dims(y)
        if shape is None:
            return self.pin(lx, node, "Reshape with a computed shape")
        if din is None or dout is None:
            return self.pin(lx, node, "Reshape of unknown shapes")
        a = lx.axis
        shape = np.asarray(shape).reshape(-1)
        if len(shape) != len(dout) or len(shape) <= a:
            return self.pin(lx, node, "Reshape with an unexpected target shape")
        for i in range(a):  # dims before the channel axis must be kept (copied with 0, or the one -1)
            if not (shape[i] in (0, -1) or (din[i] is not None and din[i] == dout[i])):
                return self.pin(lx, node, "Reshape that changes the dims before the channel axis")
        after_in, after_out = din[a + 1:], dout[a + 1:]
        if not all(isinstance(d, int) for d in after_in + after_out) or not isinstance(dout[a], int):
            return self.pin(lx, node, "Reshape with non-static dims after the channel axis")
        if len(dout) == a + 1 and dout[a] == lx.total * int(np.prod(after_in, dtype=np.int64)):
            kind = "flatten"
        elif dout[a] == lx.total and np.prod(after_in, dtype=np.int64) == np.prod(after_out, dtype=np.int64) \
                and all(d == 1 for d in after_in + after_out):
            kind = "unit"
        else:
            return self.pin(lx, node, "Reshape that splits or merges the channel axis")
        if shape[a] > 0 and shape[a] != dout[a] or shape[a] == 0 and kind == "flatten":
            return self.pin(lx, node, "Reshape with an unexpected target shape")
        if shape[a] > 0:
            self.act(node, RESHAPE, y.name, index=1, axis=a)
        if kind == "flatten":
            self._flatten_to(node, lx, din)
        else:
            self.set_layout(y, lx)

    def op_Pad(self, node: gs.Node) -> None:
        x = node.inputs[0]
        lx = self.layout(x)
        r = rank_of(x)
        found = pads_of(node, r, self.cache) if r is not None else None
        if found is None:
            return self.pin(lx, node, "Pad with computed pads or axes")
        pads, axes = found
        n = len(axes)
        touched = {axes[i] for i in range(n) if pads[i] != 0 or pads[i + n] != 0}
        if lx.axis not in touched:
            return self.set_layout(node.outputs[0], lx)
        # padding the channel axis with a constant: new constant channels before and after the input's
        k = axes.index(lx.axis)
        before, after = pads[k], pads[k + n]
        if pad_value(node, self.cache) is None:
            return self.pin(lx, node, "Pad of the channel axis that is not with a constant")
        if before < 0 or after < 0:
            return self.pin(lx, node, "Pad that crops the channel axis")
        if lx.blocked():
            return self.pin(lx, node, "Pad of flattened channels")
        segs = list(lx.segments)
        if before:
            segs.insert(0, Segment(self.new_atom(node, before, constant=True), before))
        if after:
            segs.append(Segment(self.new_atom(node, after, constant=True), after))
        self.act(node, PAD, node.outputs[0].name, index=-1 if attr(node, "pads") is not None else 1, axis=k)
        self.set_layout(node.outputs[0], Layout(lx.axis, tuple(segs)))

    def op_Slice(self, node: gs.Node) -> None:
        x = node.inputs[0]
        lx = self.layout(x)
        r = rank_of(x)
        axes = _axes_of(node, r, self.cache) if r is not None else None
        if axes == [] and r is not None:
            starts = constant_value(input_at(node, 1), self.cache)
            axes = list(range(len(starts))) if starts is not None else None
        if axes is None or lx.axis in axes:
            return self.pin(lx, node, "Slice of the channel axis")
        self.set_layout(node.outputs[0], lx)

    def op_Resize(self, node: gs.Node) -> None:
        x = node.inputs[0]
        lx = self.layout(x)
        if node.op == "Upsample" or len(node.inputs) == 2:
            scales_t, sizes_t = input_at(node, 1), None
        else:
            scales_t, sizes_t = input_at(node, 2), input_at(node, 3)
        scales = constant_value(scales_t, self.cache)
        sizes = constant_value(sizes_t, self.cache)
        if sizes is not None and sizes.size:
            if len(sizes) <= lx.axis or sizes[lx.axis] != lx.total:
                return self.pin(lx, node, "Resize that changes the channel axis")
            self.act(node, RESIZE, x.name, index=3, axis=lx.axis)
        elif scales is not None and scales.size:
            if len(scales) <= lx.axis or scales[lx.axis] != 1:
                return self.pin(lx, node, "Resize that scales the channel axis")
        else:
            return self.pin(lx, node, "Resize with computed scales/sizes")
        if attr(node, "axes") is not None:
            return self.pin(lx, node, "Resize with axes")
        self.set_layout(node.outputs[0], lx)

    op_Upsample = op_Resize

    def op_Concat(self, node: gs.Node) -> None:
        y = node.outputs[0]
        r = rank_of(y)
        if r is None:
            return self.pin_inputs(node, "Concat of unknown rank")
        axis = int(attr(node, "axis")) % r
        tracked_axes = {self.layouts[t.name].axis for t in node.inputs if t.name in self.layouts}
        if tracked_axes == {axis}:
            segs: list[Segment] = []
            for i, t in enumerate(node.inputs):
                lay = self.layouts.get(t.name)
                if lay is not None:
                    if lay.blocked():
                        return self.pin_inputs(node, "Concat of flattened channels")
                    segs.extend(lay.segments)
                    continue
                dims = static_dims(t)
                if dims is None or not isinstance(dims[axis], int):
                    return self.pin_inputs(node, "Concat with an input of unknown channel count")
                if dims[axis]:
                    segs.append(Segment(self.constant_channels(node, i, axis, dims[axis]), dims[axis]))
            self.set_layout(y, Layout(axis, tuple(segs)))
        elif len(tracked_axes) == 1 and all(t.name in self.layouts for t in node.inputs):
            names = [t.name for t in node.inputs]
            ok = all([self.unify(self.layouts[names[0]], self.layouts[n], node) for n in names[1:]])
            if ok:
                self.set_layout(y, self.layouts[names[0]])
        else:
            self.pin_inputs(node, "Concat mixing tracked and untracked channels on another axis")

    def op_Shape(self, node: gs.Node) -> None:
        self.pin_inputs(node, "Shape reads the channel count")

    def op_Size(self, node: gs.Node) -> None:
        self.pin_inputs(node, "Size reads the channel count")


def _unusable(node: gs.Node, layer: Layer | None, cache: dict) -> str:
    """Why the channel analysis cannot slice this weighted layer ('' when it can)."""
    if layer is None:
        return f"{node.op} with a non-constant weight"
    shape = layer.weight_shape
    if node.op in ("Conv", "ConvTranspose") and len(shape) < 3:
        return f"{node.op} with a weight of rank {len(shape)}"
    if node.op in ("Gemm", "MatMul") and len(shape) != 2:
        return f"{node.op} with a batched weight"
    if node.op == "Gemm" and attr(node, "transA", 0):
        return "Gemm with transA"
    if node.op == "ConvTranspose" and "output_shape" in node.attrs:
        return "ConvTranspose with an output_shape attribute"
    if node.op == "MatMul" and rank_of(node.inputs[0]) is None:
        return "MatMul input of unknown rank"
    bias_index = layer.kind.bias_index
    bias = input_at(node, bias_index) if bias_index is not None else None
    if bias is not None and constant_value(bias, cache) is None:
        return f"{node.op} with a non-constant bias"
    return ""


def analyze(graph: gs.Graph) -> ChannelAnalysis:
    """Channel groups of `graph`, which must carry inferred shapes (graphs from the pipeline do).

    The graph is toposorted in place; nothing else changes. Tensors of unknown
    rank or shape where the analysis needs them pin the groups involved.
    """
    graph.toposort()
    b = _Builder(graph)
    for node in graph.nodes:
        try:
            b.visit(node)
        except (ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
            # a malformed or unusual node: leave everything it touches alone rather than guess
            b.pin_inputs(node, f"{node.op} could not be analyzed ({type(exc).__name__}: {exc})")
    out_names = set()
    for t in graph.outputs:
        out_names.add(t.name)
        lay = b.layouts.get(t.name)
        if lay is not None:
            for s in lay.segments:
                if s.atom is not None:
                    b.pins[b.find(s.atom)].append((t.name, "graph output",
                                                   "reaches a graph output, whose shape must not change"))
    # a group is named after its first producer (its first atom when made only of constant channels)
    naming: dict[int, int] = {}
    for atom in range(len(b.parent)):
        root = b.find(atom)
        if root not in naming or b.constant[naming[root]] and not b.constant[atom]:
            naming[root] = atom
    groups: dict[int, ChannelGroup] = {}
    used_ids: set[str] = set()
    for root, atom in sorted(naming.items(), key=lambda item: item[1]):
        owner = b.owner[atom]
        gid = owner.name or owner.outputs[0].name
        if gid in used_ids:
            i = 1
            while f"{gid}#{i}" in used_ids:
                i += 1
            gid = f"{gid}#{i}"
        used_ids.add(gid)
        groups[root] = ChannelGroup(gid, b.size[root], root=root)
    for atom in range(len(b.parent)):
        g = groups[b.find(atom)]
        if not b.constant[atom] and b.owner[atom] not in g.producers:
            g.producers.append(b.owner[atom])
    for root, g in groups.items():
        if not g.producers:
            owner = b.owner[root]
            b.pins[root].append((owner.name, owner.op, "holds only constant channels (concatenated or padded "
                                 "in): no layer produces them"))
    tensors = graph.tensors()
    for name, lay in b.layouts.items():
        seen = set()
        for s in lay.segments:
            if s.atom is not None:
                root = b.find(s.atom)
                if root not in seen:
                    seen.add(root)
                    groups[root].members.append((name, lay.axis))
    for action in b.actions:
        lay = b.layouts.get(action.tensor)
        seen = set()
        for s in lay.segments if lay is not None else ():
            if s.atom is not None:
                root = b.find(s.atom)
                if root not in seen:
                    seen.add(root)
                    groups[root].consumers.append(action)
    for root, g in groups.items():
        pins = b.pins[root]
        if pins:
            g.pinned_by = list(dict.fromkeys(pins))
            reasons = [f"{op} '{name}': {why}" for name, op, why in g.pinned_by]
            g.pinned = "; ".join(reasons[:3]) + (f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else "")
    ordered = [groups[r] for r in sorted(groups)]
    return ChannelAnalysis(ordered, b.layouts, b.actions, tensors, b.find, groups)
