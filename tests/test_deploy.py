"""The C++ deploy example (examples/deploy) built against the wheel's
libonnxruntime runs a TernaryConv + TernaryGemm model like Python does."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

import ocomp.runtime as rt
from ocomp.passes.ternary import pack_ternary

from test_runtime import OPSETS, assert_close, require_library, ternary

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed: cannot build examples/deploy"),
    pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                       reason="no C++ compiler (g++) installed: cannot build examples/deploy"),
]


def wheel_onnxruntime_library() -> Path:
    capi = Path(onnxruntime.__file__).resolve().parent / "capi"
    candidates = sorted(capi.glob("libonnxruntime.so*"))
    if not candidates:
        pytest.skip(f"no libonnxruntime.so* in {capi}")
    return candidates[0]


def conv_gemm_model(rng):
    """X[1,3,8,8] -> TernaryConv(3->4, 3x3, pad 1) -> Relu -> Flatten -> TernaryGemm(256->10)."""
    tc = ternary(rng, (4, 3, 3, 3))
    tg = ternary(rng, (10, 256))
    inits = [
        numpy_helper.from_array(pack_ternary(tc), "conv_packed"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), "conv_alpha"),
        numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "conv_bias"),
        numpy_helper.from_array(pack_ternary(tg), "fc_packed"),
        numpy_helper.from_array(rng.uniform(0.01, 0.1, 10).astype(np.float32), "fc_alpha"),
        numpy_helper.from_array(rng.normal(size=10).astype(np.float32), "fc_bias"),
    ]
    nodes = [
        helper.make_node("TernaryConv", ["X", "conv_packed", "conv_alpha", "conv_bias"], ["c"], domain="ocomp",
                         weight_shape=[4, 3, 3, 3], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"], axis=1),
        helper.make_node("TernaryGemm", ["f", "fc_packed", "fc_alpha", "fc_bias"], ["Y"], domain="ocomp",
                         weight_shape=[10, 256]),
    ]
    graph = helper.make_graph(nodes, "deploy", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=OPSETS)


def test_deploy_example_matches_python(tmp_path):
    library = require_library()
    ort_library = wheel_onnxruntime_library()
    build = tmp_path / "build"
    configure = subprocess.run(
        ["cmake", "-S", str(ROOT / "examples" / "deploy"), "-B", str(build), f"-DORT_LIBRARY={ort_library}",
         "-DCMAKE_BUILD_TYPE=Release"],
        capture_output=True, text=True,
    )
    assert configure.returncode == 0, configure.stdout + configure.stderr
    compile_ = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True)
    assert compile_.returncode == 0, compile_.stdout + compile_.stderr

    rng = np.random.default_rng(42)
    model = conv_gemm_model(rng)
    model_path = tmp_path / "model.onnx"
    model_path.write_bytes(model.SerializeToString())
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    (tmp_path / "input.raw").write_bytes(x.tobytes())
    expected = rt.session(model).run(None, {"X": x})[0]

    proc = subprocess.run(
        [str(build / "ocomp_deploy"), str(model_path), library, str(tmp_path / "input.raw"), "1,3,8,8",
         str(tmp_path / "output.raw")],
        capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "output shape 1 10"
    y = np.fromfile(tmp_path / "output.raw", dtype=np.float32).reshape(expected.shape)
    assert_close(y, expected, "deploy vs python")
    assert np.abs(y - expected).max() <= 1e-5 * max(1.0, float(np.abs(expected).max()))
