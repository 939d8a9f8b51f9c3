"""The prune pass: exactness on dead channels, valid smaller models, counts, options, criteria, real models, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import zoo
from ocomp.errors import UsageError
from ocomp.model import infer_shapes, load_model, signature, to_graph, to_model
from ocomp.layers import layer_of
from ocomp.passes.channels import DEPTHWISE, NORM, PRODUCER_KINDS, analyze
from ocomp.passes.prune import PruneSettings, prune_graph
from ocomp.session import make_session
from ocomp.pipeline import KeptChannels, resolve_options, run_passes

REL_TOL = 1e-5  # dead-channel removal is exact up to float32 summation order


# ---------------------------------------------------------------- helpers


def prepared(model: onnx.ModelProto) -> onnx.ModelProto:
    return infer_shapes(model)


def prune(model: onnx.ModelProto, state: KeptChannels | None = None, calibration=None, **options):
    """The prune pass; kept counts exact (multiple 1) unless the test names a multiple."""
    options.setdefault("multiple", 1)
    result = run_passes(model, ["prune"], {"prune": options}, kept_channels=state, calibration=calibration)
    return result.model, result.reports[0]


def assert_close(ref: np.ndarray, out: np.ndarray) -> None:
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(out, ref, rtol=REL_TOL, atol=REL_TOL * scale)


def independent_counts(model: onnx.ModelProto) -> tuple[int, int]:
    """Params (float initializers) and MACs at batch 1 of Conv/Gemm/MatMul, from initializers and inferred shapes."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    shapes = {}
    for vi in list(model.graph.value_info) + list(model.graph.output):
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
    params = sum(v.size for v in inits.values() if v.dtype.kind == "f")
    macs = 0
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul") or n.input[1] not in inits:
            continue
        w = inits[n.input[1]]
        out = shapes[n.output[0]]
        per_output = {"Conv": int(np.prod(w.shape[1:])), "MatMul": w.shape[0]}.get(n.op_type)
        if n.op_type == "Gemm":
            trans_b = any(a.name == "transB" and a.i for a in n.attribute)
            per_output = w.shape[1] if trans_b else w.shape[0]
        macs += int(np.prod(out[1:])) * per_output
    return params, macs


def out_channels(model: onnx.ModelProto) -> dict[str, int]:
    """Output channels of every Conv/Gemm/MatMul by node name."""
    inits = {i.name: i for i in model.graph.initializer}
    result = {}
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in inits:
            dims = list(inits[n.input[1]].dims)
            trans_b = any(a.name == "transB" and a.i for a in n.attribute)
            result[n.name] = dims[0] if n.op_type == "Conv" or trans_b else dims[1]
    return result


def expected_kept(size: int, ratio: float) -> int:
    return max(1, size - math.floor(ratio * size + 0.5))


def zero_channels(model: onnx.ModelProto, chosen: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Make the chosen channels of each group exactly 0 after their activations.

    Zeroes the producers' weight rows and biases, BatchNorm gamma and beta, and
    the depthwise Conv rows of each group.
    """
    graph = to_graph(model)
    analysis = analyze(graph)

    def zero(tensor, index, axis):
        values = np.array(tensor.values, copy=True)
        np.moveaxis(values, axis, 0)[index] = 0
        tensor.values = values

    for gid, chans in chosen.items():
        for c in analysis.group(gid).consumers:
            inputs = c.node.inputs
            pos = analysis.positions(c.tensor, gid, chans)  # a producer's output may hold several groups
            if c.kind in PRODUCER_KINDS:
                zero(inputs[1], pos, layer_of(c.node).kind.out_axis(c.node))
                if len(inputs) > 2:  # bias: channels on its last axis
                    zero(inputs[2], pos, inputs[2].values.ndim - 1)
            elif c.kind in (NORM, DEPTHWISE):  # BN gamma and beta; depthwise weight rows and bias
                for tensor in inputs[1:3]:
                    zero(tensor, pos, 0)
    return to_model(graph, model)


def prunable_groups(model: onnx.ModelProto):
    return [g for g in analyze(to_graph(model)).groups if g.pinned is None]


# ---------------------------------------------------------------- exactness


def test_dead_channels_removed_exactly(zoo_model):
    model = prepared(zoo_model)
    rng = np.random.default_rng(1)
    chosen = {}
    for g in prunable_groups(model):
        n = math.floor(0.5 * g.size + 0.5)
        chosen[g.id] = np.sort(rng.choice(g.size, size=n, replace=False))
    assert chosen, "every zoo model has prunable groups"
    dead = prepared(zero_channels(model, chosen))
    state = KeptChannels()
    pruned, report = prune(dead, state, ratio=0.5)

    feeds = zoo.random_input(dead, batch=3, seed=5)
    assert_close(zoo.run(dead, feeds)[0], zoo.run(pruned, feeds)[0])
    assert report.details["dead_channels_removed"] == sum(len(c) for c in chosen.values())
    analysis = analyze(to_graph(dead))
    for gid, chans in chosen.items():
        kept = np.setdiff1d(np.arange(analysis.group(gid).size), chans)
        for c in analysis.group(gid).consumers:
            if c.kind in PRODUCER_KINDS:
                np.testing.assert_array_equal(state.by_tensor[c.tensor], kept)


# ---------------------------------------------------------------- validity and counts


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_pruned_model_is_valid_and_smaller(zoo_model, ratio):
    model = prepared(zoo_model)
    pruned, report = prune(model, ratio=ratio)

    onnx.checker.check_model(pruned, full_check=True)
    onnx.shape_inference.infer_shapes(pruned, check_type=True, strict_mode=True, data_prop=True)
    assert signature(pruned) == signature(model)
    out = zoo.run(pruned, zoo.random_input(model, batch=2))[0]
    assert out.shape == (2, 10) and np.isfinite(out).all()

    params, macs = independent_counts(pruned)
    assert (report.totals["params_after"], report.totals["macs_after"]) == (params, macs)
    params0, macs0 = independent_counts(model)
    assert params < params0 and macs < macs0

    channels = out_channels(pruned)
    for g in prunable_groups(model):
        for p in g.producers:
            assert channels[p.name] == expected_kept(g.size, ratio), p.name


def test_plain_counts_match_hand_computation():
    model = prepared(zoo.build("plain"))
    pruned, report = prune(model, ratio=0.5)
    # convs 3->8 (+bias), 8->16, 16->16, 16->32 with BN, fc 32->10; 32x32, 16x16, 16x16, 8x8 outputs
    params = (8 * 3 * 9 + 8 + 4 * 8) + (16 * 8 * 9 + 4 * 16) + (16 * 16 * 9 + 4 * 16) + (32 * 16 * 9 + 4 * 32) + (
        32 * 10 + 10)
    macs = 8 * 1024 * 27 + 16 * 256 * 72 + 16 * 256 * 144 + 32 * 64 * 144 + 10 * 32
    assert report.totals["params_after"] == params
    assert report.totals["macs_after"] == macs


def test_ratio_zero_is_identity(zoo_model):
    model = prepared(zoo_model)
    pruned, report = prune(model, ratio=0.0)
    feeds = zoo.random_input(model, batch=2)
    np.testing.assert_array_equal(zoo.run(model, feeds)[0], zoo.run(pruned, feeds)[0])
    assert report.totals["params_after"] == report.totals["params_before"]
    assert report.layers == []


def test_pruning_twice_composes():
    model = prepared(zoo.build("resnet", folded=True))
    state = KeptChannels()
    once, first = prune(model, state, ratio=0.3)
    kept_once = {k: v.copy() for k, v in state.by_tensor.items()}
    twice, second = prune(once, state, ratio=0.3)
    assert second.totals["params_after"] < first.totals["params_after"] < first.totals["params_before"]

    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    final = {i.name: numpy_helper.to_array(i) for i in twice.graph.initializer}
    stem = next(n for n in model.graph.node if n.name == "stem.conv")
    kept = state.by_tensor[stem.output[0]]
    assert len(kept) == expected_kept(expected_kept(16, 0.3), 0.3)
    assert set(kept) <= set(kept_once[stem.output[0]])
    # the stem's input is the graph input: its final weight is the original's kept rows
    np.testing.assert_array_equal(final[stem.input[1]], inits[stem.input[1]][kept])
    feeds = zoo.random_input(model, batch=2)
    assert np.isfinite(zoo.run(twice, feeds)[0]).all()


# ---------------------------------------------------------------- report


def test_report_rows_and_pinned_groups():
    model = prepared(zoo.build("grouped"))
    _, report = prune(model, ratio=0.5, criterion="l2")
    rows = {r.name: r for r in report.layers}
    conv = rows["features.2.conv"]  # 32 -> 64 1x1 conv after the grouped conv (whose group is pinned)
    assert (conv.before, conv.after) == ("64x32x1x1", "32x32x1x1")
    assert conv.params_before == 64 * 32 and conv.params_after == 32 * 32
    assert conv.macs_before == 64 * 256 * 32 and conv.macs_after == 32 * 256 * 32
    assert "out 64->32, in 32->32" in conv.note and "criterion l2" in conv.note
    assert rows["features.2.bn"].params_after == 4 * 32
    skipped = {(s.name, s.op): s.reason for s in report.skipped}
    assert "grouped Conv (group=4)" in skipped[("features.1.conv", "Conv")]
    assert "graph output" in skipped[("logits", "graph output")]
    groups = {g["id"]: g for g in report.details["groups"]}
    assert (groups["features.2.conv"]["channels_before"], groups["features.2.conv"]["channels_after"]) == (64, 32)
    assert {p["group"] for p in report.details["pinned_groups"]} == {"features.0.conv", "features.1.conv", "fc"}
    json.dumps(report.to_dict())  # JSON-able


# ---------------------------------------------------------------- options


def test_multiple_rounds_kept_counts_up():
    model = prepared(zoo.build("mobilenetv2"))
    pruned, _ = prune(model, ratio=0.3, multiple=8)
    channels = out_channels(pruned)
    for g in prunable_groups(model):
        want = min(g.size, math.ceil(expected_kept(g.size, 0.3) / 8) * 8)
        for p in g.producers:
            assert channels[p.name] == want and (want % 8 == 0 or want == g.size)


def test_default_multiple_is_8():
    """Without the option, kept counts are rounded up to a multiple of 8 (what the kernels want)."""
    model = prepared(zoo.build("mobilenetv2"))
    result = run_passes(model, ["prune"], {"prune": {"ratio": 0.3}})
    channels = out_channels(result.model)
    groups = prunable_groups(model)
    assert any(expected_kept(g.size, 0.3) % 8 for g in groups), "the case must need rounding"
    for g in groups:
        want = min(g.size, math.ceil(expected_kept(g.size, 0.3) / 8) * 8)
        for p in g.producers:
            assert channels[p.name] == want


def test_skip_and_layer_overrides():
    model = prepared(zoo.build("resnet"))
    pruned, report = prune(model, ratio=0.25, skip=["layer2.0.conv1"], layer=["layer1.0.conv1=0.5"])
    channels = out_channels(pruned)
    assert channels["layer2.0.conv1"] == 32
    assert channels["layer1.0.conv1"] == 8
    assert channels["layer2.1.conv1"] == 24
    assert channels["stem.conv"] == channels["layer1.0.conv2"] == 12  # one residual group
    assert any(s.name == "layer2.0.conv1" and "skipped by the skip option" in s.reason for s in report.skipped)


def test_min_channels_floor():
    model = prepared(zoo.build("resnet"))
    pruned, _ = prune(model, ratio=0.9, min_channels=8)
    channels = out_channels(pruned)
    assert channels["layer1.0.conv1"] == 8  # 16 - 14 = 2, raised to 8
    assert channels["layer2.0.conv1"] == 8  # 32 - 29 = 3, raised to 8


def test_option_parsing_and_errors():
    model = prepared(zoo.build("resnet"))
    assert resolve_options("prune", {"ratio": "auto"})["ratio"] == "auto"
    assert resolve_options("prune", {"layer": {"layer1.0.conv1": 0.5}})["layer"] == (("layer1.0.conv1", 0.5),)
    with pytest.raises(UsageError, match="auto"):
        prune(model, ratio="auto")
    with pytest.raises(UsageError, match="option 'layer' of pass 'prune': no weighted layer or channel group named 'nope'"):
        prune(model, layer=["nope=0.5"])
    with pytest.raises(UsageError, match="share one channel group"):
        prune(model, layer=["stem.conv=0.5", "layer1.0.conv2=0.25"])
    with pytest.raises(UsageError, match="calibration"):
        prune(model, criterion="activation")
    with pytest.raises(UsageError):
        resolve_options("prune", {"multiple": 0})


# ---------------------------------------------------------------- criteria


def _two_conv_model(w1: np.ndarray) -> onnx.ModelProto:
    cout, cin = w1.shape[:2]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="c1", kernel_shape=[1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="c2", kernel_shape=[1, 1])]
    inits = [numpy_helper.from_array(w1.astype(np.float32), "w1"),
             numpy_helper.from_array(np.ones((2, cout, 1, 1), np.float32), "w2")]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4, 4])], inits)
    return infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def _kept_of(model, state_key, **options):
    state = KeptChannels()
    prune(model, state, **options)
    return state.by_tensor[state_key].tolist()


def test_l1_and_l2_rank_differently():
    w = np.zeros((4, 4, 1, 1))
    w[0, :, 0, 0] = 1.0  # l1 4, l2 2
    w[1, 0, 0, 0] = 3.0  # l1 3, l2 3
    w[2, :, 0, 0] = 2.0  # l1 8, l2 4
    w[3, :2, 0, 0] = 2.5  # l1 5, l2 3.54
    model = _two_conv_model(w)
    assert _kept_of(model, "h", ratio=0.25, criterion="l1") == [0, 2, 3]
    assert _kept_of(model, "h", ratio=0.25, criterion="l2") == [1, 2, 3]


def test_bn_criterion_keeps_largest_gamma():
    model = prepared(zoo.build("plain"))
    gamma = np.abs(numpy_helper.to_array(next(i for i in model.graph.initializer
                                              if i.name == "features.1.bn.weight")))
    kept = _kept_of(model, "features.1.conv.output", ratio=0.5, criterion="bn")
    assert kept == sorted(np.argsort(-gamma, kind="stable")[:16].tolist())
    assert kept != _kept_of(model, "features.1.conv.output", ratio=0.5, criterion="l1")


def test_activation_criterion_keeps_largest_mean_activation():
    model = prepared(zoo.build("plain", folded=True))
    feeds = zoo.random_input(model, batch=4, seed=3)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_empty_tensor_value_info("features.2.bn.output"))
    act = zoo.run(probe, feeds)[1]
    score = np.abs(act).mean(axis=(0, 2, 3))
    state = KeptChannels()
    prune(model, state, calibration=[feeds], ratio=0.5, criterion="activation")
    assert state.by_tensor["features.2.bn.output"].tolist() == sorted(np.argsort(-score)[:16].tolist())


# ---------------------------------------------------------------- constant (non-zero) channels


def _constant_channel_model(consumer_kernel: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    w1[2] = 0.0  # channel 2 outputs relu(0.7) everywhere
    b1 = np.array([0.1, -0.2, 0.7, 0.3], np.float32)
    k, pad = consumer_kernel, consumer_kernel // 2
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="c1", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="c2", kernel_shape=[k, k], pads=[pad] * 4)]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
             numpy_helper.from_array(rng.normal(size=(2, 4, k, k)).astype(np.float32), "w2")]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 8, 8])], inits)
    return infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def test_nonzero_constant_channel_folded_into_unpadded_consumer_bias():
    model = _constant_channel_model(1)
    pruned, report = prune(model, ratio=0.0)
    assert report.details["dead_channels_removed"] == 1
    assert out_channels(pruned)["c1"] == 3
    assert out_channels(prune(model, ratio=0.0, dead=False)[0])["c1"] == 4
    feeds = {"x": np.random.default_rng(2).normal(size=(2, 3, 8, 8)).astype(np.float32)}
    assert_close(zoo.run(model, feeds)[0], zoo.run(pruned, feeds)[0])


def test_nonzero_constant_channel_not_folded_through_padding():
    model = _constant_channel_model(3)
    pruned, report = prune(model, ratio=0.0)
    assert report.details["dead_channels_removed"] == 0
    assert out_channels(pruned)["c1"] == 4
    pruned, _ = prune(model, ratio=0.25)  # still first in the ranking (l1 = 0)
    state = KeptChannels()
    prune(model, state, ratio=0.25)
    assert state.by_tensor["h"].tolist() == [0, 1, 3]


def test_prune_graph_api_takes_group_ratios():
    graph = to_graph(prepared(zoo.build("inception")))
    result = prune_graph(graph, {"mixed.branch3x3_2.conv": 0.5, "stem.conv": 0.25}, PruneSettings(multiple=1))
    assert len(result.kept["mixed.branch3x3_2.conv"]) == 12 and len(result.kept["stem.conv"]) == 24
    assert {g.id for g in result.groups} == {"mixed.branch3x3_2.conv", "stem.conv"}
    with pytest.raises(UsageError, match="no channel group"):
        prune_graph(graph, {"missing": 0.5})


# ---------------------------------------------------------------- channel-padding residuals (BlazeFace)


def _assert_all_close(ref: list[np.ndarray], out: list[np.ndarray]) -> None:
    assert [o.shape for o in out] == [r.shape for r in ref]
    for r, o in zip(ref, out):
        assert_close(r, o)


def _initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


def test_blazeface_groups_cross_padded_shortcuts():
    analysis = analyze(to_graph(prepared(zoo.build_blazeface())))
    prunable = {g.id: g.size for g in analysis.groups if g.pinned is None}
    # the stem's 8 channels run through every residual; each widening adds a group of its own channels
    assert prunable == {"stem": 8, "block1.pw": 4, "block2.pw": 4, "block3.pw": 4, "block4.pw": 2,
                        "block4.pw#1": 2}
    assert {g.id for g in analysis.groups_of_node("block4.pw")} == set(prunable)


def test_blazeface_dead_channels_removed_exactly():
    """Dead channels of every group (the stem's, carried on every shortcut, and each block's extra channels,
    added to zeros) are removed with outputs unchanged: the Concat zeros, the ConstantOfShape and the Pad
    amounts shrink with the conv branch."""
    model = prepared(zoo.build_blazeface())
    rng = np.random.default_rng(3)
    chosen = {g.id: np.sort(rng.choice(g.size, size=math.floor(0.5 * g.size + 0.5), replace=False))
              for g in prunable_groups(model)}
    dead = prepared(zero_channels(model, chosen))
    state = KeptChannels()
    pruned, report = prune(dead, state, ratio=0.5)
    feeds = zoo.random_input(dead, seed=4)
    _assert_all_close(zoo.run(dead, feeds), zoo.run(pruned, feeds))
    assert report.details["dead_channels_removed"] == sum(len(c) for c in chosen.values()) == 12
    assert report.totals["params_after"] < 0.5 * report.totals["params_before"]

    kept = {gid: np.setdiff1d(np.arange(len(c) * 2), c) for gid, c in chosen.items()}
    # block1: [shortcut 8 = stem | zeros 4 = block1.pw's own]: the ConstantOfShape shrinks to the kept zeros
    assert _initializer(pruned, "block1.fill.shape").tolist() == [1, 2, 8, 8]
    # block3: Concat(zeros 4, shortcut 16): the zero initializer keeps block3.pw's kept channels
    assert _initializer(pruned, "block3.zeros").shape == (1, 2, 8, 8)
    # block4: Pad 2 zeros before and 2 after the 20 channels: pads follow the kept channels on each side
    pads = _initializer(pruned, "block4.pad.pads").tolist()
    assert pads[1] == pads[5] == 1
    assert state.by_tensor["block4.pad.output"].tolist() == (
        kept["block4.pw"].tolist() + [2 + i for i in state.by_tensor["block3.relu.output"]] +
        [22 + i for i in kept["block4.pw#1"]])


@pytest.mark.parametrize("ratio", [0.3, 0.9])
def test_blazeface_live_pruning_is_valid(ratio):
    model = prepared(zoo.build_blazeface())
    state = KeptChannels()
    pruned, report = prune(model, state, ratio=ratio)
    onnx.checker.check_model(pruned, full_check=True)
    onnx.shape_inference.infer_shapes(pruned, check_type=True, strict_mode=True, data_prop=True)
    assert signature(pruned) == signature(model)
    feeds = zoo.random_input(model)
    ref, out = zoo.run(model, feeds), zoo.run(pruned, feeds)
    assert [o.shape for o in out] == [r.shape for r in ref] and all(np.isfinite(o).all() for o in out)
    params, macs = independent_counts(pruned)
    params0, _ = independent_counts(model)
    assert params < params0
    channels = out_channels(pruned)
    sizes = {"stem": 8, "block1.pw": 4, "block2.pw": 4, "block3.pw": 4, "block4.pw": 2, "block4.pw#1": 2}
    kept = {gid: expected_kept(size, ratio) for gid, size in sizes.items()}
    assert channels["stem"] == kept["stem"]
    assert channels["block5.pw"] == sum(kept.values())
    assert _initializer(pruned, "block1.fill.shape").tolist() == [1, kept["block1.pw"], 8, 8]
    assert _initializer(pruned, "block2.pad.pads").tolist() == [0, 0, 0, 0, 0, kept["block2.pw"], 0, 0]
    assert len(state.by_tensor["block5.relu.output"]) == sum(kept.values())


def test_multiple_not_applied_where_rounding_aligns_nothing():
    """BlazeFace's padded shortcuts: tensors are [stem 8 | zeros 4] + a block conv's channels, the extra
    channels a group owning no tensor of its own, so rounding would align no tensor: those groups are pruned
    at the ratio and the report says why. ResNet's residual groups and Inception's Concat branches (each
    owns its conv's output, the Concat is made of rounded branches) are still rounded."""
    model = prepared(zoo.build_blazeface())
    result = run_passes(model, ["prune"], {"prune": {"ratio": 0.3, "multiple": 8}})
    channels = out_channels(result.model)
    assert channels["stem"] == expected_kept(8, 0.3) < 8
    groups = {g["id"]: g for g in result.reports[0].details["groups"]}
    assert groups["stem"]["unrounded"] and groups["stem"]["channels_after"] == expected_kept(8, 0.3)
    assert any("count not rounded to the multiple" in c.note for c in result.reports[0].layers
               if c.name == "stem")
    for name in ("resnet", "inception"):  # residual groups; Concat branches (each owns its conv's output)
        model = prepared(zoo.build(name))
        result = run_passes(model, ["prune"], {"prune": {"ratio": 0.3, "multiple": 8}})
        assert all(g["unrounded"] is None for g in result.reports[0].details["groups"]), name
        channels = out_channels(result.model)
        for g in prunable_groups(model):
            for p in g.producers:
                assert channels[p.name] == min(g.size, math.ceil(expected_kept(g.size, 0.3) / 8) * 8), p.name


@pytest.mark.parametrize("criterion", ["activation", "energy"])
def test_blazeface_data_criteria(criterion):
    model = prepared(zoo.build_blazeface())
    feeds = [zoo.random_input(model, seed=s) for s in range(3)]
    pruned, report = prune(model, calibration=feeds, ratio=0.5, criterion=criterion)
    assert {g["criterion"] for g in report.details["groups"]} == {criterion}
    out = zoo.run(pruned, feeds[0])
    assert [o.shape for o in out] == [r.shape for r in zoo.run(model, feeds[0])]


def test_blazeface_skip_leaves_a_split_layer_whole():
    model = prepared(zoo.build_blazeface())
    pruned, report = prune(model, ratio=0.5, skip=["block4.pw"])  # its 24 channels hold six groups
    channels = out_channels(pruned)
    assert channels["block4.pw"] == channels["block5.pw"] == 24 and channels["stem"] == 8
    assert report.layers == []


def _pad_attribute_model() -> onnx.ModelProto:
    """Opset 10 (Pad's pads an attribute): conv a (4) -> Pad 2 zero channels before, 2 after -> + conv b (8)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="a", kernel_shape=[1, 1]),
             helper.make_node("Relu", ["a"], ["ra"], name="ra"),
             helper.make_node("Pad", ["ra"], ["p"], name="pad", pads=[0, 2, 0, 0, 0, 2, 0, 0]),
             helper.make_node("Conv", ["ra", "wb", "bb"], ["b"], name="b", kernel_shape=[1, 1]),
             helper.make_node("Add", ["p", "b"], ["s"], name="add"),
             helper.make_node("Conv", ["s", "wh"], ["y"], name="head", kernel_shape=[1, 1])]
    wa, wb = rng.normal(size=(4, 3, 1, 1)), rng.normal(size=(8, 4, 1, 1))
    wa[1], wb[[0, 3, 7]] = 0, 0  # dead: a's channel 1 (b's channel 3), the first padded one, the last
    ba, bb = rng.normal(size=4), rng.normal(size=8)
    ba[1], bb[[0, 3, 7]] = 0, 0
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in
             (("wa", wa), ("ba", ba), ("wb", wb), ("bb", bb), ("wh", rng.normal(size=(2, 8, 1, 1))))]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4, 4])], inits)
    return infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)], ir_version=5))


def test_channel_pad_attribute_shrinks_exactly():
    model = _pad_attribute_model()
    state = KeptChannels()
    pruned, report = prune(model, state, ratio=0.0)
    assert report.details["dead_channels_removed"] == 3
    pad = next(n for n in pruned.graph.node if n.op_type == "Pad")
    assert list(next(a for a in pad.attribute if a.name == "pads").ints) == [0, 1, 0, 0, 0, 1, 0, 0]
    assert state.by_tensor["s"].tolist() == [1, 2, 4, 5, 6]
    feeds = {"x": np.random.default_rng(1).normal(size=(2, 3, 4, 4)).astype(np.float32)}
    assert_close(zoo.run(model, feeds)[0], zoo.run(pruned, feeds)[0])


# ---------------------------------------------------------------- real models


def _run_real(path, input_shapes=None, ratio=0.3):
    model = load_model(path, input_shapes)
    pruned, report = prune(model, ratio=ratio)
    feeds = zoo.random_input(model, batch=1)
    ref, out = zoo.run(model, feeds)[0], zoo.run(pruned, feeds)[0]
    assert out.shape == ref.shape and np.isfinite(out).all()
    return model, pruned, report


def test_real_resnet20(shared_dir):
    for name in ("resnet20_fashion_mnist.onnx", "resnet20_fashion_mnist_folded.onnx"):
        _, pruned, report = _run_real(shared_dir / name)
        assert 0.45 < report.totals["params_after"] / report.totals["params_before"] < 0.55


def test_real_ppocr_cls(shared_dir):
    _, _, report = _run_real(shared_dir / "ppocr_mobile_v2_cls.onnx", {"x": ["N", 3, 48, 192]})
    assert report.totals["params_after"] < 0.7 * report.totals["params_before"]
    reasons = {(s.name, s.reason.split(": ", 1)[1]) for s in report.skipped}
    assert ("Reshape@18", "Reshape with a computed shape") in reasons


def test_real_pplcnet(shared_dir):
    _, _, report = _run_real(shared_dir / "pplcnet_text_orientation.onnx")
    assert report.totals["params_after"] < 0.7 * report.totals["params_before"]
    ops = {s.op for s in report.skipped}
    assert {"Shape", "Reshape", "Softmax"} <= ops


def test_real_blazeface_prunes_through_padded_shortcuts(shared_dir):
    """At the default options (kept counts rounded to 8 where a group owns its tensors)."""
    model = load_model(shared_dir / "blazeface_front_128.onnx")
    result = run_passes(model, ["prune"], {"prune": {"ratio": 0.3}})
    pruned, report = result.model, result.reports[0]
    assert report.totals["params_after"] <= 0.85 * report.totals["params_before"]
    onnx.checker.check_model(pruned, full_check=True)
    assert signature(pruned) == signature(model)
    feeds = {"input:0": np.random.default_rng(0).uniform(-1, 1, size=(1, 128, 128, 3)).astype(np.float32)}
    ref, out = zoo.run(model, feeds), zoo.run(pruned, feeds)
    assert [o.shape for o in out] == [r.shape for r in ref] and all(np.isfinite(o).all() for o in out)
    pinned = {p["group"].rsplit("/", 2)[-2] for p in report.details["pinned_groups"]}
    assert pinned == {"conv2d_17", "conv2d_18", "conv2d_19", "conv2d_20"}  # only the heads (graph outputs)


# ---------------------------------------------------------------- CLI


def test_cli_compress_prunes_file(tmp_model_path, tmp_path):
    from click.testing import CliRunner

    from ocomp.cli import main

    src = tmp_model_path(zoo.build("resnet"))
    dst = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["compress", str(src), "-o", str(dst), "--passes", "prune",
                                       "--prune-ratio", "0.3", "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    totals = json.loads((tmp_path / "r.json").read_text())["passes"][0]["totals"]
    removed_bytes = 4 * (totals["params_before"] - totals["params_after"])
    shrink = src.stat().st_size - dst.stat().st_size
    assert abs(shrink - removed_bytes) < 0.05 * removed_bytes


def test_cli_compare_dead_channels_exact(tmp_model_path, tmp_path, monkeypatch):
    import ocomp.runtime
    from click.testing import CliRunner

    from ocomp.cli import main

    if not hasattr(ocomp.runtime, "session"):  # the custom-op runtime is not built: these models need none
        monkeypatch.setattr(ocomp.runtime, "session", lambda model, **_: make_session(model), raising=False)
    model = prepared(zoo.build("mobilenetv2"))
    chosen = {g.id: np.arange(0, g.size, 2) for g in prunable_groups(model)}
    src = tmp_model_path(zero_channels(model, chosen), "dead.onnx")
    dst = tmp_path / "pruned.onnx"
    runner = CliRunner()
    assert runner.invoke(main, ["compress", str(src), "-o", str(dst), "--passes", "prune",
                                "--prune-ratio", "0.5"]).exit_code == 0
    result = runner.invoke(main, ["compare", str(src), str(dst), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)["outputs"]["logits"]
    assert metrics["max_rel"] < REL_TOL


def test_bn_criterion_without_bn_falls_back_to_l1_and_says_so():
    folded = prepared(zoo.build("plain", folded=True))
    _, report = prune(folded, ratio=0.5, criterion="bn")
    _, l1_report = prune(folded, ratio=0.5, criterion="l1")
    assert report.layers and not [r.note for r in report.layers if "criterion bn" in r.note]
    assert [r for r in report.layers if "criterion l1" in r.note]
    assert [(r.name, r.after) for r in report.layers] == [(r.name, r.after) for r in l1_report.layers]
    kept_bn = _kept_of(folded, "features.1.bn.output", ratio=0.5, criterion="bn")  # the folded conv's output
    assert kept_bn == _kept_of(folded, "features.1.bn.output", ratio=0.5, criterion="l1")
