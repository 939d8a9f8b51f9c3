"""The pass pipeline: option declarations, recipes, provenance, postconditions, atomic output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import zoo
from ocomp import __version__, api
from ocomp.errors import PassError, UsageError
from ocomp.model import infer_shapes, load_model, to_graph, to_model
from ocomp.pipeline import REGISTRY, Option, Pass, Report, fraction, key_value, register, resolve_options, run_passes


class ScaleBias(Pass):
    """Test pass: multiplies every Conv bias by a factor (a real, checkable rewrite)."""

    name = "test_scale_bias"
    options = (
        Option("factor", float, 2.0, "multiply biases by this"),
        Option("skip", str, (), "conv names to leave alone", multiple=True),
        Option("layer", key_value(fraction), (), "per-layer override", multiple=True),
        Option("enabled", bool, True, "do anything at all"),
    )

    def run(self, graph: gs.Graph, ctx) -> Report:
        report = Report(self.name)
        for node in graph.nodes:
            if node.op != "Conv" or len(node.inputs) < 3 or not ctx.options["enabled"]:
                continue
            if node.name in ctx.options["skip"]:
                report.skip(node.name, node.op, "in the skip list")
                continue
            bias = node.inputs[2]
            bias.values = (bias.values * ctx.options["factor"]).astype(np.float32)
            report.change(node.name, node.op, bias.shape, bias.shape, bias.values.size, bias.values.size)
        return report


class BreaksOutputs(Pass):
    """Test pass that renames the graph output (a broken postcondition)."""

    name = "test_breaks_outputs"

    def run(self, graph: gs.Graph, ctx) -> Report:
        graph.outputs[0].name = "renamed"
        return Report(self.name)


@pytest.fixture(autouse=True)
def test_passes():
    for cls in (ScaleBias, BreaksOutputs):
        register(cls)
    yield
    for cls in (ScaleBias, BreaksOutputs):
        REGISTRY.pop(cls.name, None)


def test_option_conversion_from_strings_and_values() -> None:
    resolved = resolve_options("test_scale_bias", {"factor": "3", "skip": "a", "layer": {"conv1": 0.5},
                                                   "enabled": "false"})
    assert resolved == {"factor": 3.0, "skip": ("a",), "layer": (("conv1", 0.5),), "enabled": False}
    assert resolve_options("test_scale_bias", None)["factor"] == 2.0
    with pytest.raises(UsageError, match="has no option 'nope'; its options: enabled, factor, layer, skip"):
        resolve_options("test_scale_bias", {"nope": 1})
    with pytest.raises(UsageError, match="option 'layer' of pass 'test_scale_bias'"):
        resolve_options("test_scale_bias", {"layer": ["conv1=1.5"]})
    with pytest.raises(UsageError, match="expected true/false"):
        resolve_options("test_scale_bias", {"enabled": 3})


def test_run_passes_rewrites_and_reports() -> None:
    model = load_model_from(zoo.build("tiny_conv", folded=False))
    feeds = zoo.random_input(model, batch=2)
    result = run_passes(model, ["test_scale_bias"], {"test_scale_bias": {"factor": 0.0}})
    (report,) = result.reports
    assert [c.name for c in report.layers] == [model.graph.node[0].name]
    assert report.totals["params_before"] == report.totals["params_after"] == 224
    # with bias zeroed, output equals conv without bias followed by relu
    no_bias = onnx.ModelProto()
    no_bias.CopyFrom(model)
    for init in no_bias.graph.initializer:
        if init.name.endswith("bias"):
            init.CopyFrom(onnx.numpy_helper.from_array(np.zeros(init.dims, np.float32), init.name))
    np.testing.assert_allclose(zoo.run(result.model, feeds)[0], zoo.run(no_bias, feeds)[0], rtol=0, atol=0)
    assert json.loads(json.dumps(report.to_dict()))["options"]["factor"] == 0.0


def test_pass_breaking_signature_is_named() -> None:
    model = load_model_from(zoo.build("tiny_conv"))
    with pytest.raises(PassError, match=r"pass 'test_breaks_outputs' \(after: test_scale_bias\)"):
        run_passes(model, ["test_scale_bias", "test_breaks_outputs"])


def test_options_for_absent_pass_are_usage_errors() -> None:
    model = load_model_from(zoo.build("tiny_conv"))
    with pytest.raises(UsageError, match="not in the pipeline: test_breaks_outputs"):
        run_passes(model, ["test_scale_bias"], {"test_breaks_outputs": {}})


def test_compress_api_writes_provenance_and_recipe(tmp_path: Path) -> None:
    src = tmp_path / "in.onnx"
    onnx.save(zoo.build("plain"), src)
    before = src.read_bytes()
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('passes = ["test_scale_bias"]\n[test_scale_bias]\nfactor = 0.5\nskip = ["features.0.conv"]\n')
    out, rep = tmp_path / "out.onnx", tmp_path / "report.json"
    result = api.compress(src, out, recipe=recipe, options={"test_scale_bias": {"factor": 3.0}}, report=rep)
    assert src.read_bytes() == before
    props = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert props["ocomp.version"] == __version__
    history = json.loads(props["ocomp.passes"])
    assert history == [{"name": "test_scale_bias", "options": {"enabled": True, "factor": 3.0, "layer": [],
                                                                 "skip": ["features.0.conv"]}}]
    data = json.loads(rep.read_text())
    assert data["passes"][0]["skipped"] == [{"name": "features.0.conv", "op": "Conv", "reason": "in the skip list"}]
    assert data["before"]["params"] == result.before.params
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_to_graph_turns_constant_nodes_into_initializers() -> None:
    model = zoo.build("tiny_conv")
    weight = model.graph.initializer[0]
    node = onnx.helper.make_node("Constant", [], [weight.name], value=weight)
    model.graph.node.insert(0, node)
    del model.graph.initializer[0]
    graph = to_graph(model)
    assert not any(n.op == "Constant" for n in graph.nodes)
    rebuilt = to_model(graph, model)
    feeds = zoo.random_input(model)
    np.testing.assert_array_equal(zoo.run(rebuilt, feeds)[0], zoo.run(model, feeds)[0])


def load_model_from(model: onnx.ModelProto) -> onnx.ModelProto:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        onnx.save(model, path)
        return load_model(path)


def with_identity_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every Conv/Gemm weight read through an Identity node, as PyTorch exports often have it."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {i.name for i in model.graph.initializer}
    extra = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm") and node.input[1] in inits:
            alias = node.input[1] + "_identity"
            extra.append(onnx.helper.make_node("Identity", [node.input[1]], [alias]))
            node.input[1] = alias
    assert extra
    nodes = extra + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


@pytest.mark.parametrize("passes, options", [(["prune"], {"prune": {"ratio": 0.5}}), (["ternary"], {})])
def test_weights_behind_identity_are_rewritten(passes, options) -> None:
    """A weight behind Identity is still the layer's weight: the passes rewrite it exactly
    as they rewrite the same model without the Identity nodes."""
    model = zoo.build("resnet")
    plain = run_passes(infer_shapes(model), passes, options).model
    aliased = run_passes(infer_shapes(with_identity_weights(model)), passes, options).model
    assert not [n for n in aliased.graph.node if n.op_type == "Identity"]
    assert sorted(n.op_type for n in aliased.graph.node) == sorted(n.op_type for n in plain.graph.node)
    x = zoo.random_input(model, batch=2)
    from ocomp.runtime import session

    np.testing.assert_allclose(session(aliased).run(None, x)[0], session(plain).run(None, x)[0], rtol=1e-5,
                               atol=1e-5)
