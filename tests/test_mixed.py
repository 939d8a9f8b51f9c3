"""Issue 12 item 3: mixed precision under a budget (`compress --max-drop` / `--target-size`, ocomp/precision.py).

On small zoo models: the search meets the budget it is given (re-measured here, not read from the report),
the written model holds onnxruntime QDQ int8 layers exactly where the plan says int8 and ocomp ternary ops
where it says ternary, onnxruntime fuses the int8 layers into QLinearConv with ocomp's ops registered, and
bad budgets are one error line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import zoo
from ocomp import api, precision
from ocomp.cli import main
from ocomp.errors import GuardError, UsageError
from ocomp.guard import GuardOptions, measure
from ocomp.data import dataset_from_arrays

CALIB_SAMPLES = 100


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> tuple[Path, Path, Path]:
    """The zoo's plain CNN (4 conv + BN, a Gemm head), its unlabelled calibration data, and labelled data
    whose labels are the original model's own top-1 (so the original scores 100%)."""
    folder = tmp_path_factory.mktemp("mixed")
    model = zoo.build("plain")
    path = folder / "plain.onnx"
    onnx.save(model, str(path))
    feeds = zoo.random_input(model, batch=CALIB_SAMPLES, seed=3)
    calib = folder / "calib.npz"
    np.savez(calib, **feeds)
    labels = zoo.run(model, feeds)[0].argmax(1)
    labelled = folder / "labelled.npz"
    np.savez(labelled, labels=labels, **feeds)
    return path, calib, labelled


ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fashion_cnn.onnx"  # trained: int8 costs it next to nothing, ternary more
EXAMPLE_CALIB = ROOT / "examples" / "fashion_calib.npz"  # 256 labelled images


def _forms(model: onnx.ModelProto) -> dict[str, str]:
    """Layer name -> form, read from the graph: a Conv/Gemm/MatMul whose weight is DequantizeLinear of an int8
    initializer is int8, an ocomp Ternary* node ternary, a Conv/Gemm/MatMul with a float weight float."""
    inits = {i.name: i for i in model.graph.initializer}
    int8_dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
               and inits[n.input[0]].data_type == onnx.TensorProto.INT8}
    forms = {}
    for node in model.graph.node:
        if node.domain == "ocomp" and node.op_type.startswith("Ternary"):
            forms[node.name] = "ternary"
        elif node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1:
            if node.input[1] in int8_dq:
                forms[node.name] = "int8"
            elif node.input[1] in inits and inits[node.input[1]].data_type == onnx.TensorProto.FLOAT:
                forms[node.name] = "float"
    return forms


def _plan(result: api.CompressResult) -> dict[str, str]:
    report = next(r for r in result.reports if r.pass_name == "mixed")
    return {row["name"]: row["form"] for row in report.details["plan"]}


def _drop(original: Path, out: Path, data: Path) -> float:
    """Points lost on `data`, measured here: top-1 accuracy with labels, else top-1 agreement."""
    ref, model = onnx.load(str(original)), onnx.load(str(out))
    arrays = dict(np.load(data))
    labels = arrays.pop("labels", None)
    figures = measure(ref, model, dataset_from_arrays(ref, arrays, labels))
    if "top1" in figures:
        return 100 * (figures["top1"]["original"] - figures["top1"]["compressed"])
    return 100 * (1 - next(iter(figures["outputs"].values()))["agreement"])


@pytest.mark.parametrize("budget", [0.5, 100.0])
def test_max_drop_is_met_and_the_model_holds_the_plan(tmp_path: Path, budget: float) -> None:
    out = tmp_path / "mixed.onnx"
    result = api.compress(EXAMPLE, out, "ternary,bnrecal,foldbn", calib=EXAMPLE_CALIB, max_drop=budget)
    plan = _plan(result)
    assert _drop(EXAMPLE, out, EXAMPLE_CALIB) <= budget + 1e-9
    written = _forms(onnx.load(str(out)))
    assert written == plan, (written, plan)
    assert set(plan.values()) <= {"ternary", "int8", "float"}
    if budget == 100:  # the smallest plan: every layer that can be ternary is
        report = next(r for r in result.reports if r.pass_name == "mixed")
        assert all(plan[row["name"]] == "ternary" for row in report.details["plan"] if row["sensitivity"] is not None)
    assert result.after.file_size < result.before.file_size


def test_tighter_budget_gives_a_larger_model(tmp_path: Path) -> None:
    """Every layer ternary loses more than 0 points on the example, so --max-drop 0 must move layers off
    ternary and gives a larger file than --max-drop 100."""
    loose = api.compress(EXAMPLE, tmp_path / "loose.onnx", "ternary,bnrecal", calib=EXAMPLE_CALIB, max_drop=100)
    tight = api.compress(EXAMPLE, tmp_path / "tight.onnx", "ternary,bnrecal", calib=EXAMPLE_CALIB, max_drop=0)
    loose_plan, tight_plan = _plan(loose), _plan(tight)
    report = next(r for r in loose.reports if r.pass_name == "mixed")
    assert float(report.details["chosen"].rsplit("drop ", 1)[1].split()[0]) > 0
    assert _drop(EXAMPLE, tmp_path / "tight.onnx", EXAMPLE_CALIB) <= 1e-9
    assert sum(f != "ternary" for f in tight_plan.values()) > sum(f != "ternary" for f in loose_plan.values())
    assert tight.after.file_size > loose.after.file_size


def test_int8_layers_run_as_qlinearconv_with_ocomp_ops_registered(tmp_path: Path) -> None:
    """4x smaller lies between the example's smallest plan (~12x) and all-int8 (~3.7x): the most accurate
    plan that fits is a mix of both (measured: 1 ternary, 5 int8; at 5x all-ternary scored best)."""
    from ocomp.session import make_session

    out = tmp_path / "fused.onnx"
    result = api.compress(EXAMPLE, out, "ternary,bnrecal,foldbn", calib=EXAMPLE_CALIB, target_size="4x")
    model = onnx.load(str(out))
    assert {"int8", "ternary"} <= set(_forms(model).values()) and _forms(model) == _plan(result)
    assert out.stat().st_size <= EXAMPLE.stat().st_size / 4
    optimized = tmp_path / "optimized.onnx"
    make_session(model, optimized_model_filepath=str(optimized))
    ops = {n.op_type for n in onnx.load(str(optimized)).graph.node}
    assert "QLinearConv" in ops, ops
    assert any(n.domain == "ocomp" for n in onnx.load(str(optimized)).graph.node)


def test_target_size_fits_and_reports_the_accuracy(plain, tmp_path: Path) -> None:
    path, calib, labelled = plain
    original = path.stat().st_size
    smallest = api.compress(path, tmp_path / "small.onnx", "ternary,bnrecal", calib=calib, max_drop=100)
    target = (smallest.after.file_size + original) // 2
    out = tmp_path / "sized.onnx"
    result = api.compress(path, out, "ternary,bnrecal", calib=calib, target_size=f"{target}B")
    assert out.stat().st_size <= target
    report = next(r for r in result.reports if r.pass_name == "mixed")
    assert "drop" in report.details["chosen"] and report.details["budget"] == f"--target-size {target}B"
    # more room than the smallest plan: the search spends it on int8 layers
    assert out.stat().st_size > smallest.after.file_size
    ratio = api.compress(path, tmp_path / "ratio.onnx", "ternary,bnrecal", calib=calib, target_size="2x")
    assert ratio.after.file_size <= original / 2


def test_unreachable_target_is_refused_unless_forced(plain, tmp_path: Path) -> None:
    path, calib, _ = plain
    out = tmp_path / "never.onnx"
    with pytest.raises(GuardError, match=r"--target-size 1KB .*not reached; the smallest plan .* is [0-9.]+ KB"):
        api.compress(path, out, "ternary,bnrecal", calib=calib, target_size="1KB")
    assert not out.exists()
    forced = api.compress(path, out, "ternary,bnrecal", calib=calib, target_size="1KB", guard=GuardOptions(force=True))
    assert out.exists() and forced.after.file_size > 1000


def test_parse_size_and_budget_errors() -> None:
    assert precision.parse_size("8x", 800) == 100
    assert precision.parse_size("120KB", 1) == 120_000
    assert precision.parse_size("1.5MB", 1) == 1_500_000
    assert precision.parse_size("2KiB", 1) == 2048
    assert precision.parse_size("5000", 1) == 5000
    for bad in ("abc", "0x", "0.5x", "-3KB", "12 parsecs", "", True):
        with pytest.raises(UsageError, match="--target-size"):
            precision.parse_size(bad, 1000)
    with pytest.raises(UsageError, match="not both"):
        precision.Budget(max_drop=1.0, target_size="8x")
    with pytest.raises(UsageError, match=r"--max-drop: expected points in \[0, 100\]"):
        precision.Budget(max_drop=-1.0)
    with pytest.raises(UsageError, match=r"--max-drop"):
        precision.Budget(max_drop=float("nan"))


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_error_line(result, code: int, text: str) -> None:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], result.output
    assert "Traceback" not in result.output


def test_cli_bad_budgets_are_one_line(plain, tmp_path: Path) -> None:
    path, calib, _ = plain
    out = tmp_path / "x.onnx"
    base = ["compress", path, "-o", out, "--no-latency", "-q"]
    _one_error_line(invoke(*base, "--passes", "ternary,bnrecal", "--max-drop", "1"), 2, "--max-drop needs --calib")
    _one_error_line(invoke(*base, "--passes", "ternary,bnrecal", "--calib", calib, "--max-drop", "1",
                           "--target-size", "8x"), 2, "not both")
    _one_error_line(invoke(*base, "--passes", "ternary,bnrecal", "--calib", calib, "--target-size", "lots"), 2,
                    "--target-size: expected a ratio like 8x")
    _one_error_line(invoke(*base, "--passes", "prune,bnrecal", "--calib", calib, "--max-drop", "1"), 2,
                    "the passes must include ternary")
    negative = invoke(*base, "--passes", "ternary,bnrecal", "--calib", calib, "--max-drop", "-1")
    assert negative.exit_code == 2 and "Invalid value for '--max-drop'" in negative.output, negative.output
    _one_error_line(invoke(*base, "--passes", "ternary,bnrecal", "--calib", calib, "--target-size", "1KB"), 3,
                    "not reached")
    assert not out.exists()


def test_cli_prints_the_plan_and_writes_it(plain, tmp_path: Path) -> None:
    path, calib, labelled = plain
    out = tmp_path / "cli.onnx"
    result = invoke("compress", path, "-o", out, "--passes", "ternary,bnrecal,foldbn", "--calib", labelled,
                    "--max-drop", "1", "--no-latency")
    assert result.exit_code == 0, result.output
    assert "== pass mixed" in result.output and "budget: --max-drop 1" in result.output
    assert "ternary sensitivity" in result.output and "chosen:" in result.output
    model = onnx.load(str(out))
    assert set(_forms(model).values()) <= {"ternary", "int8", "float"}
    for init in model.graph.initializer:  # int8 weights are stored as int8, not as float
        if init.name.endswith("_quantized"):
            assert numpy_helper.to_array(init).dtype == np.int8


def test_prune_before_the_mix_is_repaired_before_int8(plain, tmp_path: Path) -> None:
    """prune runs once on the float model and bnrecal repairs it before any layer is made int8 (an int8
    layer cannot be re-fitted afterwards); the plan is then made on the pruned model."""
    path, calib, _ = plain
    out = tmp_path / "pruned.onnx"
    result = api.compress(path, out, "prune,ternary,bnrecal", {"prune": {"ratio": 0.25}}, calib=calib,
                          target_size="3x")
    names = [r.pass_name for r in result.reports]
    assert names == ["mixed", "prune", "bnrecal", "ternary", "bnrecal"], names
    assert out.stat().st_size <= path.stat().st_size / 3
    assert _forms(onnx.load(str(out))) == _plan(result)
    assert result.after.params < result.before.params


def test_layers_go_back_to_float_when_int8_everywhere_is_not_enough(plain, tmp_path: Path) -> None:
    """The zoo's plain CNN has random weights and near-tied classes: int8 everywhere flips some of its
    predictions, so --max-drop 0 must bring layers back to float (most int8-sensitive first)."""
    path, _, labelled = plain
    out = tmp_path / "float.onnx"
    result = api.compress(path, out, "ternary,bnrecal", calib=labelled, max_drop=0)
    plan = _plan(result)
    report = next(r for r in result.reports if r.pass_name == "mixed")
    assert any(t["label"].startswith("all ") and t["label"].endswith(" int8") and t["drop"] > 0
               for t in report.details["tried"]), report.details["tried"]
    assert "float" in plan.values()
    assert any(row["int8_sensitivity"] is not None for row in report.details["plan"])
    assert _drop(path, out, labelled) <= 1e-9
    assert _forms(onnx.load(str(out))) == plan


def test_model_stats_counts_the_int8_layers(tmp_path: Path) -> None:
    """inspect / the summary see a QDQ layer as the layer it is: its params and MACs, int8 at 8 bits."""
    from ocomp.metrics import model_stats
    from ocomp.model import infer_shapes

    out = tmp_path / "all_int8.onnx"
    api.compress(EXAMPLE, out, "ternary,bnrecal,foldbn", calib=EXAMPLE_CALIB, target_size="3x")
    model = infer_shapes(onnx.load(str(out)))
    forms = _forms(model)
    assert "int8" in forms.values()
    before, after = model_stats(infer_shapes(onnx.load(str(EXAMPLE)))), model_stats(model)
    assert after.macs == before.macs  # no layer was pruned: every MAC is still there
    int8 = [la for la in after.layers if forms.get(la.name) == "int8"]
    assert int8 and all(la.weight_dtype == "int8" and la.weight_bits == 8.0 and la.macs > 0 for la in int8)
    assert abs(after.params - before.params) < 0.01 * before.params  # (plus a scale and zero point a tensor)
