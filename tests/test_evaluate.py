"""Evaluation: accuracy and fidelity against independent numpy + onnxruntime computations, CLI and report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import zoo
from ocomp.cli import main
from ocomp.data import DataOptions, dataset_from_arrays
from ocomp.errors import OcompError
from ocomp.evaluate import evaluate, make_session, render_evaluation, render_single
from ocomp.metrics import compare_outputs, model_stats
from ocomp.model import infer_shapes


def plain_run(model: onnx.ModelProto | str, x: np.ndarray, name: str = "input") -> np.ndarray:
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {name: x})[0]


def perturbed(model: onnx.ModelProto, factor: float = 1.3) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    weight = next(i for i in out.graph.initializer if i.name == conv.input[1])
    values = onnx.numpy_helper.to_array(weight) * np.float32(factor)
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    return out


def test_cli_eval_accuracy_on_fashion_mnist_equals_independent_computation(shared_dir: Path) -> None:
    model_path = shared_dir / "resnet20_fashion_mnist.onnx"
    data_path = shared_dir / "fashion_mnist_test.npz"
    result = CliRunner().invoke(main, ["eval", str(model_path), "--data", str(data_path), "--limit", "1000",
                                       "--batch-size", "128", "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    with np.load(data_path) as test:
        images = test["images"][:1000].astype(np.float32) / 255.0
        labels = test["labels"][:1000]
    logits = plain_run(str(model_path), images)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert got["samples"] == 1000
    assert got["top1"] == pytest.approx(float(np.mean(logits.argmax(1) == labels)), abs=1e-12)
    assert got["top5"] == pytest.approx(float(np.mean((top5 == labels[:, None]).any(1))), abs=1e-12)
    assert got["top1"] > 0.85  # the reference README: 92.31% on the full test set
    table = CliRunner().invoke(main, ["eval", str(model_path), "--data", str(data_path), "--limit", "200"])
    assert table.exit_code == 0 and "top-1 accuracy" in table.output and "samples" in table.output


def test_fidelity_streamed_over_batches_equals_whole_array_metrics() -> None:
    reference = infer_shapes(zoo.build("resnet"))
    model = perturbed(reference)
    x = zoo.random_input(reference, batch=40, seed=5)["input"]
    dataset = dataset_from_arrays(reference, x, options=DataOptions(batch_size=16))
    got = evaluate(model, dataset, reference=reference)
    want = compare_outputs(plain_run(reference, x), plain_run(model, x))
    assert got["samples"] == 40 and "top1" not in got
    assert got["agreement"] == pytest.approx(want["agreement"], abs=1e-12)
    assert got["cosine"] == pytest.approx(want["cosine"], abs=1e-9)
    assert got["snr_db"] == pytest.approx(want["snr_db"], abs=1e-6)
    assert got["agreement"] < 1.0 and got["cosine"] < 0.9999, "the perturbation should be visible"
    same = evaluate(reference, dataset, reference=reference)
    assert same["agreement"] == 1.0 and same["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert same["snr_db"] == float("inf")


def test_labels_and_reference_together() -> None:
    reference = infer_shapes(zoo.build("plain"))
    x = zoo.random_input(reference, batch=30, seed=6)["input"]
    labels = plain_run(reference, x).argmax(1)
    labels[:6] = (labels[:6] + 1) % 10  # 24 of 30 right for the reference itself
    got = evaluate(reference, dataset_from_arrays(reference, x, labels=labels), reference=reference)
    assert got["top1"] == pytest.approx(24 / 30, abs=1e-12)
    assert got["agreement"] == 1.0


def test_eval_without_labels_needs_reference(tmp_path: Path) -> None:
    model = zoo.build("plain")
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", input=zoo.random_input(model, batch=4)["input"])
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz")])
    assert result.exit_code == 1 and "no labels; give --reference" in result.output
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"),
                                       "--reference", str(tmp_path / "m.onnx"), "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output, parse_constant=strict_json_only)
    assert got["agreement"] == 1.0
    assert got["snr_db"] == "inf"  # identical outputs; strict JSON has no Infinity token


def strict_json_only(token: str):
    raise AssertionError(f"non-standard JSON constant {token} in ocomp's output")


def test_compress_eval_prints_side_by_side_and_reports_json(tmp_path: Path) -> None:
    model = zoo.build("resnet")
    src, out, report = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(model, src)
    x = zoo.random_input(model, batch=24, seed=7)["input"]
    labels = plain_run(model, x).argmax(1)
    np.savez(tmp_path / "eval.npz", input=x, labels=labels)
    result = CliRunner().invoke(main, ["compress", str(src), "-o", str(out), "--passes", "prune", "--prune-ratio",
                                       "0.5", "--eval", str(tmp_path / "eval.npz"), "--report", str(report), "-q",
                                       "--force"])  # (an untrained net loses its agreement: the guard would refuse it)
    assert result.exit_code == 0, result.output
    table = result.output.split("evaluation on 24 samples", 1)[1]
    for row in ("top-1 accuracy", "top-5 accuracy", "top-1 agreement", "cosine", "SNR (dB)", "params", "MACs",
                "file size"):
        assert row in table, row
    assert "100.00%" in table.split("top-1 accuracy", 1)[1].splitlines()[0]  # labels = the original's argmax
    evaluation = json.loads(report.read_text(), parse_constant=strict_json_only)["evaluation"]
    assert evaluation["original"]["top1"] == 1.0
    pruned_logits = plain_run(str(out), x)
    assert evaluation["compressed"]["top1"] == pytest.approx(float(np.mean(pruned_logits.argmax(1) == labels)))
    assert evaluation["compressed"]["agreement"] == evaluation["compressed"]["top1"]


def test_render_evaluation_rows() -> None:
    reference = infer_shapes(zoo.build("plain"))
    stats = model_stats(reference)
    text = render_evaluation({"original": {"samples": 10, "top1": 0.9, "top5": 1.0},
                              "compressed": {"samples": 10, "top1": 0.85, "top5": 0.99, "agreement": 0.92,
                                             "cosine": 0.995, "snr_db": 17.5}}, stats, stats)
    lines = {line.split("  ")[0]: line for line in text.splitlines()}
    assert "90.00%" in lines["top-1 accuracy"] and "85.00%" in lines["top-1 accuracy"]
    assert "-5.00 pt" in lines["top-1 accuracy"]
    assert "100.00%" in lines["top-1 agreement"] and "92.00%" in lines["top-1 agreement"]
    assert "17.50" in lines["SNR (dB)"] and "1.00x" in lines["params"]
    single = render_single({"samples": 3, "top1": 2 / 3})
    assert "66.67%" in single and "top-5" not in single


def test_plain_onnxruntime_fallback_without_the_runtime_library(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ocomp.runtime", None)  # `from ocomp.runtime import session` fails
    model = infer_shapes(zoo.build("plain"))
    x = zoo.random_input(model, batch=3)["input"]
    np.testing.assert_array_equal(make_session(model).run(None, {"input": x})[0], plain_run(model, x))
    custom = onnx.ModelProto()
    custom.CopyFrom(model)
    custom.graph.node[0].domain = "ocomp"
    with pytest.raises(OcompError, match="ocomp custom ops .* runtime library is not available"):
        make_session(custom)


def test_progress_bar_and_empty_data(capsys) -> None:
    model = infer_shapes(zoo.build("plain"))
    x = zoo.random_input(model, batch=10, seed=8)["input"]
    dataset = dataset_from_arrays(model, x, labels=np.zeros(10, np.int64), options=DataOptions(batch_size=4))
    quiet = evaluate(model, dataset)
    assert "evaluate" not in capsys.readouterr().err
    shown = evaluate(model, dataset, progress=True)
    assert "evaluate" in capsys.readouterr().err and shown == quiet  # tqdm on stderr, same figures
    with pytest.raises(OcompError, match="no samples to evaluate"):
        evaluate(model, dataset.take(0))
