"""--prune-ratio auto: sensitivity scan, Kneedle per group, global MACs budget, parallel scan, CLI."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import zoo
from ocomp.cli import main
from ocomp.data import dataset_from_arrays
from ocomp.errors import UsageError
from ocomp.model import infer_shapes
from ocomp.pipeline import run_passes

# small scans keep the file fast: 32 samples, 4 candidate ratios
FAST = {"auto_samples": 32, "auto_ratios": "0.2,0.4,0.6,0.8"}
MACS_TOL = 1e-9  # kept MACs fractions are ratios of exact integer counts


def conv_macs(model: onnx.ModelProto) -> int:
    """MACs (batch 1) of every Conv/Gemm from the weight and output shapes, independent of ocomp.metrics."""
    model = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(model.graph.value_info) + list(model.graph.output)}
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            w = weights[node.input[1]]
            out = shapes[node.output[0]]
            total += int(np.prod(out[1:])) * int(np.prod(w[1:]))
        elif node.op_type == "Gemm":
            w = weights[node.input[1]]
            total += int(np.prod(w))
    return total


@pytest.fixture(scope="module")
def resnet():
    model = infer_shapes(zoo.build("resnet"))
    calib = dataset_from_arrays(model, zoo.random_input(model, batch=64)["input"])
    return model, calib


@pytest.fixture(scope="module")
def auto_run(resnet):
    model, calib = resnet
    result = run_passes(model, ["prune"], {"prune": dict(FAST, ratio="auto", target_macs=0.6)}, calibration=calib)
    return result


def test_target_macs_met_and_model_runs(resnet, auto_run):
    model, _ = resnet
    pruned = auto_run.model
    kept = conv_macs(pruned) / conv_macs(model)
    assert kept <= 0.6 + MACS_TOL
    assert kept < 1.0 - 0.05  # something was pruned (5% margin)
    feeds = zoo.random_input(pruned, batch=2, seed=3)
    (out,) = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert out.shape == (2, 10) and np.isfinite(out).all()
    budget = auto_run.reports[0].details["auto_budget"]
    assert budget["met"] is True
    assert budget["macs_fraction"] == pytest.approx(kept, abs=MACS_TOL)


def test_details_have_a_curve_per_prunable_group(auto_run):
    from ocomp.model import to_graph
    from ocomp.passes.channels import analyze

    report = auto_run.reports[0]
    auto = report.details["auto"]
    prunable = {g.id for g in analyze(to_graph(infer_shapes(zoo.build("resnet")))).groups if not g.pinned}
    assert set(auto) == prunable and prunable
    for entry in auto.values():
        assert entry["ratios"] == [0.2, 0.4, 0.6, 0.8]
        assert len(entry["quality"]) == 4 and all(-1.0 <= q <= 1.0 + 1e-9 for q in entry["quality"])
        assert entry["knee"] in entry["ratios"]
        assert entry["chosen"] in entry["ratios"] + [0.0]
    # the chosen ratios reach the prune report: per-group results and row notes
    groups = {g["id"]: g["ratio"] for g in report.details["groups"]}
    assert {gid: auto[gid]["chosen"] for gid in auto} == {gid: groups[gid] for gid in auto}
    assert any("auto ratio" in row.note for row in report.layers)


def _kill_half(model: onnx.ModelProto, conv: str, bn: str) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {i.name: i for i in model.graph.initializer}
    node_inputs = {n.name: list(n.input) for n in model.graph.node}
    targets = [node_inputs[conv][1], node_inputs[bn][1], node_inputs[bn][2]]  # weight, gamma, beta
    for name in targets:
        value = numpy_helper.to_array(inits[name]).copy()
        value[: value.shape[0] // 2] = 0
        inits[name].CopyFrom(numpy_helper.from_array(value, name))
    return model


def test_insensitive_group_gets_at_least_a_sensitive_groups_ratio(resnet):
    model, calib = resnet
    dead = infer_shapes(_kill_half(model, "layer2.1.conv1", "layer2.1.bn1"))
    result = run_passes(dead, ["prune"], {"prune": dict(FAST, ratio="auto")}, calibration=calib)
    auto = result.reports[0].details["auto"]
    curve = auto["layer2.1.conv1"]["quality"]
    # the dead half goes first: up to 40% removed the output is unchanged up to bnrecal's effect on other layers
    assert curve[0] == pytest.approx(curve[1], abs=1e-3)
    # the most sensitive other group: lowest quality at the largest ratio
    sensitive = min((g for g in auto if g != "layer2.1.conv1"), key=lambda g: auto[g]["quality"][-1])
    assert auto["layer2.1.conv1"]["chosen"] >= auto[sensitive]["chosen"]
    assert auto["layer2.1.conv1"]["chosen"] >= 0.4


def test_parallel_scan_matches_serial(resnet):
    model, calib = resnet
    opts = dict(FAST, ratio="auto", target_macs=0.3, auto_ratios="0.2,0.5,0.8")
    serial = run_passes(model, ["prune"], {"prune": opts}, calibration=calib).reports[0].details
    parallel = run_passes(model, ["prune"], {"prune": dict(opts, jobs=2)}, calibration=calib).reports[0].details
    assert {g: e["chosen"] for g, e in serial["auto"].items()} == {g: e["chosen"] for g, e in parallel["auto"].items()}
    for g in serial["auto"]:  # same computation in another process: equal up to float32 rounding (1e-5)
        np.testing.assert_allclose(serial["auto"][g]["quality"], parallel["auto"][g]["quality"], atol=1e-5)
    assert serial["auto_budget"]["method"] == parallel["auto_budget"]["method"]


def test_missing_calibration_is_a_usage_error(resnet):
    model, _ = resnet
    with pytest.raises(UsageError, match="needs --calib"):
        run_passes(model, ["prune"], {"prune": {"ratio": "auto"}})


def test_bad_candidate_ratios_rejected(resnet):
    model, calib = resnet
    with pytest.raises((UsageError, ValueError)):
        run_passes(model, ["prune"], {"prune": {"ratio": "auto", "auto_ratios": "0.2,1.5"}}, calibration=calib)


def test_cli(tmp_path, resnet):
    model, _ = resnet
    src, out, calib = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "calib.npz"
    onnx.save(model, src)
    np.savez(calib, input=zoo.random_input(model, batch=32)["input"])
    result = CliRunner().invoke(main, ["compress", str(src), "-o", str(out), "--passes", "prune,bnrecal",
                                       "--prune-ratio", "auto", "--prune-target-macs", "0.5", "--prune-auto-ratios",
                                       "0.2,0.5,0.8", "--calib", str(calib)])
    assert result.exit_code == 0, result.output
    pruned = onnx.load(out)
    assert conv_macs(pruned) / conv_macs(model) <= 0.5 + MACS_TOL
    missing = CliRunner().invoke(main, ["compress", str(src), "-o", str(tmp_path / "x.onnx"), "--passes", "prune",
                                        "--prune-ratio", "auto"])
    assert missing.exit_code == 2 and "--calib" in missing.output
