"""Issue 14: models as users bring them, and nothing lost on bad input.

Every case: the exit code, one `error:` line naming the problem (never a traceback), no output and no
temp file left behind, and the input files unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

import zoo
from ocomp.cli import main

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args) -> "object":
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error(result, code: int, *needles: str) -> str:
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr and "internal error" not in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def digest(*paths: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith((".tmp", ".probe")))


@pytest.fixture()
def plain(tmp_path: Path) -> Path:
    path = tmp_path / "in.onnx"
    onnx.save(zoo.build("plain"), path)
    return path


@pytest.fixture()
def calib(tmp_path: Path) -> Path:
    path = tmp_path / "calib.npz"
    model = zoo.build("plain")
    np.savez(path, input=zoo.random_input(model, batch=8, seed=3)["input"])
    return path


# ---------------------------------------------------------------- latency in the summary


def test_summary_reports_measured_latency_and_no_latency_skips_it(tmp_path: Path, plain: Path) -> None:
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    result = invoke("compress", plain, "-o", out, "--passes", "foldbn", "--threads", "1", "--report", report, "-q")
    assert result.exit_code == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("latency (batch 1, 1 thread)*"))
    original_ms, compressed_ms = (float(v) for v in row.split()[-5:-1:2])
    assert original_ms > 0 and compressed_ms > 0
    import re

    runs = re.search(r"\* measured on this machine: median of at least (\d+) runs", result.stdout)
    assert runs and int(runs.group(1)) >= 5, result.stdout
    latency = json.loads(report.read_text())["latency"]
    assert latency["threads"] == 1 and latency["batch"] == 1
    assert latency["original"] > 0 and latency["compressed"] > 0 and latency["original_runs"] >= 5
    out.unlink()
    result = invoke("compress", plain, "-o", out, "--passes", "foldbn", "--no-latency", "--report", report, "-q")
    assert result.exit_code == 0, result.stderr
    assert "latency" not in result.stdout and json.loads(report.read_text())["latency"] is None


# ---------------------------------------------------------------- 1: bad values in data


@pytest.mark.parametrize("flag", ["--calib", "--eval"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e38])
def test_non_finite_data_refused_before_any_work(tmp_path: Path, plain: Path, flag: str, bad: float) -> None:
    x = zoo.random_input(zoo.build("plain"), batch=6, seed=1)["input"]
    x[4, 2, 10, 11] = bad
    data = tmp_path / "d.npz"
    np.savez(data, input=x)
    before = digest(plain, data)
    result = invoke("compress", plain, "-o", tmp_path / "out.onnx", "--passes", "prune,bnrecal", flag, data,
                    *(["--calib", data] if flag == "--eval" else []))
    one_error(result, 1, str(data), "array 'input'", "at index (4, 2, 10, 11)", "must be finite")
    assert "== pass" not in result.stdout and not (tmp_path / "out.onnx").exists()
    assert digest(plain, data) == before


# ---------------------------------------------------------------- 3: outputs that name inputs


def _external_model(folder: Path) -> tuple[Path, Path]:
    model = zoo.build("plain")
    path = folder / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.bin",
              size_threshold=0)
    return path, folder / "ext.bin"


def test_output_naming_any_input_is_refused_before_any_work(tmp_path: Path, plain: Path, calib: Path) -> None:
    model, weights = _external_model(tmp_path)
    recipe = tmp_path / "r.toml"
    recipe.write_text('passes = ["foldbn"]\n')
    evaluation = tmp_path / "eval.npz"
    np.savez(evaluation, input=zoo.random_input(zoo.build("plain"), batch=4)["input"], labels=np.arange(4))
    folder = tmp_path / "images"
    folder.mkdir()
    np.save(folder / "0.npy", zoo.random_input(zoo.build("plain"), batch=2)["input"])
    everything = [model, weights, calib, evaluation, recipe, folder / "0.npy"]
    before = digest(*everything)
    base = ["compress", model, "--recipe", recipe, "--calib", calib, "--eval", evaluation, "--no-latency"]
    cases = [
        (["-o", weights], "the output (-o) names the input model's external data file 'ext.bin'"),
        (["-o", calib], "the output (-o) names the --calib data"),
        (["-o", evaluation], "the output (-o) names the --eval data"),
        (["-o", recipe], "the output (-o) names the --recipe file"),
        (["-o", tmp_path / "out.onnx", "--report", weights], "the --report file names the input model's external"),
        (["-o", tmp_path / "out.onnx", "--report", tmp_path / "out.onnx"],
         "the --report file names the same file as the output (-o)"),
        (["-o", tmp_path / "sub" / ".." / "calib.npz"], "names the --calib data"),
    ]
    for extra, needle in cases:
        one_error(invoke(*base, *extra), 1, needle, "refused" if "same file" not in needle else "")
    one_error(invoke("compress", model, "-o", folder / "new.npy", "--passes", "foldbn", "--calib", folder),
              1, "lies inside the --calib data folder")
    os.symlink(calib, tmp_path / "alias.onnx")
    one_error(invoke(*base, "-o", tmp_path / "alias.onnx"), 1, "names the --calib data")
    assert digest(*everything) == before
    assert not (tmp_path / "out.onnx").exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------- 4: signals


@pytest.mark.parametrize("signum,code,text", [(signal.SIGTERM, 143, "terminated by SIGTERM"),
                                              (signal.SIGHUP, 129, "terminated by SIGHUP"),
                                              (signal.SIGINT, 130, "interrupted")])
def test_signal_during_the_write_removes_the_temp_file(tmp_path: Path, plain: Path, monkeypatch, signum: int,
                                                       code: int, text: str) -> None:
    import ocomp.model

    real_fsync = os.fsync

    def fsync_then_signal(fd: int) -> None:
        real_fsync(fd)
        if [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]:  # the temp file exists now
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(ocomp.model.os, "fsync", fsync_then_signal)
    previous = signal.getsignal(signum)
    result = invoke("compress", plain, "-o", tmp_path / "out.onnx", "--passes", "foldbn", "--no-latency")
    one_error(result, code, text)
    assert not (tmp_path / "out.onnx").exists() and leftovers(tmp_path) == []
    assert signal.getsignal(signum) is previous  # the host's handler is back


@pytest.mark.parametrize("signum,code,text", [(signal.SIGINT, 130, "error: interrupted"),
                                              (signal.SIGTERM, 143, "error: terminated by SIGTERM")])
def test_signal_during_start_up_is_one_line(tmp_path: Path, plain: Path, signum: int, code: int, text: str) -> None:
    """Importing onnx/numpy takes seconds; a Ctrl-C then used to print a KeyboardInterrupt traceback."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "ocomp", "inspect", str(plain)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    import time

    # wait until ocomp.cli has installed its handlers (SIGTERM appears in the caught-signals mask), which it
    # does before importing onnx/numpy: the signal then arrives during start-up
    deadline = time.monotonic() + 30
    if not Path("/proc/self/status").is_file():  # not Linux: start-up takes seconds, half of one is enough
        time.sleep(0.5)
        deadline = 0
    while time.monotonic() < deadline and proc.poll() is None:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
        if caught & (1 << (signal.SIGTERM - 1)):
            break
        time.sleep(0.005)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the command finished before the signal arrived (a very fast machine)")
    assert proc.returncode == code and stderr.strip() == text, (proc.returncode, stderr)


# ---------------------------------------------------------------- 5: writability, modes


def _unwritable_dir(tmp_path: Path) -> Path:
    if os.geteuid() == 0:
        return Path("/sys/kernel")  # root writes anywhere a mode allows; sysfs refuses new files even to root
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def test_unwritable_outputs_are_found_before_the_passes(tmp_path: Path, plain: Path, calib: Path) -> None:
    locked = _unwritable_dir(tmp_path)
    result = invoke("compress", plain, "-o", locked / "out.onnx", "--passes", "prune,bnrecal", "--calib", calib)
    one_error(result, 1, f"cannot write the output (-o) into '{locked}'")
    assert "== pass" not in result.stdout
    out = tmp_path / "out.onnx"
    result = invoke("compress", plain, "-o", out, "--passes", "foldbn", "--report", locked / "r.json")
    one_error(result, 1, f"cannot write the --report file into '{locked}'")
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("umask,expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_get_the_umask_permissions(tmp_path: Path, plain: Path, umask: int, expected: int) -> None:
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    old = os.umask(umask)
    try:
        result = invoke("compress", plain, "-o", out, "--passes", "foldbn", "--report", report, "--no-latency")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.stderr
    assert stat.S_IMODE(out.stat().st_mode) == expected and stat.S_IMODE(report.stat().st_mode) == expected


def test_an_existing_output_keeps_its_mode(tmp_path: Path, plain: Path) -> None:
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old")
    out.chmod(0o640)
    assert invoke("compress", plain, "-o", out, "--passes", "foldbn", "--no-latency").exit_code == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o640 and out.read_bytes() != b"old"


# ---------------------------------------------------------------- 6: named errors


def test_npz_header_claiming_more_rows_than_stored(tmp_path: Path, plain: Path) -> None:
    import io
    import zipfile

    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, zoo.random_input(zoo.build("plain"), batch=4)["input"])
    data = buffer.getvalue().replace(b"(4, 3, 32, 32)", b"(8, 3, 32, 32)")
    calib = tmp_path / "c.npz"
    with zipfile.ZipFile(calib, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("input.npy", data)
    one_error(invoke("compress", plain, "-o", tmp_path / "o.onnx", "--passes", "bnrecal", "--calib", calib), 1,
              "array 'input' claims shape (8, 3, 32, 32)", "truncated or corrupt")


@pytest.mark.parametrize("key,value", [("offset", "abc"), ("offset", "-4"), ("length", "1e3")])
def test_external_data_with_a_bad_offset_or_length(tmp_path: Path, key: str, value: str) -> None:
    model, _ = _external_model(tmp_path)
    proto = onnx.load(model, load_external_data=False)
    tensor = next(t for t in proto.graph.initializer if t.external_data)
    entry = next((e for e in tensor.external_data if e.key == key), None) or tensor.external_data.add(key=key)
    entry.value = value
    onnx.save(proto, model)
    for command in (["inspect", model], ["compress", model, "-o", tmp_path / "o.onnx", "--passes", "foldbn"]):
        one_error(invoke(*command), 1, f"external data {key} '{value}', not a non-negative integer")


def test_symlink_loops_are_named(tmp_path: Path, plain: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    one_error(invoke("inspect", tmp_path / "a"), 1, "symlink loop")
    one_error(invoke("compress", tmp_path / "a", "-o", tmp_path / "o.onnx", "--passes", "foldbn"), 1, "symlink loop")
    one_error(invoke("compress", plain, "-o", tmp_path / "a", "--passes", "foldbn"), 1, "symlink loop")
    one_error(invoke("compress", plain, "-o", tmp_path / "o.onnx", "--passes", "bnrecal", "--calib", tmp_path / "a"),
              1, "symlink loop")
    one_error(invoke("compress", plain, "-o", tmp_path / "o.onnx", "--recipe", tmp_path / "a"), 1, "symlink loop")
    model, _ = _external_model(tmp_path / "m" if (tmp_path / "m").mkdir() is None else tmp_path)
    (model.parent / "ext.bin").unlink()
    (model.parent / "ext.bin").symlink_to(model.parent / "ext.bin")
    one_error(invoke("inspect", model), 1, "external data file 'ext.bin'", "symlink loop")


@pytest.mark.parametrize("text,code,needle", [
    ("passes = 5\n", 2, "'passes' must be a list of pass names"),
    ('passes = [1, 2]\n', 2, "'passes' must be a list of pass names"),
    ('passes = ["prune"]\nprune = 3\n', 2, "unknown recipe key 'prune'"),
    ('passes = ["prune"]\n[prune]\nmin_channels = true\n', 2, "--prune-min-channels: expected a value of type int"),
    ('passes = ["ternary"]\n[ternary]\nmin_params = -5\n', 2, "--ternary-min-params: expected a whole number >= 0"),
    ('passes = ["prune"]\n[prune]\nratio = "lots"\n', 2, "--prune-ratio"),
])
def test_recipe_errors_are_named(tmp_path: Path, plain: Path, text: str, code: int, needle: str) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    one_error(invoke("compress", plain, "-o", tmp_path / "o.onnx", "--recipe", recipe), code, needle)


def test_recipe_that_is_a_directory(tmp_path: Path, plain: Path) -> None:
    (tmp_path / "recipe").mkdir()
    one_error(invoke("compress", plain, "-o", tmp_path / "o.onnx", "--recipe", tmp_path / "recipe"), 1,
              "the recipe is not a file")


# ---------------------------------------------------------------- 7: malformed ocomp nodes


@pytest.fixture(scope="module")
def ternary_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ternary")
    src, out = folder / "src.onnx", folder / "t.onnx"
    onnx.save(zoo.build("resnet", folded=True), src)
    result = invoke("compress", src, "-o", out, "--passes", "ternary", "--no-latency", "-q")
    assert result.exit_code == 0, result.stderr
    return out


def _corrupt_ternary(model: onnx.ModelProto, how: str) -> None:
    node = next(n for n in model.graph.node if n.op_type == "TernaryConv")
    attrs = {a.name: a for a in node.attribute}
    inits = {i.name: i for i in model.graph.initializer}
    if how == "string weight_shape":
        attrs["weight_shape"].CopyFrom(helper.make_attribute("weight_shape", "16,16,3,3"))
    elif how == "huge weight_shape":
        attrs["weight_shape"].ints[1] = 1 << 20
    elif how == "packed length":
        packed = inits[node.input[1]]
        packed.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(packed)[:-1], packed.name))
    elif how == "invalid code":
        packed = inits[node.input[1]]
        values = numpy_helper.to_array(packed).copy()
        values[3] = 0xFF
        packed.CopyFrom(numpy_helper.from_array(values, packed.name))
    elif how == "alpha length":
        alpha = inits[node.input[2]]
        alpha.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(alpha)[:-2], alpha.name))
    elif how == "group":
        if "group" in attrs:
            node.attribute.remove(attrs["group"])
        node.attribute.append(helper.make_attribute("group", 3))
    elif how == "pads":
        node.attribute.remove(attrs["pads"]) if "pads" in attrs else None
        node.attribute.append(helper.make_attribute("pads", [1, 1, -1, 1]))


@pytest.mark.parametrize("how,needle", [
    ("string weight_shape", "attribute weight_shape must be a list of integers, it is STRING"),
    ("huge weight_shape", "packed weights have"),
    ("packed length", "packed weights have"),
    ("invalid code", "invalid 2-bit code 0b11 in packed weights at weight index"),
    ("alpha length", "alpha must have shape"),
    ("group", "is not divisible by group=3"),
    ("pads", "pads must be 4 values in [0, 65536]"),
])
def test_malformed_ocomp_nodes_are_refused_by_inspect_compare_eval(tmp_path: Path, ternary_model: Path, how: str,
                                                                   needle: str) -> None:
    model = onnx.load(ternary_model)
    _corrupt_ternary(model, how)
    bad = tmp_path / "bad.onnx"
    onnx.save(model, bad)
    data = tmp_path / "d.npz"
    np.savez(data, input=zoo.random_input(model, batch=2)["input"], labels=np.arange(2))
    for command in (["inspect", bad], ["compare", ternary_model, bad], ["compare", bad, ternary_model],
                    ["eval", bad, "--data", data]):
        result = invoke(*command)
        line = one_error(result, 1, str(bad), "(TernaryConv)", needle)
        assert "onnxruntime" not in line and "[E:" not in result.stdout + result.stderr


def test_onnxruntime_failures_are_one_line_without_its_log(tmp_path: Path) -> None:
    """A model that passes the checks but fails in onnxruntime (a Reshape to an impossible shape)."""
    node = helper.make_node("Reshape", ["x", "shape"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["M", 4])],
                              [numpy_helper.from_array(np.array([-1, 4], np.int64), "shape")])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    result = invoke("compare", path, path, "--random", "1")
    line = one_error(result, 1, f"{path}: onnxruntime cannot run the model: node '' (Reshape): The input tensor "
                                "cannot be reshaped to the requested shape. Input shape:{1,6}, requested shape:{-1,4}")
    assert "[ONNXRuntimeError]" not in line and "onnxruntime_src" not in line
    # onnxruntime's own (coloured) log line of the failed run is not on the console either
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "ocomp", "compare", str(path), str(path), "--random", "1"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.strip() == line, proc.stderr


# ---------------------------------------------------------------- 8: usage errors, labels


def test_usage_errors_exit_2(tmp_path: Path, plain: Path) -> None:
    one_error(invoke("inspect", plain, "--input-shape", "nosuch=1,3,32,32"), 2, "the model has no input 'nosuch'")
    one_error(invoke("compress", plain, "-o", tmp_path / "o.onnx", "--passes", "foldbn", "--input-shape",
                     "nosuch=1,3,32,32"), 2, "the model has no input 'nosuch'")
    result = invoke("compress", plain, "-o", tmp_path / "o.onnx", "--passes", "ternary", "--ternary-min-params", "-5")
    assert result.exit_code == 2 and "expected a whole number >= 0" in result.stderr and "Traceback" not in result.stderr
    from ocomp import api
    from ocomp.errors import UsageError

    with pytest.raises(UsageError, match="expected a whole number >= 0"):
        api.compress(plain, tmp_path / "o.onnx", "ternary", {"ternary": {"min_params": -5}})
    with pytest.raises(UsageError, match="--prune-min-channels: expected a value of type int, got True"):
        api.compress(plain, tmp_path / "o.onnx", "prune", {"prune": {"min_channels": True}})
    assert not (tmp_path / "o.onnx").exists()


def test_labels_outside_the_classes_warn_with_the_range(tmp_path: Path, plain: Path) -> None:
    data = tmp_path / "d.npz"
    np.savez(data, input=zoo.random_input(zoo.build("plain"), batch=4)["input"], labels=np.array([0, 3, 10, 12]))
    result = invoke("eval", plain, "--data", data)
    assert result.exit_code == 0
    warnings = [line for line in result.stderr.splitlines() if line.strip()]
    assert warnings == [f"warning: {data}: 2 of 4 labels lie outside the model's classes 0..9 (output 'logits'; "
                        "labels range 0..12): they count as wrong"]
    result = invoke("compress", plain, "-o", tmp_path / "o.onnx", "--passes", "foldbn", "--calib", data,
                    "--no-latency", "-q")
    assert result.exit_code == 0 and warnings[0] in result.stderr.splitlines()
    np.savez(data, input=zoo.random_input(zoo.build("plain"), batch=4)["input"], labels=np.array([0, 3, 9, 1]))
    assert "warning" not in invoke("eval", plain, "--data", data).stderr


def test_prune_plot_folder_is_checked_before_the_passes(tmp_path: Path, plain: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    np.save(images / "0.npy", zoo.random_input(zoo.build("plain"), batch=2)["input"])
    base = ["compress", plain, "-o", tmp_path / "o.onnx", "--passes", "prune", "--calib", images, "--no-latency"]
    one_error(invoke(*base, "--prune-plot", images), 1, "the --prune-plot folder is or lies inside the --calib data")
    one_error(invoke(*base, "--prune-plot", images / "plots"), 1, "lies inside the --calib data folder")
    one_error(invoke(*base, "--prune-plot", plain), 1, "the --prune-plot folder is not a folder")
    locked = _unwritable_dir(tmp_path)
    one_error(invoke(*base, "--prune-plot", locked / "plots"), 1, "cannot write the --prune-plot folder into")
    assert not (tmp_path / "o.onnx").exists() and sorted(p.name for p in images.iterdir()) == ["0.npy"]


def test_weighted_layer_with_a_weight_of_the_wrong_rank_is_refused(tmp_path: Path, ternary_model: Path) -> None:
    """Found by the fuzz test: a Gemm whose weight is a 1-D tensor passes ONNX's checker and the lenient shape
    inference of models with custom ops; inspect printed a 32-weight Gemm instead of refusing it."""
    model = onnx.load(ternary_model)
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    bias = next(i.name for i in model.graph.initializer if len(i.dims) == 1 and i.dims[0] == 32)
    gemm.input[1] = bias
    bad = tmp_path / "bad.onnx"
    onnx.save(model, bad)
    for command in (["inspect", bad], ["compare", bad, ternary_model]):
        one_error(invoke(*command), 1, f"node '{gemm.name}' (Gemm): weight '{bias}' has shape (32); Gemm needs a "
                                       "weight of rank 2")
