"""Issue 12: the accuracy guard of `compress` (ocomp/guard.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from ocomp import guard
from ocomp.cli import main
from ocomp.data import DataOptions, dataset_from_arrays

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fashion_cnn.onnx"
TEST_SET = ROOT / "examples" / "fashion_test.npz"
CALIB_SET = ROOT / "examples" / "fashion_calib.npz"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_destructive_prune_exits_3_writes_nothing_and_force_writes_it(tmp_path: Path) -> None:
    out = tmp_path / "small.onnx"
    args = ["compress", EXAMPLE, "-o", out, "--passes", "prune", "--prune-ratio", "0.9", "--eval", TEST_SET,
            "--limit", "200", "--no-latency", "-q"]
    result = invoke(*args)
    assert result.exit_code == 3, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    line = lines[0]
    assert line.startswith("error: accuracy guard: output 'logits' top-1 agreement "), line
    assert "< 85% (--min-agreement)" in line and "5 pt, --max-top1-drop)" in line
    assert line.endswith("on 200 --eval samples after prune; nothing written (use --force to write anyway)"), line
    agreement = float(line.split("top-1 agreement ")[1].split("%")[0])
    assert agreement < 50
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []

    forced = invoke(*args, "--force", "--report", tmp_path / "r.json")
    assert forced.exit_code == 0, forced.output
    assert out.exists() and onnx.load(out).graph.node
    assert [line for line in forced.stderr.splitlines() if line.strip()] == [
        "warning: " + line[len("error: "):].replace("nothing written (use --force to write anyway)",
                                                    "written anyway (--force)")]
    assert "accuracy guard: FAILED on 200 --eval samples, written anyway (--force)" in forced.stdout
    record = json.loads((tmp_path / "r.json").read_text())["guard"]
    assert record["passed"] is False and record["samples"] == 200
    assert record["outputs"]["logits"]["agreement"] == pytest.approx(agreement / 100, abs=5e-4)
    assert record["top1"]["original"] - record["top1"]["compressed"] > 0.05

    # thresholds are options: the same model passes a guard that asks for nothing
    out.unlink()
    lenient = invoke(*args, "--min-agreement", "0", "--max-top1-drop", "100")
    assert lenient.exit_code == 0 and out.exists()
    assert "accuracy guard: passed on 200 --eval samples ('logits' top-1 agreement" in lenient.stdout


def test_calibration_only_holds_back_a_tail_and_names_the_pass_that_lost_it(tmp_path: Path) -> None:
    out = tmp_path / "small.onnx"
    result = invoke("compress", EXAMPLE, "-o", out, "--passes", "prune,bnrecal", "--prune-ratio", "0.9",
                    "--bnrecal-no-reconstruct", "--calib", CALIB_SET, "--no-latency", "-q")
    assert result.exit_code == 3, result.output
    line = result.stderr.strip()
    # 256 calibration samples: the last 51 (20%) are held back from the passes and measure the result
    assert "on 51 held-back calibration samples after prune (agreement " in line, line
    assert "), bnrecal (agreement " in line and line.endswith("nothing written (use --force to write anyway)")
    assert not out.exists()


def test_a_faithful_result_passes_and_the_guard_is_in_the_report(tmp_path: Path) -> None:
    out, report = tmp_path / "folded.onnx", tmp_path / "r.json"
    result = invoke("compress", EXAMPLE, "-o", out, "--passes", "foldbn", "--calib", CALIB_SET, "--report", report,
                    "--no-latency", "-q")
    assert result.exit_code == 0, result.output
    assert "accuracy guard: passed on 51 held-back calibration samples ('logits' top-1 agreement 100.0%" in result.stdout
    record = json.loads(report.read_text())["guard"]
    assert record["passed"] is True and record["failures"] == [] and record["samples"] == 51
    assert record["outputs"]["logits"]["cosine"] == pytest.approx(1.0, abs=1e-6)


def test_the_api_runs_the_guard_only_when_asked(tmp_path: Path) -> None:
    from ocomp import api
    from ocomp.errors import GuardError

    out = tmp_path / "o.onnx"
    result = api.compress(EXAMPLE, out, "prune", {"prune": {"ratio": 0.9}}, eval_data=TEST_SET,
                          data_options=DataOptions(limit=64))
    assert out.exists() and result.guard is None
    out.unlink()
    with pytest.raises(GuardError, match="accuracy guard: output 'logits' top-1 agreement"):
        api.compress(EXAMPLE, out, "prune", {"prune": {"ratio": 0.9}}, eval_data=TEST_SET,
                     data_options=DataOptions(limit=64), guard=guard.GuardOptions())
    assert not out.exists()


@pytest.mark.parametrize("total,fixed,expected", [(256, None, 51), (1000, None, 200), (5000, None, 256),
                                                  (103, 4, 20), (40, None, 0), (49, None, 0)])
def test_hold_back_sizes(total: int, fixed: int | None, expected: int) -> None:
    model = _maps_model(batch=fixed)
    data = dataset_from_arrays(model, np.zeros((total - total % (fixed or 1), 3, 8, 8), np.float32),
                               labels=np.arange(total - total % (fixed or 1)))
    passes, held, where = guard.hold_back(data)
    if expected == 0:
        assert passes is data and held is data and "too small to hold any back" in where
        return
    assert len(held) == expected and len(passes) + len(held) == len(data) and where.startswith(f"{expected} held")
    np.testing.assert_array_equal(held.labels(), np.arange(len(data) - expected, len(data)))


def _maps_model(scale: float = 1.0, batch: int | None = None, flip: bool = False) -> onnx.ModelProto:
    """A detector-like model: a feature map and a sigmoid score map (no classifier output)."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3
    weight = weight * scale * (-1 if flip else 1)
    nodes = [helper.make_node("Conv", ["input", "w"], ["features"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["features"], ["scores"])]
    dims = [batch or "N", 3, 8, 8]
    graph = helper.make_graph(nodes, "maps", [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch or "N", 4, 8, 8]),
                               helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch or "N", 4, 8, 8])],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_non_classifier_outputs_get_cosine_snr_and_thresholded_map_iou() -> None:
    original = _maps_model()
    x = np.random.default_rng(1).standard_normal((6, 3, 8, 8)).astype(np.float32)
    data = dataset_from_arrays(original, x, options=DataOptions(batch_size=4))
    close = guard.measure(original, _maps_model(scale=1.01), data)
    assert close["samples"] == 6
    features, scores = close["outputs"]["features"], close["outputs"]["scores"]
    assert "agreement" not in features and "map_iou" not in features  # not in [0, 1]: cosine and SNR only
    assert features["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert features["snr_db"] == pytest.approx(40.0, abs=0.1)  # a 1% scale error: 20*log10(1/0.01)
    assert scores["map_iou"] > 0.95 and guard.failures(close, guard.GuardOptions()) == []

    far = guard.measure(original, _maps_model(flip=True), data)
    ref = _run(original, x)
    flipped = _run(_maps_model(flip=True), x)
    a, b = ref[1] >= 0.5, flipped[1] >= 0.5
    assert far["outputs"]["scores"]["map_iou"] == pytest.approx((a & b).sum() / (a | b).sum())
    assert far["outputs"]["features"]["cosine"] == pytest.approx(-1.0, abs=1e-6)
    found = guard.failures(far, guard.GuardOptions())
    assert found[0] == "output 'features' cosine -1.0000 < 0.95 (--min-cosine)"
    assert found[1].startswith("output 'scores' thresholded-map IoU ") and found[1].endswith("< 85% (--min-agreement)")


def test_nan_outputs_fail_the_guard() -> None:
    original = _maps_model()
    broken = _maps_model()
    broken.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.full((4, 3, 3, 3), np.nan, np.float32), "w"))
    data = dataset_from_arrays(original, np.ones((2, 3, 8, 8), np.float32))
    found = guard.failures(guard.measure(original, broken, data), guard.GuardOptions())
    assert found == ["output 'features' has NaN/Inf values", "output 'scores' has NaN/Inf values"]


def test_guard_options_are_checked() -> None:
    with pytest.raises(ValueError, match="min_agreement must be a number in"):
        guard.GuardOptions(min_agreement=85)


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})
