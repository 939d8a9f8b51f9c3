"""The real-model benchmark runs end to end in --quick mode and its numbers are consistent."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "real_models.py"
sys.path.insert(0, str(SCRIPT.parent))

import real_models  # noqa: E402

QUICK_IMAGES = 200


def test_real_models_quick(shared_dir, tmp_path):
    out = tmp_path / "out"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--shared", str(shared_dir),
                           "--workdir", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert seconds < 120, f"--quick took {seconds:.0f} s; it must stay cheap enough for the test suite"
    result = json.loads((out / "results.json").read_text())
    markdown = (out / "RESULTS.md").read_text()

    (model,) = result["models"]
    assert model["model"] == "resnet20" and model["eval_samples"] == QUICK_IMAGES
    rows = {r["config"]: r for r in model["rows"]}
    assert list(rows) == [c[0] for c in real_models.BASE_CONFIGS]  # every configuration, in order
    for label, row in rows.items():
        assert "error" not in row, (label, row.get("error"))
        for key in ("top1", "params", "macs", "file_bytes", "file_ratio", "latency_ms_1t", "latency_ratio_1t"):
            assert row.get(key) is not None, (label, key)
        assert row["latency_ms_1t"] > 0 and row["params"] > 0 and row["macs"] > 0
        assert 0.0 <= row["top1"] <= 1.0
        assert (row["compile_s"] is None) == (label == "original fp32"), label
    # every table row is filled: no empty cells, no errors
    table = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| config")]
    assert [line.split("|")[1].strip() for line in table] == list(rows)
    for line in table:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 9 and all(cells) and not any(c.startswith("ERROR") for c in cells), line

    # the original's accuracy equals an independent plain-onnxruntime computation on the same 200 images
    # (tolerance: 1 image, since one batch of 200 here vs batches of 100 there may round a near-tie differently)
    import onnxruntime as ort

    data = np.load(shared_dir / "fashion_mnist_test.npz")
    x = data["images"][:QUICK_IMAGES].astype(np.float32) / 255
    sess = ort.InferenceSession(str(shared_dir / "resnet20_fashion_mnist.onnx"), providers=["CPUExecutionProvider"])
    expected = float(np.mean(sess.run(None, {"input": x})[0].argmax(1) == data["labels"][:QUICK_IMAGES]))
    assert abs(rows["original fp32"]["top1"] - expected) <= 1 / QUICK_IMAGES + 1e-12

    original = rows["original fp32"]
    assert original["file_bytes"] == (shared_dir / "resnet20_fashion_mnist.onnx").stat().st_size
    assert original["file_ratio"] == 1.0 and original["latency_ratio_1t"] == 1.0  # exact: x / x
    assert rows["ternary"]["file_ratio"] > 4.0  # 2-bit packed weights vs 32-bit floats
    assert rows["prune 0.3 + ternary"]["file_ratio"] > rows["ternary"]["file_ratio"]
    for label in (real_models.INT8_U8S8, real_models.INT8_S8S8):
        # int8 weights: a quarter of the float bytes (exact ratio 4 minus scales, zero points and graph)
        assert 3.0 < rows[label]["file_ratio"] < 4.0, label
        assert rows[label]["macs"] == original["macs"]  # quantization changes no layer
        assert abs(rows[label]["top1"] - original["top1"]) <= 0.03, label  # 8-bit: within 3 points (6 images)
    # pruning: fewer MACs and params, the more the higher the ratio; ternary keeps every MAC
    assert original["macs"] > rows["prune 0.3"]["macs"] > rows["prune 0.5"]["macs"]
    assert original["params"] > rows["prune 0.3"]["params"] > rows["prune 0.5"]["params"]
    assert rows["ternary"]["macs"] == original["macs"]
    assert rows["prune 0.3 + ternary"]["macs"] == rows["prune 0.3"]["macs"]
    # bnrecal recovers what ternarization loses on this BN model (measured 21.5% -> 92% on these images)
    assert rows["ternary + bnrecal"]["top1"] > rows["ternary"]["top1"] + 0.3
