"""The accuracy cost of W2A8 (issue #13): each configuration compressed with and without the `w2a8` pass
(same passes before it, same calibration data), top-1 on the labelled reference data, side by side.

    python benchmarks/w2a8_accuracy.py                      # ResNet-20 (10k test images) and PP-OCR cls (800)
    python benchmarks/w2a8_accuracy.py --models resnet20 --limit 2000 --method mse

ResNet-20: Fashion-MNIST test images (all 10,000 unless --limit), calibration the first 256 images of
fashion_mnist_calib.npz. PP-OCR cls: text_direction_lines.npz samples 200..999, calibration samples 0..199.
Models are written to a temporary directory, never into the repository.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "reference"

CONFIGS = [
    ("ternary + bnrecal", "ternary,bnrecal,foldbn", {}),
    ("prune 0.3 + ternary + bnrecal", "prune,ternary,bnrecal,foldbn", {"prune": {"ratio": 0.3}}),
]


def load(name: str, shared: Path, limit: int | None) -> dict:
    if name == "resnet20":
        test = np.load(shared / "fashion_mnist_test.npz")
        calib = np.load(shared / "fashion_mnist_calib.npz")
        n = min(limit or 10000, len(test["labels"]))
        return dict(file="resnet20_fashion_mnist.onnx", input="input",
                    calib=calib["images"][:256].astype(np.float32) / 255,
                    eval=test["images"][:n].astype(np.float32) / 255, labels=test["labels"][:n],
                    note=f"Fashion-MNIST test images 0..{n - 1}; calibration fashion_mnist_calib.npz 0..255")
    data = np.load(shared / "text_direction_lines.npz")
    n = min(limit or 800, 800)
    return dict(file="ppocr_mobile_v2_cls.onnx", input="x", calib=data["x"][:200].astype(np.float32),
                eval=data["x"][200:200 + n].astype(np.float32), labels=data["labels"][200:200 + n],
                note=f"text_direction_lines.npz samples 200..{199 + n}; calibration samples 0..199")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,ppocr_cls")
    parser.add_argument("--limit", type=int, default=None, help="evaluation samples (default: all)")
    parser.add_argument("--method", default="auto", help="--w2a8-method")
    parser.add_argument("--configs", default=",".join(str(i) for i in range(len(CONFIGS))),
                        help="indices into the configuration list")
    parser.add_argument("--shared", type=Path, default=SHARED)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import onnx

    from ocomp import api
    from ocomp.data import dataset_from_arrays
    from ocomp.evaluate import evaluate

    folder = tempfile.TemporaryDirectory(prefix="ocomp-w2a8-")  # removed when main returns
    work = Path(folder.name)
    print("| model | configuration | float activations top-1 | W2A8 top-1 | cost (pt) | w2a8 choices |")
    print("|---|---|---|---|---|---|")
    notes = []
    for name in args.models.split(","):
        data = load(name, args.shared, args.limit)
        notes.append(f"{name}: {data['note']}")
        calib = work / f"{name}_calib.npz"
        np.savez(calib, **{data["input"]: data["calib"]})
        source = args.shared / data["file"]
        for index in (int(i) for i in args.configs.split(",")):
            label, passes, options = CONFIGS[index]
            top1 = {}
            choices = ""
            for w2a8 in (False, True):
                out = work / f"{name}_{index}_{int(w2a8)}.onnx"
                opts = dict(options)
                chain = passes
                if w2a8:
                    chain += ",w2a8"
                    opts["w2a8"] = {"method": args.method}
                t0 = time.perf_counter()
                result = api.compress(source, out, chain, opts, calib=calib)
                seconds = time.perf_counter() - t0
                model = onnx.load(out)
                dataset = dataset_from_arrays(model, {data["input"]: data["eval"]}, data["labels"])
                top1[w2a8] = evaluate(model, dataset)["top1"]
                if w2a8:
                    report = next(r for r in result.reports if r.pass_name == "w2a8")
                    choices = ", ".join(f"{k}: {v}" for k, v in sorted(report.details.get("methods", {}).items()))
                    choices += f"; {report.details.get('fused_activations', 0)} activations fused; " \
                               f"compress {seconds:.0f} s"
            cost = 100 * (top1[False] - top1[True])
            print(f"| {name} | {label} | {100 * top1[False]:.2f}% | {100 * top1[True]:.2f}% | {cost:+.2f} | "
                  f"{choices} |", flush=True)
    print()
    for note in notes:
        print(f"- {note}")
    print(f"- w2a8 method: {args.method}")
    folder.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
