"""benchmarks/session_memory.py's measuring function on tiny models (so the MEMORY.md figures cannot rot): a
session holding a 16 MiB weight measures at least 16 MiB more than a one-Relu session, the peak is the peak,
a W2A8 model runs through ocomp's session factory, and the verdict lines are computed from the figures."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ocomp.passes.ternary import pack_ternary
from test_runtime import conv_attrs, require_library, ternary, ternary_node_model

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import session_memory as sm  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc (VmHWM)")

MIB = 1024 * 1024


def big_gemm(path: Path, k: int = 1024, n: int = 4096) -> Path:
    """x (1, k) @ W (k, n) with W float32: k * n * 4 bytes (16 MiB) of weight."""
    w = np.random.default_rng(0).normal(size=(k, n)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(w, "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def test_measure_counts_the_weights_and_the_peak(tmp_path):
    x = np.ones((1, 1024), np.float32)
    floor = sm.measure(sm.floor_model(tmp_path / "floor.onnx", x, "x"), x, "x", tmp_path / "work", repeats=1, runs=2)
    big = sm.measure(big_gemm(tmp_path / "big.onnx"), x, "x", tmp_path / "work", repeats=2, runs=2)
    for result, path in ((floor, tmp_path / "floor.onnx"), (big, tmp_path / "big.onnx")):
        assert result["peak_reset"], "VmHWM could not be reset: peaks would include the imports"
        assert result["file_bytes"] == path.stat().st_size
        assert result["session_options"]["intra_op_num_threads"] == 1
        for raw in result["raw"]:
            assert raw["baseline"] > 0
            assert raw["peak"] >= max(raw["after_create"], raw["after_first"], raw["after"])  # the peak is a peak
        assert result["session_bytes"] >= result["create_bytes"] - 64 * 1024  # medians of per-run figures
    assert len(big["raw"]) == 2
    # the 16 MiB weight is resident in the session (as an initializer or pre-packed), the one-Relu model holds none
    assert big["session_bytes"] - floor["session_bytes"] >= 15 * MIB, (big["session_bytes"], floor["session_bytes"])
    assert floor["session_bytes"] < 64 * MIB
    # SessionOptions reach the session (read back from it in the worker)
    off = sm.measure(tmp_path / "big.onnx", x, "x", tmp_path / "work", repeats=1, runs=2, options=sm.NO_PATTERN)
    assert off["session_options"]["enable_mem_pattern"] is False and big["session_options"]["enable_mem_pattern"]


def test_measure_runs_a_w2a8_model(tmp_path):
    require_library()
    rng = np.random.default_rng(3)
    t = ternary(rng, (32, 16, 3, 3))
    model = ternary_node_model("TernaryConv", pack_ternary(t), np.ones(32), np.zeros(32),
                               **conv_attrs(t.shape, (1, 1), (1, 1, 1, 1), (1, 1), 1), act_scale=0.03,
                               act_zero_point=117, activation="Relu")
    path = tmp_path / "w2a8.onnx"
    onnx.save(model, str(path))
    x = rng.normal(size=(1, 16, 20, 20)).astype(np.float32)
    result = sm.measure(path, x, "X", tmp_path / "work", repeats=1, runs=3)
    assert result["session_bytes"] > 0 and result["peak_reset"]
    assert "TernaryConv (W2A8)" in sm.layer_census(path)


def test_markdown_verdicts_follow_the_figures(tmp_path):
    def row(label, mb):
        raw = [{"baseline": 100 * MIB, "after_create": 100 * MIB, "after_first": 100 * MIB,
                "peak": int((100 + mb) * MIB), "after": 100 * MIB}]
        return {"config": label, "session_bytes": mb * MIB, "create_bytes": 0, "first_bytes": 0, "after_bytes": 0,
                "file_bytes": 1024, "no_pattern": {"session_bytes": (mb - 1) * MIB},
                "layers": "1 Conv", "raw": raw, "peak_reset": True, "session_options": {"intra_op_num_threads": 1}}

    rows = [row(sm.FLOOR, 9.0), row(sm.real_models.INT8_U8S8, 12.0), row("ternary + bnrecal + w2a8", 11.0),
            row("prune 0.3 + ternary + bnrecal + w2a8", 13.0)]
    result = {"models": [{"model": "m", "file": "m.onnx", "note": "n", "rows": rows}], "command": "c",
              "seconds": 1.0, "repeats": 1, "runs": 20, "notes": []}
    sm.write_markdown(result, tmp_path / "MEMORY.md")
    text = (tmp_path / "MEMORY.md").read_text()
    assert "| ternary + bnrecal + w2a8 | 11.00 | 0.00 | 0.00 | 0.00 | 10.00 | 1.0 | 1 Conv |" in text
    assert "ternary + bnrecal + w2a8: 11.00 MB vs int8 12.00 MB (0.92x; above the floor row: 2.00 vs 3.00 MB): " \
           "HOLDS" in text
    assert "; with enable_mem_pattern=False: 10.00 vs 11.00 MB (<= int8)" in text
    assert "prune 0.3 + ternary + bnrecal + w2a8: 13.00 MB vs int8 12.00 MB" in text
    assert "DOES NOT HOLD" in text.split("prune 0.3 + ternary + bnrecal + w2a8: 13.00 MB")[1].splitlines()[0]
    assert "ocomp W2A8 path:" in text and "flags:" in text
