"""CLI behaviour: bad input gets one line and exit 1, usage errors exit 2, nothing is written on failure."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

import zoo
from ocomp import __version__
from ocomp.cli import main
from ocomp.model import load_model


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture()
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "in.onnx"
    onnx.save(zoo.build("plain"), path)
    return path


def _compress_fails(tmp_path: Path, source: Path, *needles: str) -> None:
    out = tmp_path / "out.onnx"
    before = source.read_bytes() if source.is_file() else None
    result = invoke("compress", source, "-o", out, "--passes", "ternary")
    assert_one_line_error(result, 1, *needles)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.onnx")] == []
    if before is not None:
        assert source.read_bytes() == before


def test_not_a_file(tmp_path: Path) -> None:
    _compress_fails(tmp_path, tmp_path / "missing.onnx", "no such file")
    (tmp_path / "adir").mkdir()
    _compress_fails(tmp_path, tmp_path / "adir", "not a file")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    _compress_fails(tmp_path, path, "empty file")


def test_not_protobuf(tmp_path: Path) -> None:
    path = tmp_path / "text.onnx"
    path.write_text("this is not a model\n" * 20)
    _compress_fails(tmp_path, path, "not an ONNX model")


def test_truncated_protobuf(tmp_path: Path, model_path: Path) -> None:
    data = model_path.read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    _compress_fails(tmp_path, path, "not an ONNX model")


def test_protobuf_that_is_not_a_model(tmp_path: Path) -> None:
    path = tmp_path / "tensor.onnx"
    path.write_bytes(numpy_helper.from_array(np.ones((4, 4), np.float32), "t").SerializeToString())
    _compress_fails(tmp_path, path, "not an ONNX model")


def test_model_failing_checker(tmp_path: Path) -> None:
    model = zoo.build("tiny_conv")
    model.graph.node[0].input[1] = "no_such_weight"
    path = tmp_path / "bad.onnx"
    path.write_bytes(model.SerializeToString())
    _compress_fails(tmp_path, path, "fails the ONNX checker")


def test_opset_too_old(tmp_path: Path) -> None:
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)], ir_version=3)
    path = tmp_path / "old.onnx"
    path.write_bytes(model.SerializeToString())
    _compress_fails(tmp_path, path, "opset 6 is older than 7")


def test_dynamic_spatial_dims_reported(tmp_path: Path) -> None:
    model = zoo.build("tiny_conv")
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param = "H"
    dims[3].dim_param = "W"
    model.graph.output[0].type.tensor_type.shape.dim[2].dim_param = "H"
    model.graph.output[0].type.tensor_type.shape.dim[3].dim_param = "W"
    path = tmp_path / "dyn.onnx"
    path.write_bytes(model.SerializeToString())
    # symbolic spatial dims are kept end to end: the compressed model runs at any size, like the original
    dynamic = tmp_path / "dynamic.onnx"
    result = invoke("compress", path, "-o", dynamic, "--passes", "ternary", "--ternary-min-params", "0", "-q")
    assert result.exit_code == 0, result.output
    kept = load_model(dynamic, require_static=False)
    assert [d.dim_param or d.dim_value for d in kept.graph.input[0].type.tensor_type.shape.dim][2:] == ["H", "W"]
    assert [d.dim_param or d.dim_value for d in kept.graph.output[0].type.tensor_type.shape.dim][2:] == ["H", "W"]
    from ocomp.session import make_session

    for size in ((20, 28), (32, 32)):
        x = np.zeros((1, 3) + size, np.float32)
        assert make_session(kept).run(None, {"input": x})[0].shape[2:] == size
    out = tmp_path / "fixed.onnx"
    result = invoke("compress", path, "-o", out, "--passes", "ternary", "--input-shape", "input=N,3,32,32", "-q")
    assert result.exit_code == 0, result.output
    fixed = load_model(out)
    assert [d.dim_param or d.dim_value for d in fixed.graph.input[0].type.tensor_type.shape.dim] == ["N", 3, 32, 32]


def test_symbolic_batch_works(tmp_path: Path, model_path: Path) -> None:
    out = tmp_path / "out.onnx"
    result = invoke("compress", model_path, "-o", out, "--passes", "ternary", "-q")
    assert result.exit_code == 0, result.output
    model = onnx.load(out)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


def _with_external_data(tmp_path: Path, location: str) -> Path:
    model = zoo.build("tiny_conv")
    weight = next(i for i in model.graph.initializer if i.name.endswith("weight"))
    values = numpy_helper.to_array(weight)
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(values.nbytes))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    path = tmp_path / "ext.onnx"
    path.write_bytes(model.SerializeToString())
    return path, values


def test_external_data_loads(tmp_path: Path) -> None:
    path, values = _with_external_data(tmp_path, "weights.bin")
    (tmp_path / "weights.bin").write_bytes(values.tobytes())
    model = load_model(path)
    weight = next(i for i in model.graph.initializer if i.name.endswith("weight"))
    np.testing.assert_array_equal(numpy_helper.to_array(weight), values)


def test_missing_external_data(tmp_path: Path) -> None:
    path, _ = _with_external_data(tmp_path, "weights.bin")
    _compress_fails(tmp_path, path, "external data file 'weights.bin'", "missing")


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "sub/../../outside.bin"])
def test_external_data_outside_folder_refused(tmp_path: Path, location: str) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    path, values = _with_external_data(folder, location)
    (tmp_path / "outside.bin").write_bytes(values.tobytes())
    _compress_fails(folder, path, "outside the model's folder", "refused")


def test_external_data_symlink_outside_refused(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    path, values = _with_external_data(folder, "link.bin")
    (tmp_path / "outside.bin").write_bytes(values.tobytes())
    os.symlink(tmp_path / "outside.bin", folder / "link.bin")
    _compress_fails(folder, path, "resolves outside the model's folder")


def test_output_equal_to_input(model_path: Path) -> None:
    before = model_path.read_bytes()
    result = invoke("compress", model_path, "-o", model_path, "--passes", "ternary")
    assert_one_line_error(result, 1, "the output (-o) names the input model", "refused")
    assert model_path.read_bytes() == before


def test_output_directory_missing(tmp_path: Path, model_path: Path) -> None:
    out = tmp_path / "nope" / "out.onnx"
    result = invoke("compress", model_path, "-o", out, "--passes", "ternary")
    assert_one_line_error(result, 1, "does not exist")
    assert not out.parent.exists()


def test_unknown_pass_is_usage_error(tmp_path: Path, model_path: Path) -> None:
    result = invoke("compress", model_path, "-o", tmp_path / "o.onnx", "--passes", "ternary,shrinkify")
    assert_one_line_error(result, 2, "unknown pass 'shrinkify'", "ternary")
    assert not (tmp_path / "o.onnx").exists()


def test_unknown_option_is_usage_error(tmp_path: Path, model_path: Path) -> None:
    result = invoke("compress", model_path, "-o", tmp_path / "o.onnx", "--passes", "ternary", "--ternary-bogus", "1")
    assert result.exit_code == 2
    assert "No such option" in result.output


def test_bad_option_value_is_usage_error(tmp_path: Path, model_path: Path) -> None:
    result = invoke("compress", model_path, "-o", tmp_path / "o.onnx", "--passes", "ternary",
                    "--ternary-min-params", "lots")
    assert result.exit_code == 2
    assert "--ternary-min-params" in result.output


def test_recipe_unknown_option_is_usage_error(tmp_path: Path, model_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('passes = ["ternary"]\n[ternary]\nbogus = 3\n')
    result = invoke("compress", model_path, "-o", tmp_path / "o.onnx", "--recipe", recipe)
    assert_one_line_error(result, 2, "pass 'ternary' has no option 'bogus'")


def test_version_and_help() -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and __version__ in result.output
    for command in ("compress", "inspect", "compare", "eval", "passes"):
        result = invoke(command, "--help")
        assert result.exit_code == 0, result.output
        assert "Usage:" in result.output


def test_passes_lists_declared_options() -> None:
    from ocomp.pipeline import registry

    result = invoke("passes")
    assert result.exit_code == 0
    for name, cls in registry().items():
        assert f"{name}:" in result.output
        for option in cls.options:
            assert option.flag(name) in result.output


@pytest.mark.parametrize("where", ["elsewhere", "checkout"])
def test_python_dash_m(model_path: Path, tmp_path: Path, where: str) -> None:
    """`python -m ocomp` works from any directory, including the repository root, where
    the source checkout (passes/ and runtime/ beside ocomp/) shadows the installed package."""
    import subprocess
    import sys

    cwd = tmp_path if where == "elsewhere" else Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "ocomp", "inspect", str(model_path)], capture_output=True,
                          text=True, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert "total params" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "ocomp", "inspect", str(model_path) + ".missing"],
                          capture_output=True, text=True, cwd=cwd)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_debug_shows_traceback(tmp_path: Path) -> None:
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    result = CliRunner().invoke(main, ["inspect", "--debug", str(path)])
    assert result.exit_code == 1
    assert "Traceback" in result.output


def test_inspect_counts_params_and_macs(model_path: Path) -> None:
    result = invoke("inspect", model_path, "--json")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output)
    model = onnx.load(model_path)
    expected_params = sum(int(np.prod(i.dims)) for i in model.graph.initializer)
    assert stats["params"] == expected_params
    # MACs of the first conv, counted by hand from the zoo's shapes: 3->16 3x3 at 32x32 (stride 1, pad 1)
    first = stats["layers"][0]
    kout, cin, kh, kw = first["weight_shape"]
    out_h, out_w = first["output_shape"][2:]
    assert first["macs"] == kout * cin * kh * kw * out_h * out_w
    assert stats["file_size"] == model_path.stat().st_size
    assert stats["ops"]["Conv"] == sum(1 for n in model.graph.node if n.op_type == "Conv")


def test_compare_identical_models_is_exact(tmp_path: Path, model_path: Path) -> None:
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(model_path.read_bytes())
    result = invoke("compare", model_path, copy, "--random", "4", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["samples"] == 4
    logits = report["outputs"]["logits"]
    assert logits["max_abs"] == 0.0 and logits["agreement"] == 1.0 and logits["cosine"] == pytest.approx(1.0)


def test_compare_detects_difference(tmp_path: Path, model_path: Path) -> None:
    model = onnx.load(model_path)
    gemm_bias = next(i for i in model.graph.initializer if i.name == "fc.bias")
    bias = numpy_helper.to_array(gemm_bias).copy()
    bias[0] += 1.0
    gemm_bias.CopyFrom(numpy_helper.from_array(bias, gemm_bias.name))
    other = tmp_path / "other.onnx"
    onnx.save(model, other)
    result = invoke("compare", model_path, other, "--random", "3", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["outputs"]["logits"]["max_abs"] == pytest.approx(1.0, rel=1e-5)


def test_compare_mismatched_models(tmp_path: Path, model_path: Path) -> None:
    other = tmp_path / "tiny.onnx"
    onnx.save(zoo.build("tiny_conv"), other)
    result = invoke("compare", model_path, other)
    assert result.exit_code == 1
    assert "cannot be compared" in result.output


def test_inspect_measures_shapes_static_inference_cannot_see(tmp_path: Path, shared_dir: Path) -> None:
    """PP-OCR's classifier reshapes into its MatMul head with a target shape computed at run time, and a
    compressed model whose value_info another tool stripped has unsized ternary ops: inspect runs the model
    once at batch 1 to size them, so their MACs are counted."""
    result = invoke("inspect", shared_dir / "ppocr_mobile_v2_cls.onnx", "--json", "--input-shape", "x=1,3,48,192")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output)
    head = next(la for la in stats["layers"] if la["op"] == "MatMul")
    assert head["output_shape"] == [1, 2] and head["macs"] == 200 * 2
    assert stats["unknown_macs"] == []

    model = zoo.build("resnet", folded=True)
    src, out = tmp_path / "m.onnx", tmp_path / "t.onnx"
    onnx.save(model, src)
    assert invoke("compress", src, "-o", out, "--passes", "ternary").exit_code == 0
    compressed = onnx.load(out)
    want = json.loads(invoke("inspect", out, "--json").output)
    ternary_outputs = {o for n in compressed.graph.node if n.domain == "ocomp" for o in n.output}
    assert ternary_outputs
    kept = [v for v in compressed.graph.value_info if v.name not in ternary_outputs]
    del compressed.graph.value_info[:]
    compressed.graph.value_info.extend(kept)
    stripped = tmp_path / "stripped.onnx"
    onnx.save(compressed, stripped)
    got = json.loads(invoke("inspect", stripped, "--json").output)
    assert got["unknown_macs"] == [] and got["macs"] == want["macs"] > 0
    assert [la["macs"] for la in got["layers"]] == [la["macs"] for la in want["layers"]]


def test_inspect_says_when_macs_are_a_lower_bound(tmp_path: Path) -> None:
    model = zoo.build("plain")
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    path = tmp_path / "dynamic.onnx"
    onnx.save(model, path)
    result = invoke("inspect", path)
    assert result.exit_code == 0, result.output
    assert "MACs undercounted for" in result.output and "--input-shape" in result.output
    stats = json.loads(invoke("inspect", path, "--json").output)
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert set(convs) <= set(stats["unknown_macs"])
    fixed = json.loads(invoke("inspect", path, "--json", "--input-shape", "input=1,3,32,32").output)
    assert fixed["unknown_macs"] == [] and fixed["macs"] > stats["macs"]
