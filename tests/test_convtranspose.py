"""ConvTranspose (the decoder op of the PP-OCR text detectors), added as one entry of the layer table:
pruned exactly (dead channels removed with identical outputs, output and input channels sliced) and
ternarized as a 1x1 TernaryConv + DepthToSpace (exact against the dequantized model, bounded against the
original)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ocomp.layers import layer_of
from ocomp.metrics import compare_outputs
from ocomp.model import infer_shapes, to_graph
from ocomp.passes.channels import analyze
from ocomp.passes.ternary import dequantize
from ocomp.pipeline import run_passes
from ocomp.runtime import session


def decoder(seed: int = 0, zero_mid: tuple = (), zero_up: tuple = ()) -> onnx.ModelProto:
    """x -> Conv3x3(16) -> BN -> Relu -> ConvTranspose(2x2, s2, 16 -> 12) -> BN -> Relu -> Conv1x1(1) -> Sigmoid.
    `zero_mid` / `zero_up`: channels of the first Conv / the ConvTranspose whose weights and bias are 0."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (16, 3, 3, 3))
    b1 = rng.normal(0, 0.1, 16)
    wt = rng.normal(0, 0.3, (16, 12, 2, 2))  # (C_in, C_out, kH, kW)
    bt = rng.normal(0, 0.1, 12)
    w1[list(zero_mid)] = 0
    b1[list(zero_mid)] = 0
    wt[:, list(zero_up)] = 0
    bt[list(zero_up)] = 0

    def bn(name, c, dead):  # a dead channel's BN outputs 0 (gamma = beta = 0), as after a zeroed conv channel
        gamma, beta = rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c)
        gamma[list(dead)] = beta[list(dead)] = 0
        return [numpy_helper.from_array(v.astype(np.float32), f"{name}.{k}") for k, v in (
            ("g", gamma), ("b", beta), ("m", rng.normal(0, 0.1, c)), ("v", rng.uniform(0.5, 1.5, c)))]

    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
        ("w1", w1), ("b1", b1), ("wt", wt), ("bt", bt), ("w2", rng.normal(0, 0.3, (1, 12, 1, 1))))]
    inits += bn("bn1", 16, zero_mid) + bn("bn2", 12, zero_up)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn1.g", "bn1.b", "bn1.m", "bn1.v"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("ConvTranspose", ["r1", "wt", "bt"], ["u"], name="up", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["u", "bn2.g", "bn2.b", "bn2.m", "bn2.v"], ["n2"], name="bn2"),
        helper.make_node("Relu", ["n2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w2"], ["c2"], name="head", kernel_shape=[1, 1]),
        helper.make_node("Sigmoid", ["c2"], ["y"], name="sigmoid"),
    ]
    graph = helper.make_graph(nodes, "decoder", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 16, 16])], inits)
    return infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return session(model).run(None, {"x": x})[0]


X = np.random.default_rng(5).normal(size=(4, 3, 8, 8)).astype(np.float32)


def test_analysis_groups_conv_transpose_channels() -> None:
    analysis = analyze(to_graph(decoder()))
    groups = {g.id: g for g in analysis.groups}
    assert groups["conv1"].prunable and groups["conv1"].size == 16
    assert groups["up"].prunable and groups["up"].size == 12
    assert any(c.node.name == "up" and c.kind == "layer_in" for c in groups["conv1"].consumers)


def test_dead_channels_removed_exactly_through_conv_transpose() -> None:
    model = decoder(zero_mid=(1, 4, 9, 12), zero_up=(0, 5, 7))
    result = run_passes(model, ["prune"], {"prune": {"ratio": 0.25, "multiple": 1}})
    pruned = result.model
    weights = {i.name: numpy_helper.to_array(i) for i in pruned.graph.initializer}
    up = next(n for n in pruned.graph.node if n.op_type == "ConvTranspose")
    assert weights[up.input[1]].shape == (12, 9, 2, 2)  # 16 -> 12 inputs, 12 -> 9 outputs
    assert result.reports[0].details["dead_channels_removed"] == 7
    np.testing.assert_allclose(run(pruned, X), run(model, X), rtol=1e-5, atol=1e-6)


def test_pruned_conv_transpose_runs_and_is_smaller() -> None:
    model = decoder()
    result = run_passes(model, ["prune"], {"prune": {"ratio": 0.5}})
    totals = result.reports[0].totals
    assert totals["params_after"] < 0.6 * totals["params_before"]
    assert run(result.model, X).shape == (4, 1, 16, 16)


def test_ternary_conv_transpose_is_tern_conv_plus_depth_to_space() -> None:
    model = decoder()
    result = run_passes(model, ["ternary"], {"ternary": {"min_params": 0, "keep_first": False,
                                                         "keep_last": False}})
    out = result.model
    ops = [n.op_type for n in out.graph.node]
    assert "ConvTranspose" not in ops and "DepthToSpace" in ops
    ternary = [n for n in out.graph.node if n.name == "up"][0]
    assert ternary.op_type == "TernaryConv"
    shape = [a.ints for a in ternary.attribute if a.name == "weight_shape"][0]
    assert list(shape) == [12 * 4, 16, 1, 1]
    # the custom op computes exactly its dequantized float equivalent ...
    np.testing.assert_allclose(run(out, X), run(dequantize(out), X), rtol=1e-5, atol=1e-6)
    # ... which is the ConvTranspose with weights alpha * T put back in its own layout (the decomposition is exact)
    only_up = run_passes(model, ["ternary"], {"ternary": {"min_params": 0, "keep_first": False,
                                                          "keep_last": False, "skip": ["conv1", "head"]}}).model
    rows = numpy_helper.to_array([i for i in dequantize(only_up).graph.initializer
                                  if i.name.endswith("dequantized_weight")][0])  # (12*2*2, 16, 1, 1), (o, i, j)
    back = onnx.ModelProto()
    back.CopyFrom(model)
    for init in back.graph.initializer:
        if init.name == "wt":
            init.CopyFrom(numpy_helper.from_array(rows.reshape(12, 2, 2, 16).transpose(3, 0, 1, 2).copy(), "wt"))
    np.testing.assert_allclose(run(only_up, X), run(back, X), rtol=1e-5, atol=1e-6)
    # and stays close to the float model (bounded: ternary weights, one scale per output row)
    metrics = compare_outputs(run(model, X), run(only_up, X))
    assert metrics["cosine"] > 0.9, metrics


def test_conv_transpose_with_overlapping_taps_stays_float_with_a_reason() -> None:
    model = decoder()
    for node in model.graph.node:
        if node.op_type == "ConvTranspose":
            del node.attribute[:]
            node.attribute.extend([helper.make_attribute("kernel_shape", [2, 2]),
                                   helper.make_attribute("strides", [1, 1])])
    model.graph.output[0].type.tensor_type.shape.dim[2].dim_value = 9
    model.graph.output[0].type.tensor_type.shape.dim[3].dim_value = 9
    del model.graph.value_info[:]
    model = infer_shapes(model)
    result = run_passes(model, ["ternary"], {"ternary": {"min_params": 0}})
    reasons = [s.reason for s in result.reports[0].skipped if s.name == "up"]
    assert reasons and "kernel differs from its stride" in reasons[0]
    assert layer_of(to_graph(result.model).nodes[3]).op == "ConvTranspose"


def test_detector_with_dynamic_height_width_compressed_without_input_shape(tmp_path) -> None:
    """A PP-OCR-style decoder whose input has symbolic H and W: `prune,ternary` with no --input-shape keeps
    the dims symbolic, the compressed model runs at two sizes with the original's output shapes, and strict
    shape inference gives every ocomp op output (and everything after it) its full shape."""
    from click.testing import CliRunner

    from ocomp.cli import main

    model = decoder()
    for value, dims in ((model.graph.input[0], ["N", 3, "H", "W"]), (model.graph.output[0], ["N", 1, "H2", "W2"])):
        for dim, size in zip(value.type.tensor_type.shape.dim, dims):
            dim.Clear()
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size
    del model.graph.value_info[:]
    src, out = tmp_path / "dynamic.onnx", tmp_path / "small.onnx"
    onnx.save(model, src)
    result = CliRunner().invoke(main, ["compress", str(src), "-o", str(out), "--passes", "prune,ternary",
                                       "--ternary-min-params", "0", "-q", "--no-latency"])
    assert result.exit_code == 0, result.output
    small = onnx.load(out)
    assert any(n.domain == "ocomp" for n in small.graph.node) and any(n.op_type == "DepthToSpace" for n in small.graph.node)
    assert [d.dim_param or d.dim_value for d in small.graph.input[0].type.tensor_type.shape.dim] == ["N", 3, "H", "W"]
    for size in ((8, 8), (12, 20)):
        x = np.random.default_rng(1).normal(size=(2, 3) + size).astype(np.float32)
        assert session(small).run(None, {"x": x})[0].shape == session(model).run(None, {"x": x})[0].shape
    inferred = onnx.shape_inference.infer_shapes(small, check_type=True, strict_mode=True)
    shapes = {v.name: v.type.tensor_type.shape for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for node in inferred.graph.node:
        shape = shapes.get(node.output[0])
        assert shape is not None and len(shape.dim) == 4, (node.op_type, node.output[0])
        assert all(d.dim_param for d in shape.dim[2:]), (node.op_type, node.output[0])  # symbolic, like the original's
