"""onnx-graphsurgeon helpers shared by the passes: domains, constants, producers and consumers,
attributes, writing constant inputs, and the bias Add of a MatMul. Each exists once, here.

Nothing in this module knows how a weighted op lays out its weight: that is ocomp/layers.py.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx_graphsurgeon as gs

STANDARD_DOMAINS = (None, "", "ai.onnx")  # graphsurgeon leaves the default domain as None
CUSTOM_DOMAIN = "ocomp"  # the domain of ocomp's own ops (runtime/)

# Ops whose output is folded by `constant_value` when all their inputs are constants.
FOLDABLE_CONST_OPS = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Cast", "Identity", "Flatten"})


def is_standard(node: gs.Node) -> bool:
    return node.domain in STANDARD_DOMAINS


def attr(node: gs.Node, name: str, default=None):
    """An attribute of `node` (bytes decoded to str), else `default`."""
    value = node.attrs.get(name, default)
    if isinstance(value, bytes):
        value = value.decode()
    return value


def has_padding(node: gs.Node) -> bool:
    """Whether a Conv/pool-like node pads its input (explicit pads or SAME auto_pad)."""
    if attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return True
    return any(int(p) != 0 for p in attr(node, "pads", []) or [])


def is_empty(tensor: gs.Tensor | None) -> bool:
    """An absent or empty optional input."""
    return tensor is None or (isinstance(tensor, gs.Variable) and tensor.name == "" and not tensor.inputs)


def input_at(node: gs.Node, index: int) -> gs.Tensor | None:
    """The node's input at `index`, None when absent or an empty optional input."""
    if index >= len(node.inputs) or is_empty(node.inputs[index]):
        return None
    return node.inputs[index]


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.outputs)


def rank_of(tensor: gs.Tensor) -> int | None:
    shape = tensor.shape
    return None if shape is None else len(shape)


def static_dims(tensor: gs.Tensor) -> list | None:
    """Shape with non-static dims as their symbol (str) or None; None when the shape is unknown."""
    shape = tensor.shape
    if shape is None:
        return None
    return [int(d) if isinstance(d, (int, np.integer)) and d >= 0 else (d if isinstance(d, str) else None)
            for d in shape]


def constant_value(tensor: gs.Tensor | None, cache: dict | None = None) -> np.ndarray | None:
    """The value of a constant tensor: an initializer, a Constant node's output, or a small constant
    sub-expression (Reshape/Unsqueeze/Squeeze/Cast/Identity/Flatten of constants, as PaddlePaddle's reshaped
    biases and PyTorch's Identity-deduplicated weights are). None when the tensor is not constant."""
    if tensor is None:
        return None
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if cache is not None and tensor.name in cache:
        return cache[tensor.name]
    value = None
    if len(tensor.inputs) == 1:
        node = tensor.inputs[0]
        if node.op == "Constant" and "value" in node.attrs:
            v = node.attrs["value"]
            value = np.asarray(v.values if isinstance(v, gs.Constant) else v)
        elif node.op in FOLDABLE_CONST_OPS and is_standard(node) and len(node.outputs) == 1:
            args = [constant_value(t, cache) if not is_empty(t) else None for t in node.inputs]
            if args and args[0] is not None and all(a is not None or is_empty(t)
                                                    for a, t in zip(args, node.inputs)):
                try:
                    value = _fold(node, args)
                except (ValueError, TypeError, IndexError):
                    value = None
    if cache is not None:
        cache[tensor.name] = value
    return value


def _fold(node: gs.Node, args: list) -> np.ndarray | None:
    x = args[0]
    if node.op == "Identity":
        return x
    if node.op == "Cast":
        import onnx

        return x.astype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
    if node.op == "Reshape":
        shape = [int(d) for d in args[1]]
        if not attr(node, "allowzero", 0):
            shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return x.reshape(shape)
    if node.op == "Flatten":
        axis = attr(node, "axis", 1) % max(x.ndim, 1)
        return x.reshape(int(np.prod(x.shape[:axis])), -1)
    axes = attr(node, "axes")
    if axes is None and len(args) > 1 and args[1] is not None:
        axes = [int(a) for a in args[1]]
    if node.op == "Unsqueeze":
        out_rank = x.ndim + len(axes)
        return np.expand_dims(x, tuple(sorted(a % out_rank for a in axes)))
    if node.op == "Squeeze":
        return np.squeeze(x, tuple(a % x.ndim for a in axes)) if axes else np.squeeze(x)
    return None


def unique_name(graph: gs.Graph, base: str) -> str:
    names = {t for t in graph.tensors().keys()} | {n.name for n in graph.nodes}
    if base not in names:
        return base
    i = 1
    while f"{base}_{i}" in names:
        i += 1
    return f"{base}_{i}"


def set_constant(graph: gs.Graph, node: gs.Node, index: int, value: np.ndarray, base: str) -> None:
    """Give `node` the constant `value` as input `index`: the constant is updated in place when only `node`
    uses it, otherwise a new constant named after `base` takes its place (others keep the old value).
    Missing optional inputs before `index` are filled with empty inputs."""
    value = np.ascontiguousarray(value)
    current = input_at(node, index)
    if isinstance(current, gs.Constant) and len(current.outputs) == 1:
        current.values = value
        return
    const = gs.Constant(unique_name(graph, base), value)
    while len(node.inputs) < index:
        node.inputs.append(gs.Variable.empty())
    if len(node.inputs) == index:
        node.inputs.append(const)
    else:
        node.inputs[index] = const


def sorted_nodes(graph: gs.Graph) -> list[gs.Node]:
    graph.toposort()
    return list(graph.nodes)


def bias_add(graph: gs.Graph, node: gs.Node, outputs: int) -> tuple[gs.Node, int] | None:
    """The Add right after `node` (a MatMul) that adds a constant per-output bias of `outputs` values over the
    last axis, as (Add node, index of the bias input); None when there is none. The MatMul's output must have
    the Add as its only use."""
    out = node.outputs[0]
    if len(out.outputs) != 1 or is_graph_output(graph, out):
        return None
    add = out.outputs[0]
    if add.op != "Add" or not is_standard(add) or len(add.inputs) != 2:
        return None
    rank = rank_of(node.inputs[0])
    for i, tensor in enumerate(add.inputs):
        if tensor is out:
            continue
        value = constant_value(tensor)
        if value is None or value.size != outputs or value.shape[-1] != outputs:
            continue
        if rank is not None and value.ndim > rank:
            continue  # it would broadcast the output to a higher rank
        return add, i
    return None


def node_count(nodes: Iterable[gs.Node], op: str) -> int:
    return sum(1 for n in nodes if n.op == op)


def boundary_layers(graph: gs.Graph, weighted: list[gs.Node]) -> tuple[set[int], set[int]]:
    """ids of the first weighted layers (no weighted layer upstream) and the last ones (none downstream)."""
    wanted = {id(n) for n in weighted}
    nodes = list(graph.nodes)  # the caller has toposorted the graph
    first, last = set(), set()
    downstream: set[str] = set()
    for node in nodes:
        after = any(isinstance(t, gs.Variable) and t.name in downstream for t in node.inputs)
        if id(node) in wanted and not after:
            first.add(id(node))
        if after or id(node) in wanted:
            downstream.update(o.name for o in node.outputs)
    upstream: set[str] = set()
    for node in reversed(nodes):
        before = any(o.name in upstream for o in node.outputs)
        if id(node) in wanted and not before:
            last.add(id(node))
        if before or id(node) in wanted:
            upstream.update(t.name for t in node.inputs if isinstance(t, gs.Variable))
    return first, last
