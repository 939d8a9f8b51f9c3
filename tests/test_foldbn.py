"""The foldbn pass: BN folded into Conv / Gemm / Ternary* exactly; non-foldable BNs skipped with a reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import zoo
from ocomp.metrics import compare_outputs
from ocomp.model import infer_shapes
from ocomp.passes.ternary import dequantize
from ocomp.pipeline import run_passes
from ocomp.runtime import session

TOLERANCE = 1e-5  # max |a - b| relative to the output's max |a|


def bn_count(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def run(model: onnx.ModelProto, passes: list[str], options: dict | None = None):
    return run_passes(infer_shapes(model), passes, options)


def test_zoo_model(zoo_model: onnx.ModelProto) -> None:
    result = run(zoo_model, ["foldbn"])
    out, report = result.model, result.reports[0]
    before = bn_count(zoo_model)
    # every zoo BN follows a Conv whose output it alone consumes: all of them fold
    assert bn_count(out) == 0 and report.details["folded"] == before and not report.skipped
    feeds = zoo.random_input(zoo_model, batch=2)
    metrics = compare_outputs(zoo.run(zoo_model, feeds)[0], zoo.run(out, feeds)[0])
    assert metrics["max_rel"] < TOLERANCE, metrics
    # output names of the folded layers are the BN outputs the rest of the graph already used
    names = {o for n in out.graph.node for o in n.output}
    assert all(n.output[0] in names for n in zoo_model.graph.node if n.op_type == "BatchNormalization")


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2", "se", "matmul_head"])
def test_after_ternary_exact(name: str) -> None:
    model = zoo.build(name)
    options = {"ternary": {"min_params": 0, "keep_first": False, "keep_last": False}}
    tern = run(model, ["ternary"], options).model
    result = run(model, ["ternary", "foldbn"], options)
    assert bn_count(result.model) == 0 and bn_count(tern) > 0
    feeds = zoo.random_input(model, batch=2)
    expected = zoo.run(dequantize(tern), feeds)[0]
    assert compare_outputs(expected, zoo.run(dequantize(result.model), feeds)[0])["max_rel"] < TOLERANCE
    got = session(result.model).run(None, feeds)[0]
    assert compare_outputs(expected, got)["max_rel"] < 1e-4


def _bn_inits(prefix: str, c: int, rng: np.random.Generator, gamma: np.ndarray | None = None) -> dict:
    return {f"{prefix}.scale": rng.uniform(0.5, 1.5, c) if gamma is None else gamma,
            f"{prefix}.bias": rng.normal(size=c), f"{prefix}.mean": rng.normal(size=c),
            f"{prefix}.var": rng.uniform(0.5, 2.0, c)}


def _bn(x: str, prefix: str, out: str) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}.{k}" for k in ("scale", "bias", "mean", "var")],
                            [out], name=prefix, epsilon=1e-3)


def _model(nodes, inits, in_shape, out_shape) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                              initializer=[numpy_helper.from_array(np.asarray(v, np.float32), k)
                                           for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_both_layouts_and_negative_gamma_on_ternary(trans_b: int) -> None:
    rng = np.random.default_rng(trans_b)
    w = rng.normal(size=(32, 64)) if trans_b else rng.normal(size=(64, 32))  # (N, K) with transB, else (K, N)
    gamma = rng.uniform(0.5, 1.5, 32) * np.where(np.arange(32) % 3 == 0, -1, 1)  # some negative gammas
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["g"], name="fc", transB=trans_b, alpha=0.7, beta=1.5),
             _bn("g", "bn", "y")]
    model = _model(nodes, {"w": w, "c": rng.normal(size=32), **_bn_inits("bn", 32, rng, gamma)}, ["N", 64],
                   ["N", 32])
    feeds = {"x": rng.normal(size=(5, 64)).astype(np.float32)}
    folded = run(model, ["foldbn"]).model
    assert [n.op_type for n in folded.graph.node] == ["Gemm"]
    assert compare_outputs(zoo.run(model, feeds)[0], zoo.run(folded, feeds)[0])["max_rel"] < TOLERANCE

    options = {"ternary": {"min_params": 0, "keep_first": False, "keep_last": False}}
    tern = run(model, ["ternary"], options).model
    both = run(model, ["ternary", "foldbn"], options).model
    assert [n.op_type for n in both.graph.node] == ["TernaryGemm"]
    alpha = numpy_helper.to_array(next(i for i in both.graph.initializer if i.name == both.graph.node[0].input[2]))
    assert (alpha[gamma < 0] < 0).all() and (alpha[gamma > 0] > 0).all()
    expected = zoo.run(dequantize(tern), feeds)[0]
    assert compare_outputs(expected, zoo.run(dequantize(both), feeds)[0])["max_rel"] < TOLERANCE
    assert compare_outputs(expected, session(both).run(None, feeds)[0])["max_rel"] < 1e-4


def test_non_foldable_bns_are_skipped_with_reasons() -> None:
    rng = np.random.default_rng(5)
    nodes = [
        _bn("x", "bn_input", "a"),  # its input is a graph input
        helper.make_node("Conv", ["a", "w1"], ["c1"], name="conv1", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        _bn("r1", "bn_relu", "b"),  # follows a Relu
        helper.make_node("Conv", ["b", "w2"], ["c2"], name="conv2", kernel_shape=[1, 1]),
        _bn("c2", "bn_shared", "d"),  # conv2's output is also used by the Add
        helper.make_node("Add", ["c2", "d"], ["y"], name="add"),
    ]
    inits = {"w1": rng.normal(size=(4, 4, 1, 1)), "w2": rng.normal(size=(4, 4, 1, 1)),
             **_bn_inits("bn_input", 4, rng), **_bn_inits("bn_relu", 4, rng), **_bn_inits("bn_shared", 4, rng)}
    model = _model(nodes, inits, ["N", 4, 3, 3], ["N", 4, 3, 3])
    result = run(model, ["foldbn"])
    reasons = {s.name: s.reason for s in result.reports[0].skipped}
    assert "graph input" in reasons["bn_input"]
    assert "Relu" in reasons["bn_relu"]
    assert "other consumers" in reasons["bn_shared"]
    assert bn_count(result.model) == 3 and not result.reports[0].layers
    feeds = {"x": rng.normal(size=(2, 4, 3, 3)).astype(np.float32)}
    assert compare_outputs(zoo.run(model, feeds)[0], zoo.run(result.model, feeds)[0])["max_rel"] == 0.0


def test_resnet20_all_bns_folded(shared_dir) -> None:
    """The PyTorch export shares equal BN biases through Identity nodes; those BNs fold too."""
    from ocomp.model import load_model

    model = load_model(shared_dir / "resnet20_fashion_mnist.onnx")
    assert bn_count(model) == 21
    out = run_passes(model, ["foldbn"]).model
    assert bn_count(out) == 0
    images = np.load(shared_dir / "fashion_mnist_test.npz")["images"][:64].astype(np.float32) / 255.0
    metrics = compare_outputs(zoo.run(model, {"input": images})[0], zoo.run(out, {"input": images})[0])
    assert metrics["max_rel"] < TOLERANCE, metrics
