"""The code's structure: no import cycles between ocomp's modules, no private names used across modules,
and every weighted op kind of the layer table answers the table's questions consistently."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from ocomp.layers import KINDS, Layer, layer_of

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"ocomp": ROOT / "ocomp", "ocomp.passes": ROOT / "passes", "ocomp.runtime": ROOT / "runtime"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """ocomp modules `name` imports, at module level or inside functions (a lazy import is still a dependency)."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            target = target.strip(".")
            if target in known and target != name:
                found.add(target)
    return found


def test_no_import_cycles() -> None:
    mods = modules()
    graph = {name: imports(name, path, set(mods)) for name, path in mods.items()}
    # package __init__ files that import every pass (registration) are entry points, not layers
    graph["ocomp.passes"] = set()
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_no_private_names_across_modules() -> None:
    mods = modules()
    offenders = []
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or node.level):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        offenders.append(f"{name}: from {node.module} import {alias.name}")
    assert not offenders, offenders


# ---------------------------------------------------------------- the layer table


def _layer(op: str, shape: tuple, **attrs) -> Layer:
    x = gs.Variable("x", dtype=np.float32)
    w = gs.Constant("w", np.random.default_rng(0).normal(size=shape).astype(np.float32))
    b_size = {"Conv": shape[0], "ConvTranspose": shape[1] * attrs.get("group", 1),
              "Gemm": shape[0] if attrs.get("transB") else shape[1]}.get(op)
    inputs = [x, w] + ([gs.Constant("b", np.arange(b_size, dtype=np.float32))] if b_size else [])
    node = gs.Node(op, name=op.lower(), attrs=attrs, inputs=inputs, outputs=[gs.Variable("y", dtype=np.float32)])
    gs.Graph(nodes=[node], inputs=[x], outputs=node.outputs)
    return layer_of(node)


@pytest.mark.parametrize("op,shape,attrs,out,inp", [
    ("Conv", (8, 3, 3, 3), {}, 8, 3),
    ("Conv", (8, 2, 3, 3), {"group": 2}, 8, 4),
    ("ConvTranspose", (6, 4, 2, 2), {}, 4, 6),
    ("ConvTranspose", (6, 2, 3, 3), {"group": 3}, 6, 6),
    ("Gemm", (5, 7), {}, 7, 5),
    ("Gemm", (7, 5), {"transB": 1, "alpha": 0.5}, 7, 5),
    ("MatMul", (5, 7), {}, 7, 5),
])
def test_rows_round_trip_and_channel_counts(op, shape, attrs, out, inp) -> None:
    layer = _layer(op, shape, **attrs)
    assert (layer.out_channels, layer.in_channels) == (out, inp)
    rows = layer.rows()
    assert rows.shape == (out, int(np.prod(shape)) // out) == (out, layer.features)
    g = gs.Graph(nodes=[layer.node])
    layer.set_rows(g, rows * 2)
    np.testing.assert_allclose(layer.rows(), rows * 2, rtol=1e-6)
    # rows are per output channel: scaling one output scales exactly that row
    scale = np.arange(1, out + 1, dtype=np.float64)
    layer.scale_outputs(g, scale)
    np.testing.assert_allclose(layer.rows(), rows * 2 * scale[:, None], rtol=1e-6)


def test_conv_transpose_rows_against_its_definition() -> None:
    """Row o of a ConvTranspose holds, for each input channel of its group, the taps that reach output o."""
    layer = _layer("ConvTranspose", (6, 2, 3, 3), group=3)
    w = layer.weight()
    rows = layer.rows()
    for o in range(6):
        g, j = divmod(o, 2)
        np.testing.assert_array_equal(rows[o], w[2 * g:2 * g + 2, j].reshape(-1))


def test_every_kind_is_one_entry() -> None:
    ops = [k.op for k in KINDS]
    assert len(ops) == len(set(ops))
    assert {"Conv", "ConvTranspose", "Gemm", "MatMul", "TernaryConv", "TernaryGemm", "TernaryMatMul"} == set(ops)
