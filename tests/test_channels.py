"""Channel-group analysis (passes/channels.py) on tiny inline graphs: what is grouped, what is pinned and why."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ocomp.model import infer_shapes, to_graph
from ocomp.passes.channels import DEPTHWISE, LAYER_IN, NORM, PAD, RESHAPE, SHAPE, analyze

RNG = np.random.default_rng(0)


class G:
    """A tiny graph builder: input "x" [N, C, H, W]; helpers return output names."""

    def __init__(self, c: int = 3, hw: int = 8):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, hw, hw])

    def init(self, name: str, value, dtype=np.float32) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv(self, x: str, name: str, cin: int, cout: int, k: int = 3, group: int = 1, pad: int | None = None,
             bias: bool = True) -> str:
        pad = k // 2 if pad is None else pad
        ins = [x, self.init(f"{name}.w", RNG.normal(size=(cout, cin // group, k, k)))]
        if bias:
            ins.append(self.init(f"{name}.b", RNG.normal(size=cout)))
        return self.node("Conv", ins, name, kernel_shape=[k, k], pads=[pad] * 4, group=group)

    def bn(self, x: str, name: str, c: int) -> str:
        ins = [x] + [self.init(f"{name}.{p}", v) for p, v in (("g", RNG.uniform(0.5, 1.5, c)),
                                                              ("b", RNG.normal(size=c)),
                                                              ("m", RNG.normal(size=c)),
                                                              ("v", RNG.uniform(0.5, 1.5, c)))]
        return self.node("BatchNormalization", ins, name)

    def model(self, out: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "t", [self.inp], [helper.make_tensor_value_info(out, TensorProto.FLOAT,
                                                                                             None)], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        return infer_shapes(model)


def groups_of(model: onnx.ModelProto):
    analysis = analyze(to_graph(model))
    return analysis, {g.id: g for g in analysis.groups}


def test_chain_groups_with_bn_and_relu():
    g = G()
    y = g.node("Relu", [g.bn(g.conv("x", "c1", 3, 8), "bn1", 8)], "r1")
    y = g.conv(y, "c2", 8, 4)
    _, groups = groups_of(g.model(y))
    assert sorted(groups) == ["c1", "c2"]
    c1 = groups["c1"]
    assert c1.size == 8 and c1.pinned is None
    assert [p.name for p in c1.producers] == ["c1"]
    assert {(c.node.name, c.kind) for c in c1.consumers if c.kind in (NORM, LAYER_IN)} == {("bn1", NORM), ("c2", LAYER_IN)}
    assert ("r1", 1) in c1.members
    assert groups["c2"].pinned and "graph output" in groups["c2"].pinned


def test_residual_add_unifies_producers():
    g = G()
    a = g.conv("x", "a", 3, 8)
    b = g.conv(g.node("Relu", [a], "ra"), "b", 8, 8)
    s = g.node("Add", [a, b], "add")
    out = g.conv(g.node("Relu", [s], "rs"), "head", 8, 2)
    _, groups = groups_of(g.model(out))
    assert set(groups) == {"a", "head"}  # b joined a's group
    assert {p.name for p in groups["a"].producers} == {"a", "b"}
    assert groups["a"].pinned is None


def test_add_with_graph_input_pins_group_and_names_node():
    g = G(c=8)
    a = g.conv("x", "a", 8, 8)
    s = g.node("Add", [a, "x"], "add_input")
    _, groups = groups_of(g.model(g.conv(s, "head", 8, 2)))
    assert groups["a"].pinned_by[0][:2] == ("add_input", "Add")
    assert "cannot change" in groups["a"].pinned


def test_concat_offsets_and_positions():
    g = G()
    a = g.conv("x", "a", 3, 4)
    b = g.conv("x", "b", 3, 6)
    cat = g.node("Concat", [a, b, "x"], "cat", axis=1)  # 4 + 6 + 3 (input, fixed)
    analysis, groups = groups_of(g.model(g.conv(cat, "head", 13, 2)))
    assert groups["a"].pinned is None and groups["b"].pinned is None
    assert analysis.positions("cat", "b", [0, 5]).tolist() == [4, 9]
    kept = analysis.kept_indices("cat", {"a": np.array([1, 3]), "b": np.array([0, 2, 5])})
    assert kept.tolist() == [1, 3, 4, 6, 9, 10, 11, 12]  # the graph input's 3 channels are always kept
    assert analysis.kept_indices("cat", {}) is None


def test_depthwise_joins_its_producer_and_grouped_conv_pins():
    g = G()
    a = g.conv("x", "a", 3, 8)
    d = g.conv(a, "dw", 8, 8, group=8)
    grp = g.conv(g.conv(d, "p", 8, 8, k=1), "grp", 8, 8, group=2)
    _, groups = groups_of(g.model(g.conv(grp, "head", 8, 2)))
    assert any(c.kind == DEPTHWISE and c.node.name == "dw" for c in groups["a"].consumers)
    assert groups["a"].pinned is None
    assert "grouped Conv (group=2)" in groups["p"].pinned and groups["p"].pinned_by[0][0] == "grp"
    assert "grouped Conv" in groups["grp"].pinned  # its own outputs are left alone too


def test_flatten_gives_blocks_to_gemm():
    g = G(hw=4)
    a = g.conv("x", "a", 3, 5)
    f = g.node("Flatten", [a], "flat", axis=1)
    w = g.init("fc.w", RNG.normal(size=(2, 5 * 16)))
    out = g.node("Gemm", [f, w], "fc", transB=1)
    analysis, groups = groups_of(g.model(out))
    assert any(c.kind == LAYER_IN and c.node.name == "fc" for c in groups["a"].consumers)
    assert analysis.position_matrix("flat", "a", [2]).tolist() == [list(range(32, 48))]


def test_reshape_head_rewrites_explicit_shape_and_pins_computed_shape():
    g = G()
    p = g.node("GlobalAveragePool", [g.conv("x", "a", 3, 6)], "gap")
    r = g.node("Reshape", [p, g.init("shape", [-1, 6], np.int64)], "reshape")
    out = g.node("MatMul", [r, g.init("fc.w", RNG.normal(size=(6, 2)))], "fc")
    _, groups = groups_of(g.model(out))
    assert groups["a"].pinned is None
    assert any(c.kind == RESHAPE for c in groups["a"].consumers)

    g = G()
    a = g.conv("x", "a", 3, 6)
    shape = g.node("Shape", [a], "shape_of")
    out = g.node("Reshape", [a, shape], "reshape")
    _, groups = groups_of(g.model(g.conv(out, "head", 6, 2)))
    reasons = {(n, why) for n, _, why in groups["a"].pinned_by}
    assert ("shape_of", "Shape reads the channel count") in reasons


def test_se_block_inner_prunable_outer_consistent():
    g = G()
    x = g.node("Relu", [g.conv("x", "body", 3, 8)], "r")
    s = g.node("GlobalAveragePool", [x], "se.pool")
    s = g.node("Relu", [g.conv(s, "se.fc1", 8, 4, k=1)], "se.relu")
    s = g.node("Sigmoid", [g.conv(s, "se.fc2", 4, 8, k=1)], "se.sig")
    y = g.node("Mul", [x, s], "se.mul")
    _, groups = groups_of(g.model(g.conv(y, "head", 8, 2)))
    assert {p.name for p in groups["body"].producers} == {"body", "se.fc2"}
    assert groups["body"].pinned is None and groups["se.fc1"].pinned is None
    assert groups["se.fc1"].size == 4


def test_pad_and_unknown_ops():
    g = G()
    a = g.conv("x", "a", 3, 4)
    spatial = g.node("Pad", [a, g.init("pads", [0, 0, 1, 1, 0, 0, 1, 1], np.int64)], "pad_hw")
    b = g.conv(spatial, "b", 4, 4)
    chan = g.node("Pad", [b, g.init("pads_c", [0, 1, 0, 0, 0, 1, 0, 0], np.int64)], "pad_c", mode="reflect")
    c = g.conv(chan, "c", 6, 4)
    d = g.node("LpNormalization", [c], "lpnorm", axis=1)
    _, groups = groups_of(g.model(g.conv(d, "head", 4, 2)))
    assert groups["a"].pinned is None
    assert groups["b"].pinned_by == [("pad_c", "Pad", "Pad of the channel axis that is not with a constant")]
    assert groups["c"].pinned_by == [("lpnorm", "LpNormalization",
                                      "LpNormalization is not understood by the channel analysis")]


def test_channel_pad_maps_channels_and_adds_constant_channels():
    g = G()
    a = g.conv("x", "a", 3, 4)
    p = g.node("Pad", [a, g.init("pads", [0, 2, 1, 1, 0, 1, 1, 1], np.int64)], "pad")  # 2 zeros before, 1 after
    analysis, groups = groups_of(g.model(g.conv(p, "head", 7, 2)))
    assert groups["a"].pinned is None and analysis.positions("pad", "a").tolist() == [2, 3, 4, 5]
    zeros = [gr for gr in analysis.groups if not gr.producers]  # produced by no layer: left alone
    assert [gr.size for gr in zeros] == [2, 1]
    assert all("holds only constant channels" in gr.pinned for gr in zeros)
    assert any(c.kind == PAD and c.node.name == "pad" for c in groups["a"].consumers)
    assert analysis.kept_indices("pad", {"a": np.array([0, 3])}).tolist() == [0, 1, 2, 5, 6]


def test_residual_with_zero_padded_shortcut_splits_the_conv_branch():
    """x (a, 4) -> [Concat(x, zeros 2) | conv b (6)] -> Add: b's first 4 channels join a, its last 2 the zeros."""
    g = G()
    a = g.node("Relu", [g.conv("x", "a", 3, 4)], "ra")
    fill = g.node("ConstantOfShape", [g.init("fill.shape", [1, 2, 8, 8], np.int64)], "fill")
    cat = g.node("Concat", [a, fill], "cat", axis=1)
    b = g.conv(a, "b", 4, 6)
    s = g.node("Add", [b, cat], "add")
    g.inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    analysis, groups = groups_of(g.model(g.conv(s, "head", 6, 2)))
    assert sorted(groups) == ["a", "b", "head"]
    assert {p.name for p in groups["a"].producers} == {"a", "b"} and groups["a"].size == 4
    assert [p.name for p in groups["b"].producers] == ["b"] and groups["b"].size == 2
    assert groups["a"].pinned is None and groups["b"].pinned is None
    assert analysis.positions("b", "b").tolist() == [4, 5] and analysis.positions("cat", "b").tolist() == [4, 5]
    assert {gr.id for gr in analysis.groups_of_node("b")} == {"a", "b"}
    assert any(c.kind == SHAPE and c.node.name == "fill" for c in groups["b"].consumers)
    kept = {"a": np.array([1, 2, 3]), "b": np.array([1])}
    assert analysis.kept_indices("add", kept).tolist() == [1, 2, 3, 5]
    assert analysis.kept_indices("fill", kept).tolist() == [1]


def test_split_pins_only_the_part_combined_with_fixed_channels():
    g = G()
    cat = g.node("Concat", ["x", g.conv("x", "a", 3, 2)], "cat", axis=1)  # [graph input 3 | a 2]
    s = g.node("Add", [g.conv("x", "b", 3, 5), cat], "add")
    analysis, groups = groups_of(g.model(g.conv(s, "head", 5, 2)))
    assert groups["b"].size == 3 and "cannot change" in groups["b"].pinned
    assert groups["a"].pinned is None and {p.name for p in groups["a"].producers} == {"a", "b"}
    assert analysis.positions("b", "a").tolist() == [3, 4]


def test_add_of_misaligned_flattened_blocks_pins():
    g = G(hw=2)
    f1 = g.node("Flatten", [g.conv("x", "a", 3, 2)], "f1", axis=1)  # 2 channels x 4 positions
    f2 = g.node("Flatten", [g.node("GlobalAveragePool", [g.conv("x", "b", 3, 8)], "gap")], "f2", axis=1)  # 8 x 1
    s = g.node("Add", [f1, f2], "add")
    w = g.init("fc.w", RNG.normal(size=(2, 8)))
    _, groups = groups_of(g.model(g.node("Gemm", [s, w], "fc", transB=1)))
    assert "channel blocks do not line up" in groups["a"].pinned
    assert "channel blocks do not line up" in groups["b"].pinned
