"""--prune-ratio auto: sensitivity scan, Kneedle per group, global MACs budget, parallel scan, plots, CLI."""

from __future__ import annotations

import importlib.util
import sys

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
from ocomp.model import infer_shapes, to_graph
from ocomp.passes import autoprune
from ocomp.passes.bnrecal import recalibrate
from ocomp.passes.autoprune import choose_knee, fit_budget, measure, write_plots
from ocomp.passes.channels import analyze
from ocomp.pipeline import run_passes

# small scans keep the file fast: 32 samples, 4 candidate ratios (+ the unpruned point 0)
FAST = {"auto_samples": 32, "auto_ratios": "0.2,0.4,0.6,0.8"}
MACS_TOL = 1e-9  # kept MACs fractions are ratios of exact integer counts
DEAD = "layer2.1.conv1"  # half of its output channels are made dead (constant zero) in the scanned model


def conv_macs(model: onnx.ModelProto) -> int:
    """MACs (batch 1) of every Conv/Gemm from the weight and output shapes, independent of ocomp.metrics."""
    model = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(model.graph.value_info) + list(model.graph.output)}
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            total += int(np.prod(shapes[node.output[0]][1:])) * int(np.prod(weights[node.input[1]][1:]))
        elif node.op_type == "Gemm":
            total += int(np.prod(weights[node.input[1]]))  # batch 1: K * N
    return total


def kill_half(model: onnx.ModelProto, conv: str, bn: str) -> onnx.ModelProto:
    """Zero the first half of a conv's output channels and of its BatchNorm's gamma/beta: those channels are
    exactly 0 after the BN, so removing them changes nothing (an insensitive group up to a 50% ratio)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {i.name: i for i in model.graph.initializer}
    node_inputs = {n.name: list(n.input) for n in model.graph.node}
    for name in (node_inputs[conv][1], node_inputs[bn][1], node_inputs[bn][2]):
        value = numpy_helper.to_array(inits[name]).copy()
        value[: value.shape[0] // 2] = 0
        inits[name].CopyFrom(numpy_helper.from_array(value, name))
    return infer_shapes(model)


@pytest.fixture(scope="module")
def resnet():
    model = kill_half(infer_shapes(zoo.build("resnet")), DEAD, "layer2.1.bn1")
    calib = dataset_from_arrays(model, zoo.random_input(model, batch=32)["input"])
    # BN statistics of the calibration data, as a trained model has for its own data: bnrecal on the unpruned
    # model is then a no-op and bnrecal's reconstruction of the dead channels' consumer is exact
    model = recalibrate(model, calib, bias=False, reconstruct=False)
    return model, calib


@pytest.fixture(scope="module")
def auto_run(resnet, tmp_path_factory):
    model, calib = resnet
    result = run_passes(model, ["prune"], {"prune": dict(FAST, ratio="auto", target_macs=0.6)}, calibration=calib)
    path = tmp_path_factory.mktemp("auto") / "pruned.onnx"
    onnx.save(result.model, path)
    return result, onnx.load(path)


def test_target_macs_met_and_saved_model_runs(resnet, auto_run):
    model, _ = resnet
    result, saved = auto_run
    kept = conv_macs(saved) / conv_macs(model)
    assert kept <= 0.6 + MACS_TOL
    feeds = zoo.random_input(saved, batch=2, seed=3)
    (out,) = ort.InferenceSession(saved.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert out.shape == (2, 10) and np.isfinite(out).all()
    budget = result.reports[0].details["auto_budget"]
    assert budget["met"] is True and budget["target_macs"] == 0.6
    assert budget["macs_kept"] == pytest.approx(kept, abs=MACS_TOL)  # the budget counts what is saved


def test_details_have_a_curve_and_chosen_ratio_per_prunable_group(resnet, auto_run):
    model, _ = resnet
    report = auto_run[0].reports[0]
    auto = report.details["auto"]
    prunable = {g.id for g in analyze(to_graph(model)).groups if not g.pinned}
    assert set(auto) == prunable and len(prunable) >= 4
    q0 = {entry["quality"][0] for entry in auto.values()}
    assert len(q0) == 1  # ratio 0 is the recalibrated unpruned model, shared by every curve
    for entry in auto.values():
        assert entry["ratios"] == [0.0, 0.2, 0.4, 0.6, 0.8]
        assert len(entry["quality"]) == 5 and all(-1.0 <= q <= 1.0 + 1e-9 for q in entry["quality"])
        assert entry["monotone"] == list(np.minimum.accumulate(entry["quality"]))
        assert entry["knee"] in entry["ratios"] and entry["chosen"] in entry["ratios"]
    # the chosen ratios are what was pruned, and the layer rows say so
    groups = {g["id"]: g["ratio"] for g in report.details["groups"]}
    assert {gid: groups[gid] for gid in auto} == {gid: auto[gid]["chosen"] for gid in auto}
    notes = [row.note for row in report.layers]
    assert any(f"auto ratio {auto[DEAD]['chosen']:g}" in n and f"group {DEAD};" in n for n in notes)
    summary = report.details["auto_summary"]
    assert DEAD in summary and "target <= 0.6" in summary


def test_insensitive_group_gets_the_highest_ratio(auto_run):
    auto = auto_run[0].reports[0].details["auto"]
    curve = auto[DEAD]["quality"]
    # removing up to 40% (13 of 32 channels) only removes dead ones: exact, quality as unpruned (float32: 1e-6)
    np.testing.assert_allclose(curve[1:3], curve[0], atol=1e-6)
    others = [entry for gid, entry in auto.items() if gid != DEAD]
    # at every ratio it is the least sensitive group, and no group is pruned more (bnrecal's reconstruction
    # makes some live groups nearly as insensitive up to 0.4, so a tie at the top is allowed)
    for i in range(1, len(curve)):
        assert curve[i] >= max(entry["quality"][i] for entry in others) - 1e-9
    assert auto[DEAD]["chosen"] >= max(entry["chosen"] for entry in others)
    assert auto[DEAD]["chosen"] >= 0.4


def test_parallel_scan_is_identical_to_serial(resnet, auto_run):
    model, calib = resnet
    serial = auto_run[0].reports[0].details
    parallel = run_passes(model, ["prune"], {"prune": dict(FAST, ratio="auto", target_macs=0.6, jobs=2)},
                          calibration=calib).reports[0].details
    assert parallel["auto_scan"]["jobs"] == 2
    assert {g: e["chosen"] for g, e in parallel["auto"].items()} == {g: e["chosen"] for g, e in serial["auto"].items()}
    for gid, entry in serial["auto"].items():  # one-thread sessions in every process: bitwise equal figures
        assert parallel["auto"][gid]["quality"] == entry["quality"]


def test_usage_errors(resnet):
    model, calib = resnet
    with pytest.raises(UsageError, match="needs calibration data"):
        run_passes(model, ["prune"], {"prune": {"ratio": "auto"}})
    with pytest.raises(UsageError, match="option 'auto_ratios' of pass 'prune': ratios must be fractions"):
        run_passes(model, ["prune"], {"prune": {"ratio": "auto", "auto_ratios": "0.2,1.5"}}, calibration=calib)
    with pytest.raises(UsageError, match="option 'target_macs' of pass 'prune': needs ratio 'auto'"):
        run_passes(model, ["prune"], {"prune": {"ratio": 0.3, "target_macs": 0.5}})
    with pytest.raises(UsageError, match="top1 needs labels"):
        run_passes(model, ["prune"], {"prune": {"ratio": "auto", "auto_metric": "top1"}}, calibration=calib)


def test_plot_without_matplotlib_is_a_usage_error(resnet, monkeypatch):
    model, calib = resnet
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(UsageError, match=r"pip install ocomp\[plot\]"):
        run_passes(model, ["prune"], {"prune": dict(FAST, ratio="auto", plot="plots")}, calibration=calib)


def test_write_plots(auto_run, tmp_path):
    pytest.importorskip("matplotlib")
    details = auto_run[0].reports[0].details
    paths = write_plots(details, tmp_path / "plots")
    assert len(paths) == len(details["auto"]) == len(set(paths))
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli(tmp_path):
    model = infer_shapes(zoo.build("resnet"))
    src, out, calib, report = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "calib.npz", tmp_path / "r.json"
    onnx.save(model, src)
    np.savez(calib, input=zoo.random_input(model, batch=32)["input"])
    plots = tmp_path / "plots"
    plot_args = ["--prune-plot", str(plots)] if importlib.util.find_spec("matplotlib") else []
    result = CliRunner().invoke(main, ["compress", str(src), "-o", str(out), "--passes", "prune,bnrecal",
                                       "--prune-ratio", "auto", "--prune-target-macs", "0.5", "--prune-auto-ratios",
                                       "0.2,0.5,0.8", "--calib", str(calib), "--report", str(report), "--force",
                                       *plot_args])  # --force: a 50% MAC cut of this small net fails the guard
    assert result.exit_code == 0, result.output
    assert conv_macs(onnx.load(out)) / conv_macs(model) <= 0.5 + MACS_TOL
    assert "sensitivity (cosine vs ratio)" in result.output and "target <= 0.5" in result.output
    if plot_args:
        assert len(list(plots.glob("*.png"))) == len(__import__("json").loads(report.read_text())
                                                      ["passes"][0]["details"]["auto"])
    missing = CliRunner().invoke(main, ["compress", str(src), "-o", str(tmp_path / "x.onnx"), "--passes", "prune",
                                        "--prune-ratio", "auto"])
    assert missing.exit_code == 2 and "--calib" in missing.output


# ---------------------------------------------------------------- knee, budget and metric (no scan)


X = [0.0, 0.2, 0.4, 0.6, 0.8]


def test_knee_rules():
    assert choose_knee(X, [1.0, 1.0, 1.0, 1.0, 1.0], 1e-5) == (0.8, "flat")
    assert choose_knee(X, [1.0, 1.0 - 1e-6, 1.0 - 2e-6, 1.0 - 3e-6, 1.0 - 4e-6], 1e-5) == (0.8, "flat")
    # flat until 0.4, then falling off: the knee is the last ratio before the fall
    assert choose_knee(X, [1.0, 0.999, 0.998, 0.8, 0.5], 1e-5) == (0.4, "kneedle")
    # falling straight from the start: no knee above the chord, nothing is pruned
    assert choose_knee(X, [1.0, 0.8, 0.6, 0.4, 0.2], 1e-5) == (0.0, "chord")


class FakeCounter:
    """Kept MACs fraction = mean over groups of (1 - ratio)^2 (like a conv between two pruned groups)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, ratios):
        self.calls += 1
        kept = float(np.mean([(1 - r) ** 2 for r in ratios.values()]))
        return {"macs": kept, "params": kept}


CURVES = {  # monotone qualities; a is insensitive, c very sensitive
    "a": {"ratios": X, "monotone": [1.0, 1.0, 0.99, 0.98, 0.90], "knee": 0.6},
    "b": {"ratios": X, "monotone": [1.0, 0.97, 0.95, 0.80, 0.60], "knee": 0.4},
    "c": {"ratios": X, "monotone": [1.0, 0.90, 0.70, 0.50, 0.30], "knee": 0.2},
}


def test_budget_raises_ratios_along_the_curves():
    counter = FakeCounter()
    knees = counter({g: c["knee"] for g, c in CURVES.items()})["macs"]
    chosen, outcome = fit_budget(CURVES, {"macs": 0.3, "params": None}, counter)
    assert knees > 0.3 and outcome["mode"] == "raise" and outcome["met"]
    assert outcome["macs_kept"] <= 0.3
    assert all(chosen[g] >= CURVES[g]["knee"] for g in CURVES)  # never below the knee when raising
    # the largest threshold that meets the target: every group at its largest ratio with quality >= lambda
    lam = outcome["threshold"]
    for g, c in CURVES.items():
        expected = max(c["knee"], max(r for r, q in zip(X, c["monotone"]) if q >= lam))
        assert chosen[g] == expected
    # one more quality level up would miss the target
    higher = min(q for c in CURVES.values() for q in c["monotone"] if q > lam)
    looser = {g: max(c["knee"], max([0.0] + [r for r, q in zip(X, c["monotone"]) if q >= higher]))
              for g, c in CURVES.items()}
    assert FakeCounter()(looser)["macs"] > 0.3


def test_budget_lowers_ratios_when_under_target_and_reports_a_miss():
    chosen, outcome = fit_budget(CURVES, {"macs": 0.8, "params": None}, FakeCounter())
    assert outcome["mode"] == "lower" and outcome["met"] and outcome["macs_kept"] <= 0.8
    assert all(chosen[g] <= CURVES[g]["knee"] for g in CURVES)
    assert outcome["macs_kept"] > outcome["knee_macs_kept"]  # the slack was used
    chosen, outcome = fit_budget(CURVES, {"macs": 0.01, "params": None}, FakeCounter())
    assert not outcome["met"] and chosen == {"a": 0.8, "b": 0.8, "c": 0.8}
    assert "not reached" in outcome["outcome"]
    chosen, outcome = fit_budget(CURVES, {"macs": None, "params": None}, FakeCounter())
    assert chosen == {g: c["knee"] for g, c in CURVES.items()} and outcome["mode"] == "knees"


def test_metrics():
    base = np.array([[1.0, 2.0, 3.0], [0.0, -1.0, 1.0]], np.float32)
    assert measure("cosine", base, base, None) == pytest.approx(1.0, abs=1e-12)
    assert measure("cosine", -base, base, None) == pytest.approx(-1.0, abs=1e-12)
    noisy = base + np.float32(0.1)
    signal, noise = float((base.astype(np.float64) ** 2).sum()), 6 * 0.1 ** 2
    assert measure("snr", noisy, base, None) == pytest.approx(10 * np.log10(signal / noise), abs=1e-4)
    assert measure("snr", base, base, None) == autoprune.SNR_CAP_DB
    assert measure("top1", base, None, np.array([2, 0])) == 0.5
