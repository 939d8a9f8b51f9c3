"""Small onnx-graphsurgeon helpers shared by the passes."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx_graphsurgeon as gs

STANDARD_DOMAINS = (None, "", "ai.onnx")  # graphsurgeon leaves the default domain as None


def const_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of a constant tensor (initializer or Constant-node output), else None."""
    if tensor is None:
        return None
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1:
        node = tensor.inputs[0]
        if node.op == "Constant" and "value" in node.attrs:
            value = node.attrs["value"]
            return np.asarray(value.values if isinstance(value, gs.Constant) else value)
    return None


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def input_at(node: gs.Node, index: int) -> gs.Tensor | None:
    """The node's input at `index`, None when absent or an empty optional input."""
    if index >= len(node.inputs):
        return None
    tensor = node.inputs[index]
    if isinstance(tensor, gs.Variable) and tensor.name == "" and not tensor.inputs:
        return None
    return tensor


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.outputs)


def weight_of(node: gs.Node) -> np.ndarray | None:
    """The constant weight of a Conv / Gemm / MatMul (input 1), else None."""
    if node.op in ("Conv", "Gemm", "MatMul") and node.domain in STANDARD_DOMAINS:
        return const_value(input_at(node, 1))
    return None


def weighted_nodes(graph: gs.Graph) -> list[gs.Node]:
    """Conv/Gemm/MatMul nodes with a constant weight, in topological order."""
    graph.toposort()
    return [n for n in graph.nodes if weight_of(n) is not None]


def unique_name(graph: gs.Graph, base: str) -> str:
    names = {t for t in graph.tensors().keys()} | {n.name for n in graph.nodes}
    if base not in names:
        return base
    i = 1
    while f"{base}_{i}" in names:
        i += 1
    return f"{base}_{i}"


def static_shape(tensor: gs.Tensor) -> list[int] | None:
    """Shape with symbolic dims reported as None; None when the shape is unknown."""
    shape = tensor.shape
    if shape is None:
        return None
    return [d if isinstance(d, (int, np.integer)) and d >= 0 else None for d in shape]


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
