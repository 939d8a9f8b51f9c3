"""The real-model benchmark runs end to end in --quick mode and its numbers are consistent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "real_models.py"


def test_real_models_quick(shared_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--shared", str(shared_dir),
                           "--workdir", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "results.json").read_text())
    markdown = (out / "RESULTS.md").read_text()

    (model,) = result["models"]
    assert model["model"] == "resnet20" and model["eval_samples"] == 200
    rows = {r["config"]: r for r in model["rows"]}
    assert len(rows) == 7
    for label, row in rows.items():
        assert "error" not in row, (label, row.get("error"))
        for key in ("top1", "params", "macs", "file_bytes", "file_ratio", "latency_ms_1t", "latency_ratio_1t"):
            assert row.get(key) is not None, (label, key)
        assert row["latency_ms_1t"] > 0
        assert f"| {label} |" in markdown
    # every table row is filled: no empty cells, no errors
    table = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| config")]
    assert len(table) == 7
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert all(cells) and not any(c.startswith("ERROR") for c in cells), line

    # original accuracy equals an independent plain-onnxruntime computation on the same 200 images (exact:
    # same model, same images; one batch of 200 here vs batches of 100 there)
    import onnxruntime as ort

    data = np.load(shared_dir / "fashion_mnist_test.npz")
    x = data["images"][:200].astype(np.float32) / 255
    sess = ort.InferenceSession(str(shared_dir / "resnet20_fashion_mnist.onnx"), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": x})[0]
    expected = float(np.mean(logits.argmax(1) == data["labels"][:200]))
    assert rows["original fp32"]["top1"] == expected

    # sanity of the derived columns (no tolerance needed: exact definitions)
    assert rows["original fp32"]["file_ratio"] == 1.0 and rows["original fp32"]["latency_ratio_1t"] == 1.0
    assert rows["ternary"]["file_ratio"] > 4.0  # 2-bit packed weights vs 32-bit floats
    assert rows["prune 0.3"]["macs"] < rows["original fp32"]["macs"]
