"""bnrecal: BN statistics and corrected biases checked against independent numpy computations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import zoo
from ocomp.cli import main
from ocomp.data import dataset_from_arrays
from ocomp.errors import UsageError
from ocomp.model import infer_shapes, with_outputs
from ocomp.pipeline import KeptChannels, run_passes
from ocomp.runtime import session
from ocomp.passes.ternary import ternarize_optimal

BN_MODELS = ["plain", "resnet", "mobilenetv2", "inception", "se", "flatten_gemm", "matmul_head"]


def calibration(model: onnx.ModelProto, n: int = 48, seed: int = 1):
    return dataset_from_arrays(model, zoo.random_input(model, batch=n, seed=seed)["input"])


def exposed_values(model: onnx.ModelProto, names: list[str], feeds: dict) -> dict[str, np.ndarray]:
    """Run `model` (custom ops allowed) with `names` as extra outputs; an independent path from bnrecal's."""
    outs = session(with_outputs(model, names)).run(names, feeds)
    return dict(zip(names, outs))


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


@pytest.mark.parametrize("name", BN_MODELS)
def test_bn_statistics_move_by_what_pruning_changed(name: str) -> None:
    """Each BN keeps its own statistics shifted by the change at its input against the original model on the
    same data: mean + (measured - original mean), var x measured / original var."""
    model = infer_shapes(zoo.build(name))
    data = calibration(model)
    state = KeptChannels()
    result = run_passes(model, ["prune", "bnrecal"], {"prune": {"ratio": 0.5}}, calibration=data,
                        kept_channels=state)
    out = result.model
    bns = [n for n in out.graph.node if n.op_type == "BatchNormalization"]
    assert bns
    feeds = {"input": zoo.random_input(model, batch=48, seed=1)["input"]}
    values = exposed_values(out, [bn.input[0] for bn in bns], feeds)
    originals = exposed_values(model, [bn.input[0] for bn in bns], feeds)
    old = {n.output[0]: n for n in model.graph.node if n.op_type == "BatchNormalization"}
    for bn in bns:
        x = values[bn.input[0]].astype(np.float64)
        r = originals[bn.input[0]].astype(np.float64)
        kept = state.get(bn.input[0])
        if kept is not None:
            r = r[:, np.asarray(kept)]
        axes = (0,) + tuple(range(2, x.ndim))
        source = old[bn.output[0]]
        mean0, var0 = initializer(model, source.input[3]), initializer(model, source.input[4])
        if kept is not None:
            mean0, var0 = mean0[np.asarray(kept)], var0[np.asarray(kept)]
        np.testing.assert_allclose(initializer(out, bn.input[3]), mean0 + x.mean(axis=axes) - r.mean(axis=axes),
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(initializer(out, bn.input[4]), var0 * x.var(axis=axes) / r.var(axis=axes),
                                   rtol=1e-3, atol=1e-4)
    assert len(result.reports[1].layers) >= len(bns)


@pytest.mark.parametrize("name", BN_MODELS)
def test_adaptive_bn_without_a_reference_takes_the_measured_statistics(name: str) -> None:
    from ocomp.model import to_graph, to_model
    from ocomp.passes.bnstats import ChannelStats, set_bn
    from ocomp.pipeline import Report

    model = infer_shapes(zoo.build(name))
    graph = to_graph(model)
    bn = next(n for n in graph.nodes if n.op == "BatchNormalization")
    x = np.random.default_rng(0).normal(1.0, 2.0, (64, len(bn.inputs[3].values), 5, 5)).astype(np.float32)
    set_bn(graph, bn, ChannelStats.of([x], 1), Report("bnrecal"))
    out = to_model(graph, model)
    np.testing.assert_allclose(initializer(out, bn.inputs[3].name), x.astype(np.float64).mean(axis=(0, 2, 3)),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(initializer(out, bn.inputs[4].name), x.astype(np.float64).var(axis=(0, 2, 3)),
                               rtol=1e-4, atol=1e-5)


def test_bn_whose_input_did_not_change_keeps_its_statistics() -> None:
    """Nothing upstream changed: the BN's training statistics stay exactly (not re-estimated on the few
    calibration samples)."""
    model = infer_shapes(zoo.build("resnet"))
    result = run_passes(model, ["bnrecal"], calibration=calibration(model))
    before = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in result.model.graph.node:
        if node.op_type == "BatchNormalization":
            for slot in (3, 4):
                after = initializer(result.model, node.input[slot])
                original = before[next(n for n in model.graph.node if n.output[0] == node.output[0]).input[slot]]
                np.testing.assert_allclose(after, original, rtol=1e-5, atol=1e-6)


def perturbed(model: onnx.ModelProto, seed: int = 3) -> onnx.ModelProto:
    """Multiply every conv weight by a random per-output-channel factor in [0.7, 1.3] and shift its bias."""
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = gs.import_onnx(out)
    for node in graph.nodes:
        if node.op == "Conv":
            w = node.inputs[1]
            factor = rng.uniform(0.7, 1.3, size=w.values.shape[0]).astype(np.float32)
            w.values = (w.values * factor.reshape(-1, 1, 1, 1)).astype(np.float32)
            if len(node.inputs) > 2:
                b = node.inputs[2]
                b.values = (b.values + rng.normal(0, 0.1, b.values.shape)).astype(np.float32)
    result = gs.export_onnx(graph)
    result.ir_version = model.ir_version
    return infer_shapes(result)


@pytest.mark.parametrize("name", ["plain", "resnet", "mobilenetv2", "flatten_gemm", "matmul_head"])
@pytest.mark.parametrize("match_std", [False, True])
def test_bias_correction_matches_reference_means(name: str, match_std: bool) -> None:
    reference = infer_shapes(zoo.build(name, folded=True))
    model = perturbed(reference)
    data = calibration(reference)
    result = run_passes(model, ["bnrecal"], {"bnrecal": {"match_std": match_std}}, calibration=data,
                        reference=reference)
    out = result.model
    targets = [n.output[0] for n in out.graph.node if n.op_type in ("Conv", "Gemm")]
    targets += [n.output[0] for n in out.graph.node if n.op_type == "Add" and any(
        p.op_type == "MatMul" and p.output[0] in n.input for p in out.graph.node)]
    feeds = {"input": zoo.random_input(reference, batch=48, seed=1)["input"]}
    got = exposed_values(out, targets, feeds)
    want = exposed_values(reference, targets, feeds)
    before = exposed_values(model, targets, feeds)
    moved = 0
    for name_ in targets:
        g, w, b = (v.astype(np.float64) for v in (got[name_], want[name_], before[name_]))
        axes = (0,) + tuple(range(2, g.ndim))
        scale = max(1.0, float(np.abs(w.mean(axis=axes)).max()))
        np.testing.assert_allclose(g.mean(axis=axes), w.mean(axis=axes), atol=1e-4 * scale, rtol=0)
        if match_std:
            np.testing.assert_allclose(g.std(axis=axes), w.std(axis=axes), rtol=1e-3, atol=1e-5)
        moved += float(np.abs(b.mean(axis=axes) - w.mean(axis=axes)).max()) > 1e-3
    assert moved, "the perturbation should have shifted some means"


def test_bias_correction_after_prune_and_ternary_maps_channels() -> None:
    reference = infer_shapes(zoo.build("resnet", folded=True))
    data = calibration(reference)
    state = KeptChannels()
    result = run_passes(reference, ["prune", "ternary", "bnrecal"], {"prune": {"ratio": 0.25}},
                        calibration=data, reference=reference, kept_channels=state)
    out = result.model
    ternary = [n for n in out.graph.node if n.domain == "ocomp"]
    assert ternary and all(len(n.input) == 4 for n in ternary)
    feeds = {"input": zoo.random_input(reference, batch=48, seed=1)["input"]}
    targets = [n.output[0] for n in ternary]
    got = exposed_values(out, targets, feeds)
    want = exposed_values(reference, targets, feeds)
    checked = 0
    for n in ternary:
        g = got[n.output[0]].astype(np.float64).mean(axis=(0, 2, 3))
        w = want[n.output[0]].astype(np.float64).mean(axis=(0, 2, 3))
        kept = state.get(n.output[0])
        if kept is not None:  # pruned: each kept channel matches its reference channel
            w = w[np.asarray(kept)]
            checked += 1
        np.testing.assert_allclose(g, w, atol=1e-4 * max(1.0, np.abs(w).max()))
    assert checked, "prune at 0.25 should have shrunk some ternarized layers"



def test_std_matching_leaves_a_channel_that_became_constant_unscaled() -> None:
    from ocomp.layers import layer_of
    from ocomp.pipeline import Report
    from ocomp.passes.bnstats import MAX_STD_SCALE, ChannelStats, Target, correct

    graph = gs.import_onnx(infer_shapes(zoo.build("resnet", folded=True)))
    conv = next(n for n in graph.nodes if n.op == "Conv")
    layer = layer_of(conv)
    channels = layer.out_channels
    weight = np.array(layer.weight(), copy=True)
    ref = ChannelStats(100, np.zeros(channels), np.full(channels, 100.0))  # mean 0, std 1 everywhere
    squares = np.full(channels, 100 * 0.25)  # std 0.5: rescaled by 2
    squares[0] = 100 * 1e-16  # std 1e-8: almost constant, a 1e8x rescale would be noise amplification
    current = ChannelStats(100, np.zeros(channels), squares)
    report = Report("bnrecal")
    correct(graph, Target(layer, conv.outputs[0].name, 1, [conv]), current, ref, {}, True, report)
    scaled = layer_of(conv).weight() / np.where(weight == 0, 1, weight)
    per_channel = np.array([np.median(scaled[c][weight[c] != 0]) for c in range(channels)])
    assert per_channel[0] == pytest.approx(1.0) and per_channel[1:] == pytest.approx(2.0)
    assert MAX_STD_SCALE < 1e8
    assert "1 channels off by more than" in report.layers[0].note

@pytest.mark.parametrize("file", ["resnet20_fashion_mnist.onnx", "resnet20_fashion_mnist_folded.onnx"])
def test_bnrecal_recovers_accuracy_after_ternary(shared_dir: Path, file: str) -> None:
    """Default options recover the ternary ResNet-20, with its BNs (adaptive BN) and with
    them folded (bias correction with std matching; mean-only correction measured 9.85%)."""
    model = infer_shapes(onnx.load(shared_dir / file))
    calib = np.load(shared_dir / "fashion_mnist_calib.npz")
    test = np.load(shared_dir / "fashion_mnist_test.npz")
    images = test["images"][:1000].astype(np.float32) / 255.0
    labels = test["labels"][:1000]
    data = dataset_from_arrays(model, calib["images"][:256].astype(np.float32) / 255.0)

    def accuracy(m: onnx.ModelProto) -> float:
        return float((session(m).run(None, {"input": images})[0].argmax(1) == labels).mean())

    plain = run_passes(model, ["ternary"]).model
    recal = run_passes(model, ["ternary", "bnrecal"], calibration=data).model
    assert accuracy(recal) > accuracy(plain) + 0.05
    assert accuracy(recal) > 0.8


def test_bnrecal_needs_calibration(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="needs calibration data"):
        run_passes(infer_shapes(zoo.build("plain")), ["bnrecal"])
    src = tmp_path / "m.onnx"
    onnx.save(zoo.build("plain"), src)
    result = CliRunner().invoke(main, ["compress", str(src), "-o", str(tmp_path / "o.onnx"), "--passes", "bnrecal"])
    assert result.exit_code == 2 and "--calib" in result.output


def test_cli_bnrecal_with_npz(tmp_path: Path) -> None:
    model = zoo.build("resnet")
    src, calib = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(model, src)
    np.savez(calib, input=zoo.random_input(model, batch=32, seed=2)["input"])
    out = tmp_path / "o.onnx"
    result = CliRunner().invoke(main, ["compress", str(src), "-o", str(out), "--passes", "prune,bnrecal",
                                       "--calib", str(calib), "--bnrecal-samples", "16", "--force"])  # (untrained net: the guard would refuse it)
    assert result.exit_code == 0, result.output
    assert "== pass bnrecal" in result.output
    assert ort.InferenceSession(str(out)).run(None, {"input": zoo.random_input(model)["input"]})[0].shape == (2, 10)


def test_activations_spilled_to_disk_beyond_the_memory_budget() -> None:
    reference = infer_shapes(zoo.build("resnet", folded=True))
    model = perturbed(reference)
    data = calibration(reference, n=16)
    whole = run_passes(model, ["bnrecal"], calibration=data, reference=reference)
    chunked = run_passes(model, ["bnrecal"], {"bnrecal": {"memory": 0}}, calibration=data, reference=reference)
    assert whole.reports[0].details["sweep"]["spilled_arrays"] == 0
    assert chunked.reports[0].details["sweep"]["spilled_arrays"] > 0
    assert chunked.reports[0].details["sweep"]["peak_bytes"] == 0  # nothing held in memory
    got = {i.name: numpy_helper.to_array(i) for i in chunked.model.graph.initializer}
    for init in whole.model.graph.initializer:
        np.testing.assert_allclose(got[init.name], numpy_helper.to_array(init), rtol=1e-6, atol=1e-6)



def test_store_spills_whole_arrays_to_files_read_back_by_slices(tmp_path: Path) -> None:
    from ocomp.sweep import DiskArray, Store

    store = Store(budget=1000)
    small = store.allocate("small", (10, 20), np.float32)  # 800 bytes: in memory
    big = store.allocate("big", (7, 3, 5), np.float32)  # would exceed the budget: a file
    assert isinstance(small, np.ndarray) and isinstance(big, DiskArray) and store.spilled == 1
    values = np.random.default_rng(0).normal(size=(7, 3, 5)).astype(np.float32)
    big[0:4] = values[0:4]
    big[4:7] = values[4:7]
    np.testing.assert_array_equal(big[2:6], values[2:6])
    np.testing.assert_array_equal(big[5], values[5])
    np.testing.assert_array_equal(np.asarray(big), values)
    with pytest.raises(TypeError):
        big[::2]
    path = big.path
    store.free("big")
    store.free("small")
    assert store.in_memory == 0 and not Path(path).exists()
    store.close()



def test_sweep_stream_hands_over_every_sample_in_slices_of_bounded_size() -> None:
    from ocomp.sweep import Calibration, Sweep

    model = infer_shapes(zoo.build("resnet", folded=True))
    graph = gs.import_onnx(model)
    graph.toposort()
    names = [n.outputs[0].name for n in graph.nodes if n.op == "Conv"][:3]
    x = zoo.random_input(model, batch=20, seed=3)["input"]
    want = exposed_values(model, names, {"input": x})
    per_sample = sum(want[n][:1].nbytes for n in names)
    with Sweep(graph, Calibration({"input": x}, [(0, 12), (12, 20)])) as sweep:
        slices = list(sweep.stream(names, max_bytes=5 * per_sample))
    assert [len(s[names[0]]) for s in slices] == [1, 5, 5, 1, 5, 3]  # sized by the first; never across batches
    for name in names:
        np.testing.assert_allclose(np.concatenate([s[name] for s in slices]), want[name], rtol=1e-5, atol=1e-5)

# ---------------------------------------------------------------- weight reconstruction (--bnrecal-reconstruct)


def refitted_outputs(result) -> list[str]:
    """Output tensors of the layers bnrecal reconstructed (from its report)."""
    names = set(result.reports[-1].details.get("reconstructed", {}))
    return [n.output[0] for n in result.model.graph.node if n.name in names]


def mse_to_reference(model: onnx.ModelProto, reference: onnx.ModelProto, names: list[str], feeds: dict,
                     kept_channels: dict) -> dict[str, float]:
    got = exposed_values(model, names, feeds)
    want = exposed_values(reference, names, feeds)
    errors = {}
    for name in names:
        w = want[name].astype(np.float64)
        if name in kept_channels:
            w = np.take(w, np.asarray(kept_channels[name]), axis=1)
        errors[name] = float(np.mean((got[name].astype(np.float64) - w) ** 2))
    return errors


@pytest.mark.parametrize("name", ["plain", "resnet", "flatten_gemm"])
@pytest.mark.parametrize("folded", [False, True])
def test_reconstruct_brings_pruned_layers_closer_to_the_original(name: str, folded: bool) -> None:
    reference = infer_shapes(zoo.build(name, folded=folded))
    data = calibration(reference, n=64)
    feeds = {"input": zoo.random_input(reference, batch=64, seed=1)["input"]}  # the calibration data
    runs = {}
    for reconstruct in (False, True):
        state = KeptChannels()
        runs[reconstruct] = (run_passes(reference, ["prune", "bnrecal"], {"prune": {"ratio": 0.5},
                                        "bnrecal": {"reconstruct": reconstruct}},
                                        calibration=data, reference=reference, kept_channels=state), state)
    result, state = runs[True]
    names = refitted_outputs(result)
    assert names, "prune 0.5 should have pruned the input channels of some layers"
    assert not refitted_outputs(runs[False][0])
    kept = state.by_tensor
    with_fit = mse_to_reference(result.model, reference, names, feeds, kept)
    without = mse_to_reference(runs[False][0].model, reference, names, feeds, runs[False][1].by_tensor)
    # the first re-fitted layer sees the same input in both runs: least squares can only be better there
    first = names[0]
    assert with_fit[first] < 0.97 * without[first], (first, with_fit[first], without[first])
    assert sum(with_fit.values()) < sum(without.values())
    # and the network output follows
    logits = result.model.graph.output[0].name
    out_fit = mse_to_reference(result.model, reference, [logits], feeds, {})[logits]
    out_without = mse_to_reference(runs[False][0].model, reference, [logits], feeds, {})[logits]
    assert out_fit < out_without


def test_reconstruct_keeps_outputs_when_the_pruned_inputs_were_dead() -> None:
    """Channels 0..7 of features.0 are dead (zero weights, negative bias, then Relu); prune removes exactly
    those, so the kept weights already fit exactly and the ridge (pulled towards them) must keep them."""
    model = zoo.build("plain", folded=True)
    graph = gs.import_onnx(model)
    conv = next(n for n in graph.nodes if n.name == "features.0.conv")
    conv.inputs[1].values[:8] = 0.0
    conv.inputs[2].values[:8] = -1.0
    reference = gs.export_onnx(graph)
    reference.ir_version = model.ir_version
    reference = infer_shapes(reference)
    data = calibration(reference, n=64)
    state = KeptChannels()
    result = run_passes(reference, ["prune", "bnrecal"],
                        {"prune": {"ratio": 0.0, "layer": ["features.0.conv=0.5"]}, "bnrecal": {"reconstruct": True}},
                        calibration=data, reference=reference, kept_channels=state)
    assert len(state.by_tensor["features.0.relu.output"]) == 8
    assert set(refitted_outputs(result)) == {"features.1.bn.output"}
    fit = result.reports[-1].details["reconstructed"]["features.1.conv"]
    assert fit["error_after"] < 1e-5 and fit["lambda"] > 0  # float32 round-off of the sums
    feeds = {"input": zoo.random_input(reference, batch=64, seed=1)["input"]}
    names = ["features.1.bn.output", "features.3.relu.output", "logits"]
    got, want = exposed_values(result.model, names, feeds), exposed_values(reference, names, feeds)
    for name in names:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-4)


def im2col(x: np.ndarray, weight_shape, strides, pads, dilations) -> np.ndarray:
    """(positions, C*kh*kw) patches of a 2-D Conv input, rows in (batch, oh, ow) order (independent of bnrecal)."""
    _, channels, kh, kw = weight_shape
    top, left, bottom, right = pads
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    span_h, span_w = (kh - 1) * dilations[0] + 1, (kw - 1) * dilations[1] + 1
    windows = np.lib.stride_tricks.sliding_window_view(x, (span_h, span_w), axis=(2, 3))
    windows = windows[:, :, ::strides[0], ::strides[1], ::dilations[0], ::dilations[1]]  # b, c, oh, ow, kh, kw
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(-1, channels * kh * kw)


def test_reconstruct_solves_ternary_alpha_and_bias_exactly() -> None:
    """A reconstructed TernaryConv keeps valid 2-bit codes, and for its new T each channel's alpha and bias are
    the least-squares solution on the calibration data (checked with numpy lstsq on an independent im2col)."""
    from ocomp.passes.ternary import unpack_ternary

    reference = infer_shapes(zoo.build("plain", folded=True))
    data = calibration(reference, n=4)  # 4 x 32 x 32 = 4096 positions: no row subsampling
    feeds = {"input": zoo.random_input(reference, batch=4, seed=1)["input"]}
    plain = run_passes(reference, ["ternary"], {}, reference=reference).model
    result = run_passes(reference, ["ternary", "bnrecal"], {"bnrecal": {"bias": False, "reconstruct": True}},
                        calibration=data, reference=reference)
    fitted = result.reports[-1].details.get("reconstructed", {})
    nodes = [n for n in result.model.graph.node if n.op_type == "TernaryConv"]
    assert nodes and {n.name for n in nodes} <= set(fitted)
    inits = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        shape = tuple(attrs["weight_shape"])
        ternary = unpack_ternary(inits[node.input[1]], shape).reshape(shape[0], -1).astype(np.float64)
        alpha, bias = inits[node.input[2]], inits[node.input[3]]
        x = exposed_values(result.model, [node.input[0]], feeds)[node.input[0]]
        y = exposed_values(reference, [node.output[0]], feeds)[node.output[0]].astype(np.float64)
        cols = im2col(x, shape, attrs["strides"], attrs["pads"], attrs["dilations"])
        targets = y.transpose(0, 2, 3, 1).reshape(-1, shape[0])
        for o in range(shape[0]):
            design = np.stack([cols @ ternary[o], np.ones(len(cols))], axis=1)
            (a, b), *_ = np.linalg.lstsq(design, targets[:, o], rcond=None)
            np.testing.assert_allclose([alpha[o], bias[o]], [a, b], rtol=1e-3, atol=1e-5 * np.abs(targets).max())
        # and the layer is closer to the original than plain ternarization
        before = exposed_values(plain, [node.output[0]], feeds)[node.output[0]]
        after = exposed_values(result.model, [node.output[0]], feeds)[node.output[0]]
        assert np.mean((after - y) ** 2) < np.mean((before - y) ** 2)
        assert fitted[node.name]["error_after"] < fitted[node.name]["error_before"]


def test_reconstruct_fits_depthwise_skips_other_grouped_convs_and_reports_big_layers(monkeypatch) -> None:
    """Pruned depthwise convs are re-fitted (one system a channel); a grouped conv that is not depthwise is not."""
    from ocomp.passes import reconstruct

    model = infer_shapes(zoo.build("mobilenetv2", folded=True))
    result = run_passes(model, ["prune", "bnrecal"], {"prune": {"ratio": 0.5}, "bnrecal": {"reconstruct": True}},
                        calibration=calibration(model, n=32), reference=model)
    depthwise = {n.name for n in result.model.graph.node if n.op_type == "Conv" and any(
        a.name == "group" and a.i > 1 for a in n.attribute)}
    fitted = result.reports[-1].details.get("reconstructed", {})
    assert depthwise and depthwise <= set(fitted) and set(fitted) - depthwise
    assert all(fitted[name]["error_after"] <= fitted[name]["error_before"] for name in depthwise)
    grouped = infer_shapes(zoo.build("grouped", folded=True))
    result = run_passes(grouped, ["ternary", "bnrecal"], {"ternary": {"min_params": 0}},
                        calibration=calibration(grouped, n=32), reference=grouped)
    assert "features.1.conv" not in result.reports[-1].details.get("reconstructed", {})
    assert any("grouped Conv (not depthwise)" in str(s) for s in result.reports[-1].skipped)
    monkeypatch.setattr(reconstruct, "MAX_FEATURES", 2)
    result = run_passes(model, ["prune", "bnrecal"], {"prune": {"ratio": 0.5}, "bnrecal": {"reconstruct": True}},
                        calibration=calibration(model, n=32), reference=model)
    assert not result.reports[-1].details.get("reconstructed")
    assert any("more than 2" in str(s) for s in result.reports[-1].skipped)


def test_reconstruct_solves_depthwise_ternary_alpha_and_bias_per_channel() -> None:
    """A depthwise TernaryConv is re-fitted channel by channel: valid codes, and for its new T each channel's alpha
    and bias are the least-squares solution on that channel's own inputs (numpy lstsq on an independent im2col);
    its error on the calibration data falls."""
    from ocomp.passes.ternary import unpack_ternary

    reference = infer_shapes(zoo.build("mobilenetv2", folded=True))
    data = calibration(reference, n=4)
    feeds = {"input": zoo.random_input(reference, batch=4, seed=1)["input"]}
    result = run_passes(reference, ["ternary", "bnrecal"], {"ternary": {"min_params": 0},
                                                            "bnrecal": {"bias": False}},
                        calibration=data, reference=reference)
    fitted = result.reports[-1].details.get("reconstructed", {})
    inits = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    checked = 0
    for node in result.model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "TernaryConv" or attrs.get("group", 1) == 1:
            continue
        assert fitted[node.name]["depthwise"] and fitted[node.name]["error_after"] < fitted[node.name]["error_before"]
        shape = tuple(attrs["weight_shape"])
        ternary = unpack_ternary(inits[node.input[1]], shape).reshape(shape[0], -1).astype(np.float64)
        alpha, bias = inits[node.input[2]], inits[node.input[3]]
        x = exposed_values(result.model, [node.input[0]], feeds)[node.input[0]]
        y = exposed_values(reference, [node.output[0]], feeds)[node.output[0]].astype(np.float64)
        positions = x.shape[0] * y.shape[2] * y.shape[3]
        assert positions <= 4096  # no row subsampling: the check sees the same rows
        for c in range(shape[0]):
            cols = im2col(x[:, c:c + 1], (1, 1, *shape[2:]), attrs["strides"], attrs["pads"], attrs["dilations"])
            design = np.stack([cols @ ternary[c], np.ones(len(cols))], axis=1)
            (a, b), *_ = np.linalg.lstsq(design, y[:, c].reshape(-1), rcond=None)
            np.testing.assert_allclose([alpha[c], bias[c]], [a, b], rtol=1e-3, atol=1e-5 * np.abs(y).max())
        checked += 1
    assert checked


def test_reconstruct_off_changes_no_weights() -> None:
    reference = infer_shapes(zoo.build("resnet", folded=True))
    data = calibration(reference, n=16)
    options = {"prune": {"ratio": 0.5, "criterion": "l1"}, "bnrecal": {"reconstruct": False, "bias": False}}
    pruned = run_passes(reference, ["prune"], {"prune": {"ratio": 0.5}}).model
    result = run_passes(reference, ["prune", "bnrecal"], options, calibration=data, reference=reference)
    assert not result.reports[-1].details.get("reconstructed")
    want = {i.name: numpy_helper.to_array(i) for i in pruned.graph.initializer}
    got = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_reconstruct_recovers_pruned_resnet20(shared_dir: Path) -> None:
    model = infer_shapes(onnx.load(shared_dir / "resnet20_fashion_mnist.onnx"))
    calib = np.load(shared_dir / "fashion_mnist_calib.npz")
    test = np.load(shared_dir / "fashion_mnist_test.npz")
    images = test["images"][:1000].astype(np.float32) / 255.0
    labels = test["labels"][:1000]
    data = dataset_from_arrays(model, calib["images"][:64].astype(np.float32) / 255.0)

    def accuracy(reconstruct: bool) -> float:
        options = {"prune": {"ratio": 0.3, "criterion": "l1", "multiple": 1}, "bnrecal": {"reconstruct": reconstruct}}
        out = run_passes(model, ["prune", "bnrecal"], options, calibration=data, reference=model).model
        return float((session(out).run(None, {"input": images})[0].argmax(1) == labels).mean())

    without, with_fit = accuracy(False), accuracy(True)
    assert with_fit > without + 0.1, (without, with_fit)
    assert with_fit > 0.85


def test_cli_reconstruct_flag(tmp_path: Path) -> None:
    model = zoo.build("resnet")
    src, calib = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(model, src)
    np.savez(calib, input=zoo.random_input(model, batch=32, seed=2)["input"])
    result = CliRunner().invoke(main, ["compress", str(src), "-o", str(tmp_path / "o.onnx"), "--passes",
                                       "prune,bnrecal", "--calib", str(calib), "--bnrecal-reconstruct", "--force"])
    assert result.exit_code == 0, result.output
    assert "reconstructed on" in result.output


# ---------------------------------------------------------------- the sweep against per-layer full runs


@pytest.mark.parametrize("name", ["plain", "resnet", "flatten_gemm"])
def test_one_sweep_equals_running_the_whole_model_for_every_layer(name: str) -> None:
    """The calibration sweep runs each node once; the algorithm before it ran the whole current model again
    for every layer. With the same maths both give the same fits (BN-folded models, bias correction off, so
    only reconstruction changes weights)."""
    from ocomp.model import to_graph, to_model
    from ocomp.passes.reconstruct import Equations, fits
    from ocomp.pipeline import Report

    reference = infer_shapes(zoo.build(name, folded=True))
    kept = KeptChannels()
    pruned = run_passes(reference, ["prune"], {"prune": {"ratio": 0.5}}, kept_channels=kept).model
    x = zoo.random_input(reference, batch=40, seed=4)["input"]
    data = dataset_from_arrays(reference, x)
    swept = run_passes(pruned, ["bnrecal"], {"bnrecal": {"bias": False}}, calibration=data, reference=reference,
                       kept_channels=kept).model

    graph = to_graph(pruned)
    report = Report("naive")
    for fit in fits(graph, gs.import_onnx(reference), kept.by_tensor, report):
        current = to_model(graph, pruned)
        equations = Equations()
        for b, start in enumerate(range(0, len(x), 32)):
            feeds = {"input": x[start:start + 32]}
            xs = exposed_values(current, [fit.x], feeds)[fit.x]
            ys = exposed_values(reference, [fit.y], feeds)[fit.y]
            equations.add(*fit.rows(xs, ys, b))
        fit.solve(graph, equations, report)
    naive = to_model(graph, pruned)
    assert report.details.get("reconstructed")
    got = {i.name: numpy_helper.to_array(i) for i in swept.graph.initializer}
    for init in naive.graph.initializer:
        want = numpy_helper.to_array(init)
        np.testing.assert_allclose(got[init.name], want, rtol=1e-3, atol=1e-4 * max(1.0, np.abs(want).max()))


def test_error_feedback_lowers_the_first_ternary_layers_calibration_error() -> None:
    """With --bnrecal-error-feedback (the default) the first re-fitted ternary op (same inputs either way) reaches
    a lower output error on the calibration data than rounding each row (both without descent)."""
    reference = infer_shapes(zoo.build("resnet"))
    data = calibration(reference, n=64)
    errors = {}
    for feedback in (False, True, None):  # None: the default, which is on
        options = {"error_feedback": feedback, "descent": 0} if feedback is not None else {"descent": 0}
        result = run_passes(reference, ["ternary", "bnrecal"], {"ternary": {"min_params": 0}, "bnrecal": options},
                            calibration=data, reference=reference)
        fitted = result.reports[-1].details["reconstructed"]
        first = next(n.name for n in result.model.graph.node if n.name in fitted)
        errors[feedback] = fitted[first]["error_after"]
    assert errors[True] < errors[False], errors
    assert errors[None] == errors[True]


def _row_objective(t: np.ndarray, h: np.ndarray, w: np.ndarray, alpha: np.ndarray | None = None) -> np.ndarray:
    """Per row: ||X (w - alpha t)||^2 with X^T X = h, at the least-squares alpha >= 0 unless one is given."""
    t = t.astype(np.float64)
    tht = np.sum((t @ h) * t, axis=1)
    if alpha is None:
        alpha = np.maximum(np.sum((t @ h) * w, axis=1) / np.maximum(tht, 1e-300), 0)
    e = w - alpha[:, None] * t
    return np.sum((e @ h) * e, axis=1)


def test_descend_codes_lowers_every_rows_output_error_to_a_local_minimum() -> None:
    """Coordinate descent over the codes: no row's output error rises, the total falls below rounding each row
    on correlated inputs, and at the end no single code change at the row's least-squares alpha lowers it."""
    from ocomp.passes.reconstruct import descend_codes

    rng = np.random.default_rng(0)
    features, outputs = 40, 12
    mix = rng.normal(size=(features, features)) * 0.4 + np.eye(features)
    x = rng.normal(size=(2000, features)) @ mix  # correlated inputs: rounding each row is not optimal
    h = x.T @ x
    w = rng.normal(size=(outputs, features))
    start, _ = ternarize_optimal(w)
    codes, sweeps = descend_codes(start, h, w @ h, sweeps=50)
    assert set(np.unique(codes)) <= {-1, 0, 1} and codes.dtype == np.int8
    assert 1 < sweeps < 50  # it stopped because a sweep changed nothing
    before, after = _row_objective(start, h, w), _row_objective(codes, h, w)
    assert np.all(after <= before + 1e-9 * before)
    assert after.sum() < 0.9 * before.sum()
    final = codes.astype(np.float64)
    alpha = np.sum((final @ h) * w, axis=1) / np.sum((final @ h) * final, axis=1)
    for o in range(outputs):
        for j in range(features):
            for level in (-1, 0, 1):
                trial = codes[o:o + 1].copy()
                trial[0, j] = level
                assert _row_objective(trial, h, w[o:o + 1], alpha[o:o + 1])[0] >= after[o] * (1 - 1e-9)
    stopped, one = descend_codes(start, h, w @ h, sweeps=1)
    assert one == 1 and not np.array_equal(stopped, codes)  # `sweeps` bounds the work
    # one H a row (a depthwise conv's channels): the same as descending each row with its own H
    hs = np.stack([h * (1 + o) + np.diag(np.full(features, o)) for o in range(outputs)])
    together, _ = descend_codes(start, hs, np.einsum("on,onm->om", w, hs), sweeps=50)
    for o in range(outputs):
        alone, _ = descend_codes(start[o:o + 1], hs[o], w[o:o + 1] @ hs[o], sweeps=50)
        np.testing.assert_array_equal(together[o:o + 1], alone)


def test_descent_lowers_the_ternary_layers_calibration_error() -> None:
    """With --bnrecal-descent every re-fitted ternary op of the zoo ResNet reaches a lower output error on the
    calibration data than without (same inputs for the first; the report gives the sweeps run)."""
    reference = infer_shapes(zoo.build("resnet"))
    data = calibration(reference, n=64)
    fitted = {}
    for descent in (0, 8, None):  # None: the default, which is descent (8 sweeps) from error feedback
        options = {"descent": descent} if descent is not None else {}
        result = run_passes(reference, ["ternary", "bnrecal"], {"ternary": {"min_params": 0}, "bnrecal": options},
                            calibration=data, reference=reference)
        fitted[descent] = result.reports[-1].details["reconstructed"]
    assert fitted[None] == fitted[8]
    first = next(iter(fitted[0]))
    assert fitted[8][first]["error_after"] < fitted[0][first]["error_after"]
    assert fitted[0][first]["descent_sweeps"] == 0 and 1 <= fitted[8][first]["descent_sweeps"] <= 8
    mean = {d: np.mean([f["error_after"] for f in fitted[d].values()]) for d in fitted}
    assert mean[8] < mean[0]


def dense_head_model(seed: int = 0) -> onnx.ModelProto:
    """A tiny detector: Conv 3x3 + Relu, then two 1x1 output heads reaching the graph outputs through Transpose and
    Reshape only: `scores` (2 logits a position, biased so that ~3% of positions are positive: sparse detection
    logits) and `boxes` (4 regressors a position, about half positive)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.4, (16, 8, 3, 3)).astype(np.float32)
    ws = rng.normal(0, 0.5, (2, 16, 1, 1)).astype(np.float32)
    wb = rng.normal(0, 0.5, (4, 16, 1, 1)).astype(np.float32)
    x = rng.normal(0, 1, (64, 8, 12, 12)).astype(np.float32)
    pad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    relu = np.maximum(sum(np.einsum("nchw,oc->nohw", pad[:, :, i:i + 12, j:j + 12], w1[:, :, i, j])
                          for i in range(3) for j in range(3)), 0)
    pre = np.einsum("nchw,oc->nohw", relu, ws[:, :, 0, 0])
    bs = -np.quantile(pre.transpose(1, 0, 2, 3).reshape(2, -1), 0.97, axis=1).astype(np.float32)
    pre_b = np.einsum("nchw,oc->nohw", relu, wb[:, :, 0, 0])
    bb = -np.median(pre_b.transpose(1, 0, 2, 3).reshape(4, -1), axis=1).astype(np.float32)
    inits = [numpy_helper.from_array(v, n) for n, v in [
        ("w1", w1), ("b1", np.zeros(16, np.float32)), ("ws", ws), ("bs", bs), ("wb", wb), ("bb", bb),
        ("shape_s", np.array([0, -1, 1], np.int64)), ("shape_b", np.array([0, -1, 4], np.int64))]]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "ws", "bs"], ["s"], name="score_head"),
        helper.make_node("Transpose", ["s"], ["st"], name="score_t", perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["st", "shape_s"], ["scores"], name="score_r"),
        helper.make_node("Conv", ["r1", "wb", "bb"], ["b"], name="box_head"),
        helper.make_node("Transpose", ["b"], ["bt"], name="box_t", perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["bt", "shape_b"], ["boxes"], name="box_r"),
    ]
    graph = helper.make_graph(nodes, "dense_heads", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                    ["N", 8, 12, 12])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("boxes", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return infer_shapes(model)


def test_output_heads_are_found_through_shape_ops_only() -> None:
    from ocomp.passes.reconstruct import output_heads

    graph = gs.import_onnx(dense_head_model())
    assert {n.name for n in graph.nodes if id(n) in output_heads(graph)} == {"score_head", "box_head"}
    graph = gs.import_onnx(infer_shapes(zoo.build("tiny_conv")))  # Conv -> Relu -> output: not a head
    assert not output_heads(graph)


def test_dense_head_logits_are_refitted_with_rows_weighted_by_the_original_score() -> None:
    reference = dense_head_model()
    model = onnx.ModelProto()
    model.CopyFrom(reference)
    w1 = next(i for i in model.graph.initializer if i.name == "w1")
    rng = np.random.default_rng(5)
    w = numpy_helper.to_array(w1)
    w1.CopyFrom(numpy_helper.from_array((w * rng.uniform(0.6, 1.4, (16, 1, 1, 1)) + rng.normal(0, 0.15, w.shape))
                                        .astype(np.float32), "w1"))  # a damaged backbone (as after ternary)
    rng_x = np.random.default_rng(11)
    calib = rng_x.normal(0, 1, (96, 8, 12, 12)).astype(np.float32)
    held = rng_x.normal(0, 1, (96, 8, 12, 12)).astype(np.float32)
    results = {on: run_passes(model, ["bnrecal"], {"bnrecal": {"heads": on}}, calibration=
                              dataset_from_arrays(model, calib), reference=reference) for on in (True, False)}
    fitted = results[True].reports[-1].details["reconstructed"]
    assert fitted["score_head"]["head"] and fitted["score_head"]["channels"] == [0, 1]
    assert "box_head" not in fitted  # regressors (half positive) are left to bias correction
    assert not results[False].reports[-1].details.get("reconstructed")
    want = session(reference).run(["scores", "boxes"], {"input": held})
    got = {on: session(r.model).run(["scores", "boxes"], {"input": held}) for on, r in results.items()}
    positive = want[0] > 0  # the rows a decision rests on
    err = {on: float(np.mean((g[0][positive] - want[0][positive]) ** 2)) for on, g in got.items()}
    assert err[True] < 0.5 * err[False], err
    np.testing.assert_array_equal(got[True][1], got[False][1])  # the box head: bias-corrected the same way


def test_a_per_sample_output_head_is_not_refitted() -> None:
    """A classifier (one row a sample) reaching the output directly: every row is a decision; heads on changes
    nothing."""
    reference = infer_shapes(zoo.build("flatten_gemm", folded=True))
    model = perturbed(reference)
    data = calibration(reference, n=16)
    models = [run_passes(model, ["bnrecal"], {"bnrecal": {"heads": on}}, calibration=data,
                         reference=reference).model for on in (True, False)]
    for a, b in zip(models[0].graph.initializer, models[1].graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


def test_a_pruned_dense_head_is_refitted_plainly_then_its_logits_weighted() -> None:
    reference = dense_head_model()
    rng_x = np.random.default_rng(11)
    calib = rng_x.normal(0, 1, (96, 8, 12, 12)).astype(np.float32)
    held = rng_x.normal(0, 1, (96, 8, 12, 12)).astype(np.float32)
    results = {on: run_passes(reference, ["prune", "bnrecal"], {"prune": {"ratio": 0.4, "multiple": 1},
                                                                 "bnrecal": {"heads": on}},
                              calibration=dataset_from_arrays(reference, calib), reference=reference,
                              kept_channels=KeptChannels()) for on in (True, False)}
    fitted = results[True].reports[-1].details["reconstructed"]
    assert fitted["score_head"].get("head") and fitted["score_head"]["channels"] == [0, 1]
    assert "box_head" in fitted and not fitted["box_head"].get("head")  # the plain re-fit only
    assert not results[False].reports[-1].details["reconstructed"]["score_head"].get("head")
    want = session(reference).run(["scores"], {"input": held})[0]
    positive = want > 0
    err = {on: float(np.mean((session(r.model).run(["scores"], {"input": held})[0][positive] - want[positive]) ** 2))
           for on, r in results.items()}
    assert err[True] < 0.7 * err[False], err
